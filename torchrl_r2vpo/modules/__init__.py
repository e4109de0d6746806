"""Network building blocks."""

from __future__ import annotations

from torchrl_r2vpo.modules.exploration import UpdateMeanNoise
from torchrl_r2vpo.modules.normalization import RunningObservationNorm, RunningReturnNorm

__all__ = ["RunningObservationNorm", "RunningReturnNorm", "UpdateMeanNoise"]
