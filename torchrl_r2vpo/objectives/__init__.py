"""Losses and the dual-variable scheduler."""

from __future__ import annotations

from torchrl_r2vpo.objectives.dual import DualVariableScheduler, DualVariableSchedulerHook
from torchrl_r2vpo.objectives.llm import (
    CISPOLLMLoss,
    DAPOLLMLoss,
    GPPOLLMLoss,
    GRPOLLMLoss,
    LLM_LOSSES,
    make_llm_loss,
    merge_ratio_stats,
    R2VPOLLMLoss,
    R2VPOLLMLossOutput,
    SPOLLMLoss,
    TOPRLLMLoss,
)
from torchrl_r2vpo.objectives.r2vpo import R2VPOLoss

__all__ = [
    "CISPOLLMLoss",
    "DAPOLLMLoss",
    "DualVariableScheduler",
    "DualVariableSchedulerHook",
    "GPPOLLMLoss",
    "GRPOLLMLoss",
    "LLM_LOSSES",
    "R2VPOLLMLoss",
    "R2VPOLLMLossOutput",
    "R2VPOLoss",
    "SPOLLMLoss",
    "TOPRLLMLoss",
    "make_llm_loss",
    "merge_ratio_stats",
]
