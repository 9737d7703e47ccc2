"""The one rollout loop, used by training, the held-out evaluation, ``eval model`` and ``rlef``.

A batch of episodes runs in a Gymnasium vector env (``gymnasium.make_vec``; agentopd's envs have a
vector entry point that judges every slot of a turn in one batched call): reset, generate for the
active episodes, step them, and append the env's reply to the conversation until each episode ends
(success, a limit, or a judge failure). A reply is a list of messages (an agent env's tool results,
``role: tool``) or a string (a critique: one user message through the ``feedback`` template). Token
ids are the source of truth: a later turn's prompt is the earlier prompt ids, the sampled ids, and
the chat template's rendering of the new messages (:func:`continuation_ids`), never a
re-tokenization of the whole conversation.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field

from agentopd.config import DEFAULT_FEEDBACK
from agentopd.inference.base import apply_chat, derive_seed, sample_chat, sample_text
from agentopd.types import Episode, Judgement, Turn, Verdict

_SENTINEL = "\u2063agentopd-turn\u2063"


@dataclass
class Sampling:
    """How each turn samples (the fields of ``SamplingConfig`` that matter here)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] | None = None


@dataclass
class Timing:
    generate: float = 0.0
    """Seconds in the engine."""
    step: float = 0.0
    """Seconds in ``env.step`` (judging)."""
    extra: dict = field(default_factory=dict)


def continuation_ids(tokenizer, history: list[dict], new_messages: list[dict], response_ids: list[int],
                     tools: list[dict] | None = None) -> list[int]:
    """The ids that follow an assistant turn's sampled ``response_ids`` to close that turn and open the
    next assistant turn after ``new_messages`` (``history`` ends with the message(s) the response
    answered; ``new_messages``: user or tool messages; ``tools``: as the first prompt was rendered
    with). The template renders the assistant turn around a placeholder; what follows the
    placeholder closes the turn (less the end-of-turn token if the model sampled it), and what the
    new messages add is tokenized alone."""
    kw = {"tools": tools} if tools else {}
    closed = tokenizer.apply_chat_template(history + [{"role": "assistant", "content": _SENTINEL}], tokenize=False,
                                           **kw)
    opened = tokenizer.apply_chat_template(history + [{"role": "assistant", "content": _SENTINEL}] + new_messages,
                                           tokenize=False, add_generation_prompt=True, **kw)
    if not opened.startswith(closed):
        raise ValueError("the chat template renders earlier turns differently once a turn is added; "
                         "multi-turn token continuity needs a template that only appends")
    closing = closed[closed.rindex(_SENTINEL) + len(_SENTINEL):]
    eos = tokenizer.eos_token
    if response_ids and eos and response_ids[-1] == tokenizer.eos_token_id and closing.startswith(eos):
        closing = closing[len(eos):]
    return tokenizer.encode(closing + opened[len(closed):], add_special_tokens=False)


class Action(str):
    """A turn's answer as the env receives it: its text, and ``tokens``, the episode's token count
    once the answer is appended (prompt ids and sampled ids; None for a server engine). An env that
    limits an episode's tokens reads it (:mod:`agentopd.envs.agent`); any other env sees a ``str``."""

    tokens: int | None = None


def _action(text: str, tokens: int | None) -> Action:
    a = Action(text)
    a.tokens = tokens
    return a


def reply_messages(obs, feedback: str = DEFAULT_FEEDBACK) -> list[dict]:
    """The messages an env's observation adds to the conversation: a list of messages (``role`` user
    or tool, ``content``) as they are; a string (a critique, a text env's reply) as one user message
    through the ``feedback`` template (``{critique}``)."""
    if isinstance(obs, str):
        return [{"role": "user", "content": feedback.format(critique=obs)}]
    msgs = [dict(m) for m in obs]
    bad = [m for m in msgs if m.get("role") not in ("user", "tool") or not isinstance(m.get("content"), str)]
    if bad:
        raise ValueError(f"an env reply message needs role user or tool and a string content, got {bad[0]!r}")
    return msgs


def _info(infos: dict, key: str, i: int, default=None):
    """Slot ``i``'s ``key`` in a vector env's info dict (Gymnasium's ``_key`` mask says who has it; a
    dict-valued info is stored as a dict of such arrays, read back here as slot ``i``'s dict)."""
    mask = infos.get(f"_{key}")
    if mask is None or not mask[i]:
        return default
    value = infos[key]
    if isinstance(value, dict):
        return {k: _info(value, k, i) for k in value if not k.startswith("_") and value.get(f"_{k}", mask)[i]}
    return value[i]


