"""Environments: continuous control (DeepMind Control, gymnasium, MuJoCo Playground) and
token generation as an MDP."""

from __future__ import annotations

from torchrl_r2vpo._deprecation import moved
from torchrl_r2vpo.envs.control import (DMControlBatchEnv, FaultTolerantDMControlEnv, make_env,
                                        parse_env_name)
from torchrl_r2vpo.envs.playground import PlaygroundEnv
from torchrl_r2vpo.envs.token_mdp import next_token_actor, sequences_from_rollout, TokenGenerationEnv

__all__ = [
    "DMControlBatchEnv",
    "FaultTolerantDMControlEnv",
    "PlaygroundEnv",
    "TokenGenerationEnv",
    "make_env",
    "next_token_actor",
    "parse_env_name",
    "sequences_from_rollout",
]

__getattr__ = moved(__name__, {
    "NextTokenActor": ("torchrl_r2vpo.envs", "next_token_actor"),
    "record_rollout_gif": "torchrl_r2vpo.record",
    "select_mujoco_gl": "torchrl_r2vpo.record",
    **dict.fromkeys(["MathProblem", "answers_match", "extract_answer", "generate_problems",
                     "load_hf_math", "math_reward", "normalize_answer"], "torchrl_r2vpo.math_task"),
})
