"""The ratio-variance constraint every R2VPO loss shares.

* :class:`LagrangianMixin`: the multiplier ``lambda`` and the target ``delta`` as loss
  buffers, their validation, and the statistics of the last forward call;
* :class:`RatioStats`: the masked sufficient statistics of the importance ratio (count,
  sum, sum of squares), which add up exactly across micro-batches, and
  :func:`merge_ratio_stats`, which merges loss outputs with them;
* :class:`LagrangianLoss`: the protocol :class:`~torchrl_r2vpo.DualVariableScheduler`
  reads a loss through;
* the small numerical pieces the losses share (:func:`masked_mean`,
  :func:`squared_deviation`, argument and input checks).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import expand_as_right, NestedKey
from torchrl.objectives.common import AUTO_LOSS_MASK_KEYS

__all__ = [
    "LagrangianLoss",
    "LagrangianMixin",
    "RatioStats",
    "VARIANCE_CENTERS",
    "at_least_float32",
    "check_bool_mask",
    "check_loss_input",
    "check_non_negative",
    "check_variance_center",
    "masked_mean",
    "merge_ratio_stats",
    "nan_without_valid",
    "reject_unknown_kwargs",
    "squared_deviation",
]

VARIANCE_CENTERS = ("mean", "one")
"""The centres of the ratio variance: the masked batch mean of the ratio (the central
second moment) or exactly 1 (the second moment about 1, Pearson's chi-square)."""

# the coefficients a user or a scheduler sets, and every buffer kept in float32 or wider
_NON_NEGATIVE_COEFFS = ("lagrange_multiplier", "ratio_var_target")
_DUAL_BUFFERS = (*_NON_NEGATIVE_COEFFS, "last_ratio_var", "last_ratio_sums")


# ------------------------------------------------------------------ ratio statistics


class RatioStats(NamedTuple):
    r"""The sufficient statistics of the importance ratio ``r`` over the valid positions.

    .. code-block:: text

        count        = n      = number of valid positions (their total weight, weighted)
        ratio_sum    = S1     = sum r                     (sum w r)
        ratio_sq_sum = S2     = sum r^2                   (sum w r^2)
        mean         = S1 / n
        variance(c)  = S2 / n - 2 c S1 / n + c^2      (the (weighted) mean of (r - c)^2)

    With weights ``w`` (:meth:`of`'s ``weight``) the statistics are the self-normalised
    weighted ones: ``mean = sum w r / sum w``.

    The fields add up across micro-batches, so the statistics of a whole batch are exact
    (not a mean of micro-batch means) whatever the split. The sums are float64; the
    count keeps its dtype. A loss stores the fields of its last forward call packed in
    one float64 buffer: :meth:`pack` and :meth:`unpack` are the only places that know
    the order.

    Examples:
        >>> import torch
        >>> from torchrl_r2vpo.objectives.ratio_variance import RatioStats
        >>> r = torch.tensor([1.0, 1.2, 0.8, 1.4], dtype=torch.float64)
        >>> both = RatioStats.total([RatioStats.of(r[:3]), RatioStats.of(r[3:])])
        >>> float(both.mean), round(float(both.variance("mean")), 6)
        (1.1, 0.05)
        >>> both.pack()  # count, sum, sum of squares
        tensor([4.0000, 4.4000, 5.0400], dtype=torch.float64)
        >>> RatioStats.unpack(both.pack()).ratio_sum
        tensor(4.4000, dtype=torch.float64)
    """

    count: torch.Tensor
    ratio_sum: torch.Tensor
    ratio_sq_sum: torch.Tensor

    @classmethod
    def of(cls, ratio: torch.Tensor, mask: torch.Tensor | None = None,
           weight: torch.Tensor | None = None) -> RatioStats:
        """The detached statistics of ``ratio`` over the positions where ``mask`` is
        ``True`` (all if ``None``); masked-out values are selected away. ``weight``
        (shaped as ``ratio``, ``>= 0``) weighs each position: ``count`` is then the
        weights' sum (float64)."""
        valid = ratio.detach().to(torch.float64)
        if mask is None:
            count = valid.new_tensor(valid.numel())
        else:
            valid, count = torch.where(expand_as_right(mask, valid), valid, 0), mask.sum()
        if weight is None:
            return cls(count, valid.sum(), valid.pow(2).sum())
        weight = weight.detach().to(torch.float64).expand_as(valid)
        if mask is not None:
            weight = torch.where(expand_as_right(mask, weight), weight, 0)
        return cls(weight.sum(), (weight * valid).sum(), (weight * valid.pow(2)).sum())

    @classmethod
    def from_output(cls, output: Any) -> RatioStats:
        """Reads ``num_tokens`` (or ``ratio_weight_sum``, the count of weighted
        statistics, when the output has it), ``ratio_sum`` and ``ratio_sq_sum`` (detached)
        from a loss output: a TensorClass, a TensorDict or a mapping."""
        values = []
        weight_sum = output.get("ratio_weight_sum", None)
        for key in ("num_tokens", "ratio_sum", "ratio_sq_sum"):
            value = output.get(key, None) if key != "num_tokens" or weight_sum is None else weight_sum
            if value is None:
                raise KeyError(
                    f"merge_ratio_stats needs {key!r} in each output; R2VPOLLMLoss "
                    "outputs carry it."
                )
            values.append(value.detach())
        return cls(*values)

    @classmethod
    def total(cls, stats: Iterable[RatioStats]) -> RatioStats:
        """The statistics of the union of disjoint sets of positions (sums in float64)."""
        count = ratio_sum = ratio_sq_sum = None
        for part in stats:
            if count is None:
                count, ratio_sum, ratio_sq_sum = (
                    part.count, part.ratio_sum.double(), part.ratio_sq_sum.double())
            else:
                count = count + part.count
                ratio_sum = ratio_sum + part.ratio_sum.double()
                ratio_sq_sum = ratio_sq_sum + part.ratio_sq_sum.double()
        if count is None:
            raise ValueError("RatioStats.total needs at least one set of statistics.")
        return cls(count, ratio_sum, ratio_sq_sum)

    def pack(self) -> torch.Tensor:
        """The fields as one float64 vector ``[count, ratio_sum, ratio_sq_sum]``."""
        return torch.stack([field.to(torch.float64) for field in self])

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> RatioStats:
        """The inverse of :meth:`pack`."""
        return cls(*packed.unbind(-1))

    @property
    def mean(self) -> torch.Tensor:
        """``S1 / n`` (float64); 0 without valid positions."""
        count = self.count.to(torch.float64)
        return torch.where(count > 0, self.ratio_sum / count.clamp_min(1e-300), 0.0)

    def variance(self, center: Literal["mean", "one"] | torch.Tensor | float) -> torch.Tensor:
        """The mean of ``(r - c)^2`` over the valid positions (float64; NaN without any).

        Args:
            center: ``"mean"`` (``c`` is the mean ratio: the central second moment),
                ``"one"`` (``c = 1``) or a value of ``c``.
        """
        n = self.count.to(torch.float64).clamp_min(1e-300)
        mean, second = self.ratio_sum / n, self.ratio_sq_sum / n
        if isinstance(center, str):
            check_variance_center(center)
            c = mean if center == "mean" else torch.ones_like(mean)
        else:
            c = torch.as_tensor(center, device=mean.device).to(torch.float64)
        variance = (second - 2 * c * mean + c * c).clamp_min(0)
        return torch.where(self.count > 0, variance, float("nan"))


def merge_ratio_stats(
    outputs: Iterable[Any], *, variance_center: Literal["mean", "one"] = "mean"
) -> TensorDict:
    """Merges the ratio statistics of micro-batch outputs into the full batch's, exactly.

    Each :class:`~torchrl_r2vpo.R2VPOLLMLoss` output carries the sums
    ``ratio_sum = sum r``, ``ratio_sq_sum = sum r^2`` (float64) and the count
    ``num_tokens`` over its valid tokens. Adding them up gives the full-batch
    statistics, not a mean of micro-batch means:

    .. code-block:: text

        ratio_mean = sum_k ratio_sum_k / sum_k num_tokens_k
        ratio_var  = sum_k ratio_sq_sum_k / N - ratio_mean^2          ("mean")
                   = sum_k ratio_sq_sum_k / N - 2 ratio_mean + 1      ("one")

    The result does not depend on the centre each micro-batch used. Outputs of a loss
    with ``weighted_variance=True`` carry weighted sums and their total weight
    ``ratio_weight_sum``, which then takes ``num_tokens``' place as ``N``.

    Args:
        outputs (iterable): loss outputs (TensorClass, TensorDict or mapping)
            holding ``ratio_sum``, ``ratio_sq_sum`` and ``num_tokens``.

    Keyword Args:
        variance_center (str, optional): ``"mean"`` (central second moment) or
            ``"one"`` (second moment about 1), as the loss's. Defaults to ``"mean"``.

    Returns:
        A TensorDict with ``ratio_mean``, ``ratio_var`` (float64; NaN without
        valid tokens), ``ratio_sum``, ``ratio_sq_sum``, ``num_tokens`` and
        ``ratio_weight_sum`` (``N``: ``num_tokens`` unless weighted); step a
        :class:`~torchrl_r2vpo.DualVariableScheduler` on it directly, or pass
        ``ratio_mean`` to :meth:`~torchrl_r2vpo.R2VPOLLMLoss.accumulation`.

    Examples:
        >>> import torch
        >>> from torchrl_r2vpo.objectives.llm import merge_ratio_stats
        >>> def stats(r):
        ...     r = torch.tensor(r, dtype=torch.float64)
        ...     return {"ratio_sum": r.sum(), "ratio_sq_sum": (r ** 2).sum(), "num_tokens": torch.tensor(len(r))}
        >>> merged = merge_ratio_stats([stats([1.0, 1.2, 0.8]), stats([1.4])])
        >>> float(merged["ratio_mean"]), round(float(merged["ratio_var"]), 6)
        (1.1, 0.05)
    """
    check_variance_center(variance_center)
    outputs = list(outputs)
    parts = [RatioStats.from_output(out) for out in outputs]
    if not parts:
        raise ValueError("merge_ratio_stats needs at least one output.")
    stats = RatioStats.total(parts)
    counts = [out.get("num_tokens", None) for out in outputs]
    num_tokens = (sum(count.detach() for count in counts)
                  if all(count is not None for count in counts) else stats.count)
    return TensorDict(
        {
            "ratio_mean": torch.where(stats.count > 0, stats.mean, float("nan")),
            "ratio_var": stats.variance(variance_center),
            "ratio_sum": stats.ratio_sum,
            "ratio_sq_sum": stats.ratio_sq_sum,
            "num_tokens": num_tokens,
            "ratio_weight_sum": stats.count,
        }
    )


# ------------------------------------------------------------------ the loss state


@runtime_checkable
class LagrangianLoss(Protocol):
    """What :class:`~torchrl_r2vpo.DualVariableScheduler` and
    :class:`~torchrl_r2vpo.DualVariableSchedulerHook` read and write on a loss.

    :class:`LagrangianMixin` provides all of it; any other loss module with these
    members can be scheduled too.
    """

    lagrange_multiplier: torch.Tensor
    """The multiplier ``lambda``: a scalar buffer the scheduler updates in place."""
    ratio_var_target: torch.Tensor
    """The target ``delta`` (scalar), read at each step unless the scheduler has its own
    ``target``."""
    variance_center: str
    """One of :data:`VARIANCE_CENTERS`: how pooled :class:`RatioStats` become a
    variance."""
    last_ratio_var: torch.Tensor
    """The constraint statistic of the last forward call (NaN before the first one): what
    a scheduler stepped without argument reads."""

    @property
    def last_ratio_stats(self) -> RatioStats:
        """The :class:`RatioStats` of the last forward call, which the Trainer hook pools
        over the micro-batches of an optimiser step (optional: a loss without it is
        stepped on ``last_ratio_var``)."""
        ...


class LagrangianMixin:
    """The state R2VPO losses share: lambda and delta as float buffers (they follow ``.to()``
    and ``state_dict()``), their validation on assignment, and the statistics of the last
    forward call; it implements :class:`LagrangianLoss`.

    Placed before the :class:`~torchrl.objectives.LossModule` in the bases; the subclass
    calls :meth:`_check_dual_arguments` before and :meth:`_register_dual_buffers` after
    ``LossModule.__init__``; in ``forward`` it reads lambda through :meth:`_multiplier`
    (validated by :meth:`_check_multiplier` when it checks its input) and calls
    :meth:`_record_ratio_stats`.
    """

    _schedulable_buffers = frozenset(_NON_NEGATIVE_COEFFS)

    @staticmethod
    def _check_dual_arguments(ratio_var_target: float | None, kl_target: float | None,
                              lagrange_multiplier: float, variance_center: str) -> float:
        """Validates the arguments and returns delta (``2 * kl_target`` when that is given)."""
        if ratio_var_target is not None and kl_target is not None:
            raise ValueError(
                "Pass either ratio_var_target or kl_target (which sets "
                "ratio_var_target = 2 * kl_target), not both."
            )
        if kl_target is not None:
            check_non_negative("kl_target", kl_target)
            ratio_var_target = 2.0 * kl_target
        elif ratio_var_target is None:
            ratio_var_target = 0.02
        check_non_negative("ratio_var_target", ratio_var_target)
        check_non_negative("lagrange_multiplier", lagrange_multiplier)
        check_variance_center(variance_center)
        return ratio_var_target

    def _register_dual_buffers(self, ratio_var_target: float, lagrange_multiplier: float,
                               device: torch.device | None) -> None:
        dtype = torch.get_default_dtype()
        self.register_coeff_buffer(
            "ratio_var_target", float(ratio_var_target), device=device, dtype=dtype
        )
        self.register_coeff_buffer(
            "lagrange_multiplier", float(lagrange_multiplier), device=device, dtype=dtype
        )
        # The statistic a DualVariableScheduler reads when stepped without one, and the
        # RatioStats it came from, packed (float64), which pool exactly over
        # gradient-accumulation micro-batches (DualVariableSchedulerHook).
        # Not persistent: by-products of the last forward call, not state.
        self.register_buffer(
            "last_ratio_var", torch.full((), float("nan"), device=device), persistent=False
        )
        self.register_buffer(
            "last_ratio_sums", torch.zeros(3, dtype=torch.float64, device=device), persistent=False
        )
        self._lagrange_multiplier_init = float(lagrange_multiplier)

    @property
    def last_ratio_stats(self) -> RatioStats:
        """The :class:`RatioStats` of the last forward call (zeros before the first), read
        from the non-persistent ``last_ratio_sums`` buffer where they are packed."""
        return RatioStats.unpack(self.last_ratio_sums)

    def _apply(self, fn, *args, **kwargs):
        # lambda, delta and the recorded statistics keep float32 (or wider) when the module
        # goes to half precision: a dual step of 1e-3 vanishes against lambda = 1 in bfloat16
        kept = {name: self._buffers[name] for name in _DUAL_BUFFERS if name in self._buffers}
        module = super()._apply(fn, *args, **kwargs)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = before.to(after.device, torch.promote_types(before.dtype, torch.float32))
            elif name == "last_ratio_sums" and after.dtype != before.dtype:  # sums stay float64
                self._buffers[name] = before.to(after.device)
        return module

    def _multiplier(self) -> torch.Tensor:
        """``lambda`` as ``forward`` uses it: the buffer read within its bounds, NaN as 0,
        below 0 as 0, ``+inf`` as the largest finite value (no host synchronisation).

        An in-place write such as ``loss.lagrange_multiplier.fill_(-5.0)`` bypasses the
        check on assignment; it is then never used out of bounds, and
        :meth:`_check_multiplier` reports it."""
        return torch.nan_to_num(self.lagrange_multiplier, nan=0.0).clamp_min(0)

    def _multiplier_in_bounds(self) -> torch.Tensor:
        """A boolean scalar tensor: whether the ``lagrange_multiplier`` buffer is a finite
        number ``>= 0`` (no host synchronisation)."""
        lam = self.lagrange_multiplier
        return (torch.isfinite(lam) & (lam >= 0)).all()

    def _check_multiplier(self, in_bounds: bool) -> None:
        """Raises a ``ValueError`` unless ``in_bounds`` (:meth:`_multiplier_in_bounds`)."""
        if not in_bounds:
            raise ValueError(
                f"lagrange_multiplier is {self.lagrange_multiplier.item()}; it must be a finite "
                "number >= 0. An in-place write (e.g. loss.lagrange_multiplier.fill_(...)) "
                "bypasses the check on assignment: assign it instead "
                "(loss.lagrange_multiplier = value)."
            )

    @torch.no_grad()
    def _record_ratio_stats(self, ratio_var: torch.Tensor, stats: RatioStats) -> None:
        """Records ``ratio_var`` and the :class:`RatioStats` of the call."""
        self.last_ratio_var.copy_(ratio_var)
        self.last_ratio_sums.copy_(stats.pack())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in _NON_NEGATIVE_COEFFS:
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                check_non_negative(f"{prefix}{name} in the state_dict", float(value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __setattr__(self, name: str, value) -> None:
        if name in _NON_NEGATIVE_COEFFS and isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}.")
            value = value.item()  # then copied into the buffer, keeping its device and dtype
        if name in _NON_NEGATIVE_COEFFS and isinstance(value, (int, float)):
            check_non_negative(name, value)
        super().__setattr__(name, value)

    def reset(self) -> None:
        """Restores the initial Lagrange multiplier."""
        self.lagrange_multiplier = self._lagrange_multiplier_init


# ------------------------------------------------------------------ shared numerics


def masked_mean(value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``value`` over the positions where ``mask`` is ``True`` (all if ``None``).

    Masked-out positions are selected away, not multiplied by zero, so that
    non-finite padding cannot leak into the result.
    """
    if mask is None:
        return value.mean()
    value = torch.where(mask, value, torch.zeros_like(value))
    return value.sum() / mask.sum().clamp_min(1)


class SquaredDeviation(torch.autograd.Function):
    """``(r - c)^2`` with ``c`` constant, saving only ``r`` for backward (and usable
    under ``torch.func``: ``grad``, ``vmap``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(ratio: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        return (ratio - center).pow(2)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ratio, center = ctx.saved_tensors
        return grad * 2 * (ratio - center), None


def squared_deviation(ratio: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``(ratio - center)^2``, differentiable in ``ratio`` only (``center`` is detached),
    keeping only ``ratio`` (already saved by ``exp``) alive for backward."""
    return SquaredDeviation.apply(ratio, center.detach())


def at_least_float32(value: torch.Tensor) -> torch.Tensor:
    """``value`` in float32 if it is in a narrower floating dtype (bfloat16, float16)."""
    return value.to(torch.promote_types(value.dtype, torch.float32))


def check_non_negative(name: str, value: float) -> None:
    """Raises a ``ValueError`` unless ``value`` is a finite number ``>= 0``."""
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}.")


def check_variance_center(variance_center: str) -> None:
    """Raises a ``ValueError`` unless ``variance_center`` is in :data:`VARIANCE_CENTERS`."""
    if variance_center not in VARIANCE_CENTERS:
        raise ValueError(
            f"variance_center must be one of {VARIANCE_CENTERS}, got {variance_center!r}."
        )


def reject_unknown_kwargs(name: str, base: type, kwargs: dict) -> None:
    """TorchRL's losses take ``**kwargs`` and ignore what they do not know; a misspelt
    argument raises here instead of leaving a default in place."""
    known = inspect.signature(base.__init__).parameters
    unknown = sorted(key for key in kwargs if key not in known)
    if unknown:
        raise TypeError(f"{name} got unexpected keyword argument(s): {', '.join(unknown)}.")


def nan_without_valid(values: Any, any_valid: torch.Tensor, keys: Iterable[str]) -> None:
    """Sets each of the statistics ``keys`` present in ``values`` (a TensorDict or a loss
    output TensorClass) to NaN where ``any_valid`` is ``False``, in place: with no valid
    position there is no statistic. No host synchronisation."""
    for key in keys:
        value = values.get(key, None)
        if value is not None:
            values.set(key, torch.where(any_valid, value, float("nan")))


def check_bool_mask(loss: Any, tensordict: TensorDictBase, key: NestedKey, what: str) -> None:
    """Raises a ``TypeError`` if the entry ``key`` of ``tensordict`` (``what``, for the
    message) is present and not a boolean tensor."""
    mask = tensordict.get(key, None)
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        raise TypeError(
            f"{type(loss).__name__}: {what} {key!r} must be a bool tensor, got {mask.dtype}; "
            "convert it with .bool()."
        )


def check_loss_input(loss: Any, tensordict: TensorDictBase, required: dict[str, str]) -> None:
    """Raises a clear error for an input ``loss`` cannot read, from metadata alone (no host
    synchronisation).

    * an empty batch: ``ValueError``;
    * a missing entry: ``KeyError`` naming it and its ``tensor_keys`` field; ``required``
      maps each field the loss needs to what that entry holds;
    * a validity mask (an entry the loss's ``loss_mask_key`` selects, e.g.
      ``("collector", "mask")``) that is not boolean: ``TypeError``.
    """
    name = type(loss).__name__
    if tensordict.batch_size.numel() == 0:
        raise ValueError(
            f"{name} got an empty batch (batch size {tuple(tensordict.batch_size)}): there is "
            "no sample to compute a loss on."
        )
    for field, expected in required.items():
        keys = getattr(loss.tensor_keys, field)
        for key in keys if isinstance(keys, list) else [keys]:
            if key not in tensordict:
                raise KeyError(
                    f"{name} needs {key!r} in its input (tensor_keys.{field}: {expected})."
                )
    mask_key = loss.loss_mask_key
    if mask_key == "auto":
        mask_keys = AUTO_LOSS_MASK_KEYS
    else:
        mask_keys = () if mask_key is None else (mask_key,)
    for key in mask_keys:
        check_bool_mask(loss, tensordict, key, "the validity mask (loss_mask_key)")
