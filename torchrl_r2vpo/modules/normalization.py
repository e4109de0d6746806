"""Observation normalisation inside the networks, and reward scaling by the return's spread."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RunningObservationNorm", "RunningReturnNorm"]


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


class RunningReturnNorm(nn.Module):
    """Divides rewards by the running standard deviation of their discounted return.

    The reward scaling of gymnasium's ``NormalizeReward`` wrapper, which CleanRL's continuous
    PPO uses (Engstrom et al., 2020, "Implementation Matters in Deep Policy Gradients", ICLR):
    each environment's discounted return :math:`G_t = \\gamma G_{t-1} (1 - d_{t-1}) + r_t`
    (:math:`d` the done flag, so :math:`G` restarts with each episode) feeds running
    statistics, and ``forward`` computes
    :math:`\\mathrm{clamp}(r / \\sqrt{\\mathrm{Var}[G] + \\epsilon}, -c, c)`. The mean is
    not subtracted: the sign of each reward is kept. While a sparse task pays nothing,
    :math:`\\mathrm{Var}[G]` stays near 0 and the first rewards found are scaled up
    (to at most ``clip``).

    :meth:`update` takes a batch of consecutive steps, the time along the last batch
    dimension, and carries each environment's :math:`G` to the next batch (the environments
    must be the same, in the same order). The statistics are buffers (saved with
    ``state_dict``); the carried returns are not: a resumed run starts fresh episodes.

    Args:
        gamma (float): the discount of :math:`G`, the agent's.

    Keyword Args:
        eps (float, optional): variance floor. Defaults to ``1e-8``.
        clip (float, optional): bound on the scaled rewards. Defaults to ``10``.

    Examples:
        >>> norm = RunningReturnNorm(gamma=0.5)
        >>> reward = torch.tensor([[[1.0], [1.0], [1.0]]])  # one environment, 3 steps
        >>> norm.update(reward, torch.zeros_like(reward, dtype=torch.bool))
        >>> norm.stats.mean  # of the returns 1, 1.5, 1.75
        tensor([1.4167], dtype=torch.float64)
        >>> norm(reward).squeeze()
        tensor([3.2071, 3.2071, 3.2071])
    """

    def __init__(self, gamma: float, *, eps: float = 1e-8, clip: float = 10.0):
        super().__init__()
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.gamma = gamma
        self.stats = RunningObservationNorm(1, eps=eps)
        self.clip = clip
        self.returns: torch.Tensor | None = None  # [*envs, 1]: each environment's G so far

    def forward(self, reward: torch.Tensor) -> torch.Tensor:
        scale = (self.stats.var + self.stats.eps).sqrt().to(reward.dtype)
        return (reward / scale).clamp(-self.clip, self.clip)

    @torch.no_grad()
    def update(self, reward: torch.Tensor, done: torch.Tensor) -> None:
        """Merges the returns of a batch ``[*envs, T, 1]`` (``done`` alike) into the
        statistics."""
        if reward.shape != done.shape or reward.ndim < 2 or reward.shape[-1] != 1:
            raise ValueError(f"reward and done must both be [*envs, T, 1], got "
                             f"{tuple(reward.shape)} and {tuple(done.shape)}")
        envs = reward.shape[:-2]
        if self.returns is None or self.returns.shape[:-1] != envs:
            self.returns = reward.new_zeros(*envs, 1, dtype=torch.float64)
        returns, keep = [], done.logical_not().to(torch.float64)
        for t in range(reward.shape[-2]):
            self.returns = self.gamma * self.returns + reward[..., t, :].to(torch.float64)
            returns.append(self.returns)
            self.returns = self.returns * keep[..., t, :]  # a new episode after a done step
        self.stats.update(torch.stack(returns))
