"""The one module that touches TorchRL's private internals (and would hold TensorDict's,
of which the package needs none).

The package pins ``torchrl==0.14.1``. Each function here wraps one private name of
TorchRL, says which shape of it it expects, and, where TorchRL's main branch already
changed that shape, accepts both. ``tests/test_compat.py`` fails loudly when a TorchRL
release changes one of them; fix the adapter here, not its callers.

Besides the names wrapped below, the losses override (or call from their overrides)
the protected steps of TorchRL's loss pipelines, the extension points TorchRL's own
subclasses use: :data:`PROTECTED_HOOKS` lists them, and ``tests/test_compat.py``
checks that they still exist.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torchrl._utils import compile_with_warmup
from torchrl.envs.libs.jax_utils import (
    _ndarray_to_tensor as ndarray_to_tensor,
    _tensor_to_ndarray as tensor_to_ndarray,
)
from torchrl.objectives import LossModule
from torchrl.objectives.ppo import (
    _broadcast_advantage_to_log_weight,
    _check_advantage_broadcast,
)
from torchrl.objectives.utils import _maybe_get_or_select, _sum_td_features

try:
    from torch.compiler import is_dynamo_compiling
except ImportError:  # torch < 2.3
    from torch._dynamo import is_compiling as is_dynamo_compiling

__all__ = [
    "CURRENT_LOG_PROB_KEY",
    "GRPOLogWeight",
    "PPOLogWeight",
    "PROTECTED_HOOKS",
    "accumulation_window_closed",
    "broadcast_advantage_to_log_weight",
    "check_advantage_broadcast",
    "compile_with_warmup",
    "grpo_log_weight",
    "input_validity_mask",
    "is_dynamo_compiling",
    "log_clip_bounds",
    "maybe_get_or_select",
    "maybe_normalize_advantage",
    "ndarray_to_tensor",
    "optimizer_step_count",
    "ppo_log_weight",
    "reduce_loss",
    "sum_td_features",
    "tensor_to_ndarray",
]

# Re-exported as they are (TorchRL 0.14.1):
#   compile_with_warmup(*args, warmup=1, **kwargs)  from torchrl._utils: torch.compile
#       that runs the first ``warmup`` calls eagerly.
#   ndarray_to_tensor(value), tensor_to_ndarray(value)  from
#       torchrl.envs.libs.jax_utils (_ndarray_to_tensor, _tensor_to_ndarray): DLPack
#       conversions between JAX/NumPy arrays and torch tensors; jax is imported lazily.
#   is_dynamo_compiling()  torch.compiler's (TorchRL re-exports the same function from
#       torchrl.modules.distributions.utils).

PROTECTED_HOOKS: dict[str, tuple[str, ...]] = {
    # the PPOLoss.forward pipeline that R2VPOLoss.forward follows step by step
    "torchrl.objectives.PPOLoss": (
        "_log_weight",
        "_get_cur_log_prob",
        "_get_entropy",
        "_weighted_loss_entropy",
        "_standardize_advantage",
        "_critic_loss_inputs",
        "_clear_weakrefs",
        "_cached_critic_network_params_detached",
        "_has_critic",
        "_out_keys",
    ),
    # the GRPOLoss.forward pipeline the LLM losses override one step at a time
    "torchrl.objectives.llm.GRPOLoss": (
        "_log_weight",
        "_get_cur_log_prob",
        "_get_entropy",
        "_compute_policy_objective",
        "_aggregate_loss_value",
        "_kl_to_ref",
        "_clip_bounds",
    ),
    "torchrl.objectives.LossModule": (
        "_reduce_loss",
        "_loss_mask_keys",
        "_expand_loss_mask",
    ),
}
"""The protected members of TorchRL's loss classes that the losses here override or
call from their overrides, by class."""


# ------------------------------------------------------------------ loss internals


class PPOLogWeight(NamedTuple):
    """What :meth:`torchrl.objectives.PPOLoss._log_weight` returns, by name."""

    log_weight: torch.Tensor
    """``log(pi_theta / pi_prox)``, shaped ``[*adv_shape, 1]``: the ratio the trust
    region acts on (``pi_prox`` is the behaviour policy, or the delayed actor with
    ``delay_actor=True``)."""
    dist: Any
    """The current policy's distribution."""
    kl_approx: torch.Tensor
    """``log(pi_prox / pi_theta)``, a diagnostic."""
    log_is_weight: torch.Tensor | None
    """``log(pi_prox / pi_behaviour)``, capped by ``max_importance_ratio``: the
    gradient-free correction that turns ``log_weight`` into the behaviour ratio;
    ``None`` when the two coincide."""


