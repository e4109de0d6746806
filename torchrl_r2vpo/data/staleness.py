"""Statistics of replayed data by staleness (how many policy updates ago it was sampled)."""

from __future__ import annotations

import torch

__all__ = ["staleness_stats"]


def staleness_stats(ratio: torch.Tensor, age: torch.Tensor, mask: torch.Tensor | None = None
                    ) -> dict[str, float]:
    """Mean, variance and normalised ESS of the importance ratio for each data age.

    Args:
        ratio: ``pi_theta / pi_behaviour`` per sample (or per token), shape ``[N, ...]``.
        age: policy updates since each row was sampled, ``[N]`` (broadcast over the rest).
        mask: valid entries of ``ratio`` (e.g. completion tokens); all by default.

    Returns:
        ``{"stale{k}/ratio_mean", "stale{k}/ratio_var", "stale{k}/ESS"}`` for each age ``k``
        present; the ESS is ``mean(r)^2 / mean(r^2)`` (1 on policy).

    Examples:
        >>> stats = staleness_stats(torch.tensor([1.0, 1.0, 0.5, 1.5]), torch.tensor([0, 0, 1, 1]))
        >>> stats["stale0/ratio_var"], stats["stale1/ratio_var"], stats["stale1/ESS"]
        (0.0, 0.25, 0.8)
    """
    age = age.view(age.shape + (1,) * (ratio.dim() - age.dim())).expand_as(ratio)
    valid = torch.ones_like(ratio, dtype=torch.bool) if mask is None else mask.bool().expand_as(ratio)
    stats = {}
    for k in age[valid].unique().tolist():
        r = ratio[valid & (age == k)].double()
        stats[f"stale{k}/ratio_mean"] = r.mean().item()
        stats[f"stale{k}/ratio_var"] = r.var(correction=0).item()
        stats[f"stale{k}/ESS"] = (r.mean() ** 2 / (r**2).mean()).item()
    return stats
