"""R2VPO (Ratio-Variance Regularized Policy Optimization) for TorchRL."""

from __future__ import annotations

from torchrl_r2vpo.objectives import (
    DualVariableScheduler,
    DualVariableSchedulerHook,
    LLM_LOSSES,
    make_llm_loss,
    merge_ratio_stats,
    R2VPOLLMLoss,
    R2VPOLoss,
)

__version__ = "0.1.0"

__all__ = [
    "DualVariableScheduler",
    "DualVariableSchedulerHook",
    "LLM_LOSSES",
    "R2VPOLLMLoss",
    "R2VPOLoss",
    "make_llm_loss",
    "merge_ratio_stats",
]