def ppo_log_weight(
    loss: Any, tensordict: TensorDictBase, adv_shape: torch.Size
) -> PPOLogWeight:
    """Calls ``loss._log_weight(tensordict, adv_shape=adv_shape)`` of a PPOLoss.

    TorchRL 0.14 returns the 4-tuple ``(log_weight, dist, kl_approx, log_is_weight)``;
    TorchRL main returns ``(log_weight, dist, kl_approx)``, read here as
    ``log_is_weight=None`` (no delayed actor, no ratio cap).

    Args:
        loss: a :class:`~torchrl.objectives.PPOLoss`, or ``super()`` inside a subclass.
        tensordict (TensorDictBase): the loss input.
        adv_shape (torch.Size): the advantage's shape without its last dimension.
    """
    out = loss._log_weight(tensordict, adv_shape=adv_shape)
    if len(out) == 3:
        return PPOLogWeight(*out, None)
    return PPOLogWeight(*out)


CURRENT_LOG_PROB_KEY = "_cur_log_prob"
"""The entry where ``GRPOLoss._log_weight`` leaves the current policy's per-token
log-probability ``[N, L]`` (0 at masked tokens) for its KL terms (TorchRL 0.14 and main)."""


class GRPOLogWeight(NamedTuple):
    """What :meth:`torchrl.objectives.llm.GRPOLoss._log_weight` returns, by name."""

    log_weight: torch.Tensor
    """``log(pi_theta / pi_behaviour)`` per token, ``[N, L, 1]``, 0 at masked tokens."""
    dist: Any
    """The current policy's token distribution (an ``LLMMaskedCategorical``)."""
    kl_approx: torch.Tensor
    """``log(pi_behaviour / pi_theta)`` per token, a diagnostic."""
    mask: torch.Tensor
    """``[N, L]`` booleans: the tokens the loss scores."""


def grpo_log_weight(
    loss: Any, tensordict: TensorDictBase, adv_shape: torch.Size
) -> GRPOLogWeight:
    """Calls ``loss._log_weight(tensordict, adv_shape)`` of a GRPOLoss.

    TorchRL 0.14 returns ``(log_weight, dist, kl_approx, mask)``, with ``mask`` the
    distribution's mask and the tokens whose stored log-probability is finite; TorchRL
    main returns ``(log_weight, dist, kl_approx)``, whose mask is ``dist.mask``. Both
    store the current log-probability in ``tensordict`` under
    :data:`CURRENT_LOG_PROB_KEY`.

    Args:
        loss: a :class:`~torchrl.objectives.llm.GRPOLoss`, or ``super()`` inside an
            override of ``_log_weight``.
        tensordict (TensorDictBase): the loss input.
        adv_shape (torch.Size): the advantage's shape without its last dimension.
    """
    out = loss._log_weight(tensordict, adv_shape)
    if len(out) == 3:
        log_weight, dist, kl_approx = out
        return GRPOLogWeight(log_weight, dist, kl_approx, dist.mask)
    return GRPOLogWeight(*out)


def maybe_normalize_advantage(
    loss: Any, advantage: torch.Tensor, tensordict: TensorDictBase, *, update_norm: bool
) -> torch.Tensor:
    """PPOLoss's advantage normalisation step.

    TorchRL 0.14 has ``PPOLoss._maybe_normalize_advantage(advantage, tensordict, *,
    update_norm)``, which also applies ``advantage_norm``; TorchRL main inlines the
    plain ``normalize_advantage`` standardisation in ``forward``, reproduced here when
    the method is missing.
    """
    method = getattr(loss, "_maybe_normalize_advantage", None)
    if method is not None:
        return method(advantage, tensordict, update_norm=update_norm)
    if loss.normalize_advantage and advantage.numel() > 1:
        advantage = loss._standardize_advantage(advantage, tensordict)
    return advantage


def broadcast_advantage_to_log_weight(
    advantage: torch.Tensor, log_weight: torch.Tensor
) -> torch.Tensor:
    """``torchrl.objectives.ppo._broadcast_advantage_to_log_weight`` (TorchRL 0.14):
    expands a per-decision advantage ``[*B, 1]`` over the extra token dimensions of a
    log-weight ``[*B, *T, 1]``; a no-op when the shapes already match."""
    return _broadcast_advantage_to_log_weight(advantage, log_weight)