def _judgement(infos: dict, i: int, reward: float, ended: bool) -> Judgement:
    """Slot ``i``'s Judgement from the env's info (agentopd's envs give it), else made from its reward
    (a user env: success is reward 1 at the end of an episode; NaN is a judge failure)."""
    given = _info(infos, "judgement", i)
    if given is not None:
        return given
    critique = _info(infos, "critique", i, "")
    if not math.isfinite(reward):  # NaN (a failed judge) or infinite: never a reward
        return Judgement(Verdict(float("nan"), 0, 0, "judge_error"), critique)
    success = _info(infos, "success", i)
    ok = bool(success) if success is not None else ended and reward >= 1.0
    return Judgement(Verdict(float(reward), int(ok), 1, "ok" if ok else "wrong_answer"), critique)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to the first stop string (servers cut there; the hf engine keeps the stop)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(cuts)] if cuts else text


def _takes(fn, name: str) -> bool:
    """Whether ``fn`` takes the keyword argument ``name`` (or any, ``**kw``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


class _Generate:
    """One engine, shared by the threads of :func:`rollout_chunks` (one call at a time)."""

    def __init__(self, engine, tokenizer, sampling: Sampling, timing: Timing, lock=None, context=None,
                 started: threading.Event | None = None, completion: bool = False):
        self.engine, self.tok, self.s, self.timing = engine, tokenizer, sampling, timing
        self.context = context or contextlib.nullcontext
        self.started = started  # set once the first call returned
        self.lock = lock or threading.Lock()
        self.completion = completion
        # a server engine works on messages (or text): no token ids
        self.chat = hasattr(engine, "generate_chat") or hasattr(engine, "generate_text") or tokenizer is None
        method = getattr(engine, ("generate_text" if completion else "generate_chat") if self.chat else "generate",
                         getattr(engine, "generate", None))
        self.takes_seeds = _takes(method, "seeds")

    def first_prompt(self, messages: list[dict], tools: list[dict] | None = None):
        text = messages[0]["content"]
        if self.completion:
            return text if self.chat else self.tok.encode(text)
        return messages if self.chat else apply_chat(self.tok, messages, tools)

    def __call__(self, prompts: list, n: int, seed: int, seeds: list[int] | None = None) -> list:
        """``n`` samples of each prompt; ``seeds``: one per sample (the engine's ``seeds``)."""
        if seeds and not self.takes_seeds:
            import warnings

            warnings.warn(f"{type(self.engine).__name__}.generate takes no per-sample seeds: samples depend on "
                          "the call they are in (a resumed evaluation may differ)", stacklevel=2)
            seeds = None
        kw = dict(n=n, max_new_tokens=self.s.max_new_tokens, temperature=self.s.temperature, top_p=self.s.top_p,
                  seed=seed, **({"stop": self.s.stop} if self.s.stop else {}), **({"seeds": seeds} if seeds else {}))
        with self.lock, self.context():  # (autocast is per thread: entered here, in the calling thread)
            t0 = time.perf_counter()
            if self.chat:
                got = (sample_text if self.completion else sample_chat)(self.engine, prompts, **kw)
            else:
                got = self.engine.generate(prompts, **kw)
            self.timing.generate += time.perf_counter() - t0
        if self.started is not None:
            self.started.set()
        return got


def _first_turn(gen: _Generate, episodes: list[Episode], prompts: list, group_size: int, seed: int,
                sample_seeds: list[int] | None) -> list:
    """Turn 1: each group's prompt sampled ``group_size`` times in one call (as plain sampling does)."""
    heads = list(range(0, len(episodes), group_size))
    got = gen([prompts[h] for h in heads], group_size, seed, sample_seeds)
    return [g for gs in got for g in gs]


def _turn_seeds(sample_seeds: list[int] | None, active: list[int], turn: int) -> list[int] | None:
    """The seeds of the active slots' samples at a later turn: each slot's seed and the turn."""
    return None if sample_seeds is None else [derive_seed(sample_seeds[i], turn) for i in active]


def rollout(engine, tokenizer, venv, *, group_size: int = 1, sampling: Sampling | None = None, seed: int = 0,
            index: list[int] | None = None, seeds: list[int] | None = None, max_turns: int = 64,
            feedback: str = DEFAULT_FEEDBACK, timing: Timing | None = None, lock=None, context=None,
            started: threading.Event | None = None, template: str = "{prompt}", completion: bool = False,
            sample_seeds: list[int] | None = None) -> list[Episode]:
    """Play one episode per slot of ``venv`` to its end; slots ``k*group_size ..`` form group ``k``
    and must start on the same problem (``index``: each slot's problem, for envs that pick by index;
    else ``seeds``: each slot's reset seed). ``feedback``: the user message after a failed turn
    (``{critique}`` is the env's observation) when the env replies with a string. ``engine``: a token engine (``generate`` on ids, with
    ``tokenizer``) or a server engine (``generate_chat``). ``context``: a factory of the context each
    engine call runs in (e.g. autocast); ``started``: an event set once the first turn generated.
    ``template``: the first user message (``{prompt}``: the env's first observation); ``completion``:
    the template's text is continued as raw text instead (no chat template; one turn).
    ``sample_seeds``: one per slot; each slot's samples (every turn) are then drawn from its own seed
    alone (the engine's per-sample ``seeds``), not from ``seed``: the same whichever slots share the
    call (a resumed evaluation samples what an uninterrupted one did)."""
    timing = timing or Timing()
    s = sampling or Sampling()
    gen = _Generate(engine, tokenizer, s, timing, lock, context, started, completion)
    obs, infos = venv.reset(seed=seeds, options=None if index is None else {"index": index})
    N = len(obs)
    ids = infos.get("problem_id", [None] * N)
    episodes = [Episode(str(ids[i]), i // group_size, obs[i],
                        messages=[{"role": "user", "content": template.format(prompt=obs[i])}],
                        privileged=_info(infos, "privileged", i, None) or {}, kind=_info(infos, "kind", i, ""),
                        tools=_info(infos, "tools", i, None))
                for i in range(N)]
    prompts = [gen.first_prompt(e.messages, e.tools) for e in episodes]
    max_turns = 1 if completion else max_turns
    active = list(range(N))
    for turn in range(max_turns):
        gens = (_first_turn(gen, episodes, prompts, group_size, seed, sample_seeds) if turn == 0 else
                [g[0] for g in gen([prompts[i] for i in active], 1, seed + 7919 * turn,
                                   _turn_seeds(sample_seeds, active, turn))])
        actions = [""] * N
        for i, g in zip(active, gens):
            g.text = cut_at_stop(g.text, s.stop or [])
            actions[i] = _action(g.text, None if gen.chat else len(prompts[i]) + len(g.response_ids))
        t0 = time.perf_counter()
        obs, rewards, terms, truncs, infos = venv.step(tuple(actions))
        timing.step += time.perf_counter() - t0
        active = [i for i, g in zip(active, gens) if _advance(episodes[i], prompts, i, g, obs[i], float(rewards[i]),
                                                               bool(terms[i] or truncs[i]), infos, gen, feedback)]
        if not active:
            break
    return episodes


def _advance(ep: Episode, prompts: list, i: int, g, obs: str, reward: float, ended: bool, infos: dict,
             gen: _Generate, feedback: str) -> bool:
    """Record slot ``i``'s turn; when the episode goes on, extend its prompt with the feedback turn.
    True: still active."""
    j = _judgement(infos, i, reward, ended)
    fb = _info(infos, "feedback_status", i, j.verdict.status)
    ep.turns.append(Turn(None if gen.chat else prompts[i], list(g.response_ids), list(g.logprobs), g.text, j,
                         reward, g.finish_reason, fb))
    history = list(ep.messages)
    ep.messages.append({"role": "assistant", "content": g.text})
    if ended:
        _finish(ep, _info(infos, "episode", i, None))
        return False
    new = reply_messages(obs, feedback)
    ep.messages += new
    if not gen.chat:
        prompts[i] = (prompts[i] + list(g.response_ids)
                      + continuation_ids(gen.tok, history, new, g.response_ids, ep.tools))
    else:
        prompts[i] = ep.messages
    return True


def _finish(ep: Episode, stats: dict | None) -> None:
    """At an episode's end: the env's episode statistics (an agent env's status and tool calls), and
    each tool turn's judgement in hindsight, the episode's final one (the verdict and critique that
    every turn's credit reads)."""
    if stats is None:
        return
    ep.stats = {k: v.item() if hasattr(v, "item") else v for k, v in stats.items()}  # (numpy, from a vector info)
    for t in ep.turns[:-1]:
        if t.feedback_status == "tool":
            t.judgement = ep.turns[-1].judgement


def env_specs(cfg) -> tuple[str, dict, dict | None]:
    """``(env id, training env kwargs, held-out env kwargs or None)`` of a config's ``env`` section:
    agentopd's envs also get ``max_turns`` and (generated problems) the seed ``run.seed + 1`` unless
    ``env.kwargs`` names one; held-out problems when ``eval.problems`` asks for them."""
    from agentopd.config import ConfigError
    from agentopd.envs.procedural import GENERATORS

    e = cfg.env
    env_id, kw = e.id, dict(e.kwargs)
    ours = env_id.startswith("agentopd/")
    kind = {"agentopd/Math-v0": "math"}.get(env_id, "code")
    named = kw.get("problems") if isinstance(kw.get("problems"), str) else None  # (else a file's rows, a dataset spec)
    if ours and GENERATORS.get(named, kind) != kind:
        raise ConfigError(f"env.kwargs.problems={kw['problems']!r} makes {GENERATORS[kw['problems']]} problems, but "
                          f"env.id is {env_id}")
    if ours:
        kw.setdefault("max_turns", e.max_turns)
        kw.setdefault("seed", cfg.run.seed + 1)
    if not cfg.eval.problems:
        return env_id, kw, None
    generated = ours and named in GENERATORS
    held = dict(e.heldout_kwargs)
    if generated and not held:
        kw.setdefault("heldout_n", cfg.eval.problems)
        held = {"split": "heldout", "n": cfg.eval.problems}
    if not held:
        raise ConfigError("eval.problems needs held-out problems: env.heldout_kwargs (e.g. {problems: "
                          "heldout.jsonl}), unless the problems are generated")
    return env_id, kw, {k: v for k, v in {**kw, **held}.items() if k != "heldout_n"}


def make_envs(env_id: str, kwargs: dict, sizes: list[int]) -> list:
    """Vector envs of ``sizes[k]`` slots each (``gymnasium.make_vec``). agentopd's own envs share one
    underlying env (its problems and judge) among them; any other env is made once per vector env
    (Gymnasium's sync vector env of ``sizes[k]`` copies)."""
    import gymnasium as gym

    import agentopd.envs  # noqa: F401  (registers agentopd's ids)
    from agentopd.envs.base import JudgedVectorEnv

    first = gym.make_vec(env_id, num_envs=sizes[0], **kwargs)
    if isinstance(first, JudgedVectorEnv):
        return [first] + [type(first)(first.env, n, owner=False) for n in sizes[1:]]
    return [first] + [gym.make_vec(env_id, num_envs=n, **kwargs) for n in sizes[1:]]


def rollout_chunks(engine, tokenizer, venvs: list, chunks: list[dict], **kw) -> tuple[list[Episode], Timing]:
    """:func:`rollout` over several vector envs at once, one thread each (the engine is called by one
    at a time, so a chunk's judging runs while the next chunk generates). ``chunks[k]``: the keyword
    arguments ``index``/``seeds``/``seed`` of ``venvs[k]``. Episodes come back in chunk order,
    groups numbered across chunks."""
    from concurrent.futures import ThreadPoolExecutor

    timing, lock = Timing(), threading.Lock()
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=max(len(chunks), 1), thread_name_prefix="rollout")
    try:
        futures = []
        for v, c in zip(venvs, chunks):  # chunk k starts once chunk k-1 has generated: the same order every run
            started = threading.Event()
            futures.append(pool.submit(rollout, engine, tokenizer, v, timing=timing, lock=lock, started=started,
                                       **kw, **c))
            while not started.wait(0.01) and not futures[-1].done():
                pass
        parts = [f.result() for f in futures]
    except BaseException:  # e.g. a stop signal abandoning the step: the chunks still running are left to end
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    episodes = []
    for part in parts:
        base = max((e.group for e in episodes), default=-1) + 1
        for e in part:
            e.group += base
        episodes += part
    timing.extra["wall"] = time.perf_counter() - t0
    return episodes, timing
