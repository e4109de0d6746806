"""Environments: continuous control (DeepMind Control, gymnasium, MuJoCo Playground), token
generation, math problems."""

from __future__ import annotations

from torchrl_r2vpo.envs.control import (
    FaultTolerantDMControlEnv,
    make_env,
    parse_env_name,
    PlaygroundEnv,
    record_rollout_gif,
    select_mujoco_gl,
)
from torchrl_r2vpo.envs.math_data import generate_problems, load_hf_math, MathProblem
from torchrl_r2vpo.envs.math_reward import (
    answers_match,
    extract_answer,
    math_reward,
    normalize_answer,
)
from torchrl_r2vpo.envs.token_mdp import NextTokenActor, sequences_from_rollout, TokenGenerationEnv

__all__ = [
    "FaultTolerantDMControlEnv",
    "MathProblem",
    "NextTokenActor",
    "TokenGenerationEnv",
    "answers_match",
    "extract_answer",
    "generate_problems",
    "load_hf_math",
    "make_env",
    "math_reward",
    "normalize_answer",
    "parse_env_name",
    "PlaygroundEnv",
    "record_rollout_gif",
    "select_mujoco_gl",
    "sequences_from_rollout",
]
