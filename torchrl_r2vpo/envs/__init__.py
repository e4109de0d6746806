"""Environments: continuous control (DeepMind Control, gymnasium)."""

from __future__ import annotations

from torchrl_r2vpo.envs.control import (
    FaultTolerantDMControlEnv,
    make_env,
    parse_env_name,
    record_rollout_gif,
    select_mujoco_gl,
)

__all__ = [
    "FaultTolerantDMControlEnv",
    "make_env",
    "parse_env_name",
    "record_rollout_gif",
    "select_mujoco_gl",
]
