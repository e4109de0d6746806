"""Exploration noise applied in the update only."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["UpdateMeanNoise"]


class UpdateMeanNoise(nn.Module):
    """Adds uniform noise ``U(-alpha, alpha)`` to a Gaussian's location while :meth:`active`.

    Placed after the module that outputs ``(loc, scale)`` (in an ``nn.Sequential``, which
    hands it over as one tuple), it leaves collection, evaluation
    and any log-probability taken outside :meth:`active` unchanged; inside it (the optimiser
    steps), each call draws fresh noise for every location, so the new log-probabilities are
    those of a policy whose mean is perturbed. This is Robust Policy Optimization (RPO):
    the loss then favours a scale that keeps the sampled actions likely under nearby means,
    which keeps the policy's entropy from collapsing.

    :class:`~torchrl_r2vpo.R2VPOLoss` finds an active one in its actor and takes its
    objective from the perturbed policy but its ratio-variance constraint (and the ratio
    diagnostics) from the unperturbed one (:meth:`paused`): the constraint then bounds how
    far the policy moves, not the noise. TorchRL's ``ClipPPOLoss`` clips the perturbed
    ratio, as RPO does.

    Args:
        alpha (float): half-width of the noise, in the units of ``loc`` (before a tanh).

    Reference:
        Rahman, M. M. and Xue, Y. (2022). Robust Policy Optimization in Deep Reinforcement
        Learning. arXiv:2212.07536.

    Examples:
        >>> noise = UpdateMeanNoise(0.5)
        >>> loc, scale = torch.zeros(3), torch.ones(3)
        >>> noise((loc, scale))[0].tolist()
        [0.0, 0.0, 0.0]
        >>> with noise.active():
        ...     bool(noise((loc, scale))[0].abs().le(0.5).all())
        True
    """

    def __init__(self, alpha: float):
        super().__init__()
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}.")
        self.alpha = alpha
        self._active = False

    @contextlib.contextmanager
    def active(self):
        """Perturbs the locations inside the ``with`` block."""
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    @contextlib.contextmanager
    def paused(self):
        """Leaves the locations unperturbed inside the ``with`` block, active or not."""
        active, self._active = self._active, False
        try:
            yield self
        finally:
            self._active = active

    @property
    def is_active(self) -> bool:
        """Whether calls perturb the locations now."""
        return self._active and self.alpha > 0

    def forward(self, params: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``params``: ``(loc, scale)``; returns them, ``loc`` perturbed while active."""
        loc, scale = params
        if self.is_active:
            loc = loc + torch.empty_like(loc).uniform_(-self.alpha, self.alpha)
        return loc, scale
