"""Losses, their ratio-variance statistics, and the dual-variable scheduler.

* ``ratio_variance``: the Lagrangian state, the masked ratio statistics and their merging,
  shared by every R2VPO loss;
* ``r2vpo``: :class:`R2VPOLoss`, for control (any TensorDict policy);
* ``dual``: :class:`DualVariableScheduler` and its Trainer hook, for any of them;
* ``llm``: the token-level losses (R2VPO and its baselines) and exact gradient
  accumulation, as TorchRL's ``torchrl.objectives.llm``.
"""

from __future__ import annotations

from torchrl_r2vpo.objectives.dual import DualVariableScheduler, DualVariableSchedulerHook
from torchrl_r2vpo.objectives.llm import (
    CISPOLLMLoss,
    DAPOLLMLoss,
    DecoupledGRPOLLMLoss,
    GPPOLLMLoss,
    GRPOLLMLoss,
    GRPOTISLLMLoss,
    LLM_LOSSES,
    M2POLLMLoss,
    make_llm_loss,
    R2VPOLLMLoss,
    R2VPOLLMLossOutput,
    SPOLLMLoss,
    TOPRLLMLoss,
)
from torchrl_r2vpo.objectives.r2vpo import R2VPOLoss
from torchrl_r2vpo.objectives.ratio_variance import (
    LagrangianLoss,
    merge_ratio_stats,
    RatioStats,
)

__all__ = [
    "CISPOLLMLoss",
    "DAPOLLMLoss",
    "DecoupledGRPOLLMLoss",
    "DualVariableScheduler",
    "DualVariableSchedulerHook",
    "GPPOLLMLoss",
    "GRPOLLMLoss",
    "GRPOTISLLMLoss",
    "LLM_LOSSES",
    "M2POLLMLoss",
    "LagrangianLoss",
    "R2VPOLLMLoss",
    "R2VPOLLMLossOutput",
    "R2VPOLoss",
    "RatioStats",
    "SPOLLMLoss",
    "TOPRLLMLoss",
    "make_llm_loss",
    "merge_ratio_stats",
]