def check_advantage_broadcast(advantage: torch.Tensor, log_weight: torch.Tensor) -> None:
    """``torchrl.objectives.ppo._check_advantage_broadcast`` (TorchRL 0.14): raises a
    ``ValueError`` when advantage and log-weight would broadcast to an outer product
    (e.g. a ``[B]`` advantage against a ``[B, 1]`` log-weight)."""
    _check_advantage_broadcast(advantage, log_weight)


def maybe_get_or_select(
    tensordict: TensorDictBase, key: NestedKey | list, target_shape: torch.Size | None = None
) -> Any:
    """``torchrl.objectives.utils._maybe_get_or_select`` (TorchRL 0.14): the entry at
    ``key`` (a tensor or, for a composite log-probability, a TensorDict), or a
    selection of several keys, reshaped to ``target_shape``; ``None`` if missing."""
    return _maybe_get_or_select(tensordict, key, target_shape)


def sum_td_features(data: TensorDictBase) -> torch.Tensor:
    """``torchrl.objectives.utils._sum_td_features`` (TorchRL 0.14): the sum of a
    composite log-probability (or entropy) over its leaves and feature dimensions."""
    return _sum_td_features(data)


def input_validity_mask(
    loss: LossModule, tensordict: TensorDictBase, like: torch.Tensor
) -> torch.Tensor | None:
    """The validity masks the input carries for ``loss``, combined and expanded to
    ``like``; ``None`` if it carries none.

    These are the entries ``LossModule._reduce_loss`` masks with: those under the
    loss's ``loss_mask_key`` (by default ``("collector", "mask")`` and
    ``"shifted_valid"``), read through ``LossModule._loss_mask_keys()`` and expanded
    with ``LossModule._expand_loss_mask(mask, like)`` (TorchRL 0.14).
    """
    mask = None
    for key in loss._loss_mask_keys():
        entry = tensordict.get(key, default=None)
        if entry is not None:
            entry = loss._expand_loss_mask(entry, like)
            mask = entry if mask is None else mask & entry
    return mask


def reduce_loss(
    loss: LossModule,
    value: torch.Tensor,
    tensordict: TensorDictBase | None = None,
    *,
    reduction: str | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``LossModule._reduce_loss(value, tensordict, *, mask, reduction)`` (TorchRL 0.14):
    reduces ``value`` with ``reduction`` (the loss's by default) over the positions the
    input's validity masks and ``mask`` keep, selecting the others away."""
    return loss._reduce_loss(value, tensordict, mask=mask, reduction=reduction)


def log_clip_bounds(loss: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``GRPOLoss._clip_bounds`` (TorchRL 0.14): ``(log(1 - eps_low), log(1 + eps_high))``,
    the band of the log-weight."""
    return loss._clip_bounds


# ------------------------------------------------------------------ trainer state


def optimizer_step_count(trainer: Any) -> int:
    """The number of optimiser steps a :class:`~torchrl.trainers.Trainer` has taken.

    The stepper's public ``optimizer_step_count`` when the trainer has one (TorchRL
    0.14's ``optimization_stepper``: it discounts accumulation micro-steps and skipped
    steps), else the trainer's ``_optim_count``, as TorchRL's own ``UpdateWeights``
    hook counts them.
    """
    stepper = getattr(trainer, "optimization_stepper", None)
    count = getattr(stepper, "optimizer_step_count", None)
    if count is None:
        count = trainer._optim_count
    return count


def accumulation_window_closed(trainer: Any) -> bool:
    """Whether the trainer's optimisation stepper sits at the boundary of a
    gradient-accumulation window (no micro-batch of a new window accumulated yet).

    Read from the stepper's ``_micro_step`` counter modulo its public
    ``gradient_accumulation_steps`` (TorchRL 0.14's ``DefaultOptimizationStepper`` and
    ``MixedPrecisionOptimizationStepper``, which reset the counter to 0 when they drop
    a window for a non-finite loss); ``False`` for a trainer without such a stepper.
    """
    stepper = getattr(trainer, "optimization_stepper", None)
    micro_step = getattr(stepper, "_micro_step", None)
    if micro_step is None:
        return False
    return micro_step % getattr(stepper, "gradient_accumulation_steps", 1) == 0
