r"""Statistics of replayed data by staleness (how many policy updates ago it was sampled).

For each age ``k`` (a row's policy-version difference), over its valid entries:

==================  ============================================================
``tokens``          the number of entries
``ratio_mean``      mean of the ratio ``r`` (after an update: its step, e.g.
                    ``pi_theta / pi_prox``)
``ratio_var``       mean of ``(r - mean r)^2``
``ESS``             ``(sum r)^2 / (n sum r^2)``, the normalised effective sample size
``clip_fraction``   share of ``r`` outside ``[1 - eps, 1 + eps]``: what a clip would cut
``weight_mean``     mean of the behaviour weight ``w`` (e.g. ``pi_prox / pi_behaviour``)
``weight_max``      its largest value
``weight_ESS``      ``(sum w)^2 / (n sum w^2)``
==================  ============================================================

They come from sums (:func:`staleness_sums`) that :func:`merge_staleness_sums` adds up
across chunks, so the statistics of a batch scored in pieces are those of the whole.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["STALENESS_FIELDS", "merge_staleness_sums", "staleness_stats", "staleness_sums",
           "staleness_table"]

STALENESS_FIELDS = ("tokens", "ratio_mean", "ratio_var", "ESS", "clip_fraction", "weight_mean",
                    "weight_max", "weight_ESS")
"""The statistics of each age, in the order of :func:`staleness_table`'s rows."""

# the sums of one age: count, sum r, sum r^2, sum w, sum w^2, max w, entries outside the band
_COUNT, _R1, _R2, _W1, _W2, _WMAX, _OUT = range(7)


def staleness_sums(ratio: torch.Tensor, age: torch.Tensor, mask: torch.Tensor | None = None,
                   weight: torch.Tensor | None = None, clip_epsilon: float = 0.2
                   ) -> dict[int, torch.Tensor]:
    """The sums behind :data:`STALENESS_FIELDS`, per age: ``{k: float64 [7]}``.

    Args:
        ratio: the ratio per sample (or per token), ``[N, ...]``.
        age: policy updates since each row was sampled, ``[N]`` (broadcast over the rest).
        mask: valid entries of ``ratio`` (e.g. completion tokens); all by default.
        weight: the behaviour weight per entry, as ``ratio``; 1 by default.
        clip_epsilon: the band of ``clip_fraction``.
    """
    age = age.view(age.shape + (1,) * (ratio.dim() - age.dim())).expand_as(ratio)
    valid = torch.ones_like(ratio, dtype=torch.bool) if mask is None else mask.bool().expand_as(ratio)
    weight = torch.ones_like(ratio) if weight is None else weight.expand_as(ratio)
    sums = {}
    for k in age[valid].unique().tolist():
        selected = valid & (age == k)
        r, w = ratio[selected].double(), weight[selected].double()
        outside = ((r < 1 - clip_epsilon) | (r > 1 + clip_epsilon)).sum()
        sums[k] = torch.stack([r.new_tensor(r.numel()), r.sum(), r.pow(2).sum(), w.sum(),
                               w.pow(2).sum(), w.max(), outside.double()]).cpu()
    return sums


def merge_staleness_sums(parts: Iterable[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """The sums of the union of disjoint chunks (the maximum of their maxima)."""
    merged: dict[int, torch.Tensor] = {}
    for part in parts:
        for k, sums in part.items():
            if k not in merged:
                merged[k] = sums.clone()
                continue
            total = merged[k] + sums
            total[_WMAX] = torch.maximum(merged[k][_WMAX], sums[_WMAX])
            merged[k] = total
    return merged


def staleness_table(sums: dict[int, torch.Tensor]) -> dict[int, dict[str, float]]:
    """The statistics of each age, ``{k: {field: value}}``, in increasing age."""
    table = {}
    for k in sorted(sums):
        s = sums[k].tolist()
        n = s[_COUNT]
        mean = s[_R1] / n
        table[k] = dict(zip(STALENESS_FIELDS, (
            int(n), mean, max(s[_R2] / n - mean * mean, 0.0), s[_R1] ** 2 / (n * s[_R2]),
            s[_OUT] / n, s[_W1] / n, s[_WMAX], s[_W1] ** 2 / (n * s[_W2]))))
    return table


def staleness_stats(ratio: torch.Tensor, age: torch.Tensor, mask: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None, clip_epsilon: float = 0.2
                    ) -> dict[str, float]:
    """:func:`staleness_table` of one batch, flat: ``{"stale{k}/{field}": value}``.

    Examples:
        >>> stats = staleness_stats(torch.tensor([1.0, 1.0, 0.5, 1.5]), torch.tensor([0, 0, 1, 1]))
        >>> stats["stale0/ratio_var"], stats["stale1/ratio_var"], stats["stale1/ESS"]
        (0.0, 0.25, 0.8)
        >>> stats["stale1/clip_fraction"], stats["stale1/weight_mean"]
        (1.0, 1.0)
    """
    table = staleness_table(staleness_sums(ratio, age, mask, weight, clip_epsilon))
    return {f"stale{k}/{field}": value for k, row in table.items() for field, value in row.items()}
