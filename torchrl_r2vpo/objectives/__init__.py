"""Losses and the dual-variable scheduler."""

from __future__ import annotations

from torchrl_r2vpo.objectives.dual import DualVariableScheduler, DualVariableSchedulerHook
from torchrl_r2vpo.objectives.r2vpo import R2VPOLoss

__all__ = ["DualVariableScheduler", "DualVariableSchedulerHook", "R2VPOLoss"]
