"""Shared by the env test modules: gymnasium's check_env with no warnings, then a first reset."""
import warnings

from gymnasium.utils.env_checker import check_env


def check_env_cleanly(env):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert not [str(w.message) for w in caught]
    obs, info = env.reset(seed=0)
    assert isinstance(obs, str) and obs and env.observation_space.contains(obs)
    assert info["turn"] == 0 and isinstance(info["problem_id"], str)
    return obs, info
