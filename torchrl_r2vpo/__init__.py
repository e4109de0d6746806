"""R2VPO (Ratio-Variance Regularized Policy Optimization) for TorchRL."""

from __future__ import annotations

from torchrl_r2vpo.objectives import (
    DualVariableScheduler,
    DualVariableSchedulerHook,
    R2VPOLoss,
)

__version__ = "0.1.0"

__all__ = ["DualVariableScheduler", "DualVariableSchedulerHook", "R2VPOLoss"]
