"""Observation normalisation inside the networks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RunningObservationNorm"]


class RunningObservationNorm(nn.Module):
    """Standardises observations with running statistics held as buffers.

    ``forward`` computes ``clamp((x - mean) / sqrt(var + eps), -clip, clip)`` and
    never changes the statistics; :meth:`update` merges a batch into them (the
    exact parallel mean/variance combination, in float64). Because the
    statistics are buffers of the policy, they are saved with its
    ``state_dict``, shipped to collector workers with the policy weights, and
    shared by every network the module is placed in. Update them *after* the
    optimisation epochs of a batch, so the data was collected and is trained on
    with the same statistics (the behaviour log-probabilities stay valid).

    Args:
        shape (int or torch.Size): the observation shape.

    Keyword Args:
        eps (float, optional): variance floor. Defaults to ``1e-8``.
        clip (float, optional): bound on the standardised values. Defaults to ``10``.

    Examples:
        >>> norm = RunningObservationNorm(2)
        >>> norm.update(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
        >>> norm.mean
        tensor([ 2., 20.], dtype=torch.float64)
        >>> norm(torch.tensor([3.0, 30.0]))
        tensor([1., 1.])
    """

    def __init__(self, shape: int | torch.Size, *, eps: float = 1e-8, clip: float = 10.0):
        super().__init__()
        shape = torch.Size([shape]) if isinstance(shape, int) else torch.Size(shape)
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.eps = eps
        self.clip = clip

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(observation.dtype)
        std = (self.var + self.eps).sqrt().to(observation.dtype)
        return ((observation - mean) / std).clamp(-self.clip, self.clip)

    @torch.no_grad()
    def update(self, observations: torch.Tensor) -> None:
        """Merges a batch ``[..., *shape]`` into the running statistics."""
        batch = observations.reshape(-1, *self.mean.shape).to(torch.float64)
        n = batch.shape[0]
        if n == 0:
            return
        batch_mean = batch.mean(0)
        batch_var = batch.var(0, correction=0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.var.copy_(
            (self.var * self.count + batch_var * n + delta.pow(2) * self.count * n / total)
            / total
        )
        self.mean.add_(delta * n / total)
        self.count.copy_(total)
