"""R2VPO for language models, the LLM baselines in the same API, and exact
gradient accumulation over micro-batches.

Every loss here is a :class:`~torchrl.objectives.llm.GRPOLoss`: it reads the
same input TensorDict (tokens, masks, behaviour log-probs and an advantage),
scores it with the same actor (e.g. :class:`~torchrl.modules.llm.TransformersWrapper`
with ``generate=False``), masks and aggregates the per-token terms the same way,
and returns a :class:`~torchrl.objectives.llm.LLMLossOutput`. Only the per-token
objective differs, so comparisons between them are fair.

==========  ===========================  =====================================
registry    class                        per-token loss (``r = exp(log_weight)``)
==========  ===========================  =====================================
``r2vpo``   :class:`R2VPOLLMLoss`        ``-r A + lambda (r - rbar)^2``
``grpo``    :class:`GRPOLLMLoss`         ``-min(r A, clip(r, 1-e, 1+e) A)``
``grpo-ch`` :class:`DAPOLLMLoss`         same, ``e = (0.2, 0.28)`` (clip-higher)
``cispo``   :class:`CISPOLLMLoss`        ``-sg(clip(r)) A log pi``
``gppo``    :class:`GPPOLLMLoss`         PPO-clip value, ``(1 -+ e) A`` gradient outside
``topr``    :class:`TOPRLLMLoss`         ``-A log pi`` (A > 0), ``-sg(min(r, 1)) A log pi``
``spo``     :class:`SPOLLMLoss`          ``-[r A - |A| / (2 e) (r - 1)^2]``
==========  ===========================  =====================================

:func:`make_llm_loss` builds any of them by name.

**Gradient accumulation.** Every loss here has :meth:`~R2VPOLLMLoss.accumulation`,
a context manager that normalises each micro-batch by the *full* batch's
valid-token count (and, for R2VPO, centres the ratio on the full batch's mean),
so that the micro-batch gradients add up to the full-batch gradient exactly;
:func:`merge_ratio_stats` merges the micro-batch ratio statistics into the exact
full-batch ones from sums and counts, for :class:`~torchrl_r2vpo.DualVariableScheduler`.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import expand_as_right, NestedKey
from torchrl.modules.distributions.utils import is_dynamo_compiling
from torchrl.objectives.llm import CISPOLoss, DAPO, GRPOLoss, LLMLossOutput
from torchrl.objectives.llm.grpo import CISPOLossOutput, DAPOLossOutput, GRPOLossOutput

from torchrl_r2vpo.objectives.r2vpo import (
    _at_least_float32,
    _check_non_negative,
    _LagrangianMixin,
    _loss_validity_mask,
    _NON_NEGATIVE_COEFFS,
    _ratio_sums,
    _reject_unknown_kwargs,
)

__all__ = [
    "CISPOLLMLoss",
    "DAPOLLMLoss",
    "GPPOLLMLoss",
    "GRPOLLMLoss",
    "LLM_LOSSES",
    "R2VPOLLMLoss",
    "R2VPOLLMLossOutput",
    "SPOLLMLoss",
    "TOPRLLMLoss",
    "make_llm_loss",
    "merge_ratio_stats",
]

_VARIANCE_CENTERS = ("mean", "one")
_AGGREGATIONS = ("token_mean", "prompt_mean", "none")
_MASKING_STRATEGIES = ("sft", "rlhf", "generic")
# the entries TorchRL's LLM wrappers read and write (pad_output=True layout)
_PROMPT_KEY = ("tokens", "prompt")
_ATTENTION_MASK_KEY = ("masks", "all_attention_mask")
_ASSISTANT_MASK_KEY = ("masks", "all_assistant_mask")


@dataclass(frozen=True)
class _Accumulation:
    num_tokens: torch.Tensor | int | None
    num_sequences: torch.Tensor | int | None
    ratio_mean: torch.Tensor | float | None


class _AccumulationMixin:
    """What every loss here adds to :class:`~torchrl.objectives.llm.GRPOLoss`.

    Placed before GRPOLoss (or a subclass) in the bases. Outside
    :meth:`accumulation` it changes three things, the same for every loss:

    * tokens the loss leaves out (padding, a sequence dropped by the collector
      mask, a KL-masked token) have their log-weight and advantage set to 0
      before the per-token objective, so a non-finite value there cannot reach
      the gradient as ``0 * inf``;
    * a sequence dropped by the collector mask is left out of
      ``aggregation="prompt_mean"``'s mean over sequences, as if it were not in
      the batch;
    * the KL terms (``kl_to_ref_coeff``, ``kl_to_inference_coeff``) are
      aggregated over the valid tokens as the objective is, not averaged over
      every padded position as GRPOLoss does;
    * unknown keyword arguments raise a ``TypeError`` instead of being ignored.
    """

    _accumulation: _Accumulation | None = None
    # accumulation() needs num_tokens for prompt_mean too (a penalty that is a token mean)
    _token_mean_terms: bool = False

    def __init__(self, *args, **kwargs) -> None:
        aggregation = kwargs.get("aggregation") or "token_mean"
        if aggregation not in _AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}."
            )
        masking_strategy = kwargs.get("masking_strategy", "sft")
        if masking_strategy not in _MASKING_STRATEGIES:
            raise ValueError(
                f"masking_strategy must be one of {_MASKING_STRATEGIES}, got "
                f"{masking_strategy!r}."
            )
        super().__init__(*args, **kwargs)
        _reject_unknown_kwargs(type(self).__name__, GRPOLoss, kwargs)

    @contextlib.contextmanager
    def accumulation(
        self,
        num_tokens: int | torch.Tensor | None = None,
        *,
        num_sequences: int | torch.Tensor | None = None,
        ratio_mean: float | torch.Tensor | None = None,
    ) -> Iterator[_AccumulationMixin]:
        """Normalises every call inside the block by full-batch quantities.

        Splitting a batch into micro-batches and summing their losses gives the
        full-batch loss only if each micro-batch is divided by the *full*
        batch's normaliser; a mean of micro-batch means weighs tokens unequally.
        Inside this block each ``loss_*`` term is aggregated as

        .. code-block:: text

            token_mean:   sum over the micro-batch's valid tokens / num_tokens
            prompt_mean:  sum over its sequences of their token means / num_sequences

        so that ``sum_k loss(micro_batch_k)`` equals ``loss(batch)``, values and
        gradients, up to floating-point error. ``aggregation="none"`` is
        unaffected.

        **The contract.**

        * ``num_tokens`` is the number of valid tokens in the full batch:
          :meth:`count_tokens` computes it from the masks and the stored
          log-probabilities alone, without a forward pass, exactly as the loss
          masks them. ``num_sequences`` is the number of sequences in the full
          batch, those the collector mask drops excepted: :meth:`count_sequences`.
        * ``ratio_mean`` (used by :class:`R2VPOLLMLoss` with
          ``variance_center="mean"``, ignored by the other losses) is the
          full-batch masked mean of the current ratio. It depends on the
          current parameters, so it needs a forward pass: either a
          ``torch.no_grad()`` pass over the micro-batches merged with
          :func:`merge_ratio_stats` (exact; one extra forward), or the merged
          mean of the previous optimiser step (one step stale), or ``1.0`` on
          the first step on freshly collected data when the behaviour
          log-probabilities were computed by the trained model itself (then
          ``r == 1`` exactly). Without it, each micro-batch is centred on its
          own mean: the penalty becomes the pooled *within*-micro-batch
          variance, which misses the spread between micro-batch means, and the
          gradient differs from the full-batch one by ``2 lambda (m_k - m) / N``
          per token of micro-batch ``k``. ``variance_center="one"`` needs no
          centre and is exact.
        * Each micro-batch is scored with the same parameters.
          ``kl_mask_threshold`` is incompatible: its mask depends on the current
          policy.

        Args:
            num_tokens (int or Tensor, optional): the full batch's valid-token
                count. Required for ``aggregation="token_mean"``, and for
                :class:`R2VPOLLMLoss` (whose penalty is a token mean) with any.

        Keyword Args:
            num_sequences (int or Tensor, optional): the full batch's number of
                sequences the collector mask keeps. Required for
                ``aggregation="prompt_mean"``.
            ratio_mean (float or Tensor, optional): the full batch's masked mean
                ratio, the variance centre for :class:`R2VPOLLMLoss`.

        Tensors are used as given (no host synchronisation).
        """
        if self._accumulation is not None:
            raise RuntimeError("accumulation() blocks cannot be nested.")
        aggregation = self.aggregation
        if self.reduction != "none" and aggregation != "none":
            if (aggregation == "token_mean" or self._token_mean_terms) and num_tokens is None:
                raise ValueError(
                    f"accumulation() with aggregation={aggregation!r} needs num_tokens, "
                    "the full batch's valid-token count (see count_tokens())."
                )
            if aggregation == "prompt_mean" and num_sequences is None:
                raise ValueError(
                    "accumulation() with aggregation='prompt_mean' needs num_sequences, "
                    "the full batch's sequence count (see count_sequences())."
                )
        if self.kl_mask_threshold is not None and self.kl_mask_threshold > 0:
            raise ValueError(
                "accumulation() is not exact with kl_mask_threshold: the KL mask "
                "depends on the current policy, so the full batch's token count "
                "cannot be known in advance."
            )
        for name, value in (("num_tokens", num_tokens), ("num_sequences", num_sequences)):
            if isinstance(value, (int, float)) and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}.")
        self._accumulation = _Accumulation(num_tokens, num_sequences, ratio_mean)
        try:
            yield self
        finally:
            self._accumulation = None

    def token_mask(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The valid-token mask ``[N, L]`` the loss will use, without a forward pass.

        It follows :attr:`masking_strategy` as TorchRL's LLM wrappers do
        (``"sft"``: attended tokens past the padded prompt width; ``"rlhf"``:
        ``("masks", "all_assistant_mask")``; ``"generic"``: attended tokens)
        and drops tokens whose stored behaviour log-probability is not finite,
        as :meth:`~torchrl.objectives.llm.GRPOLoss._log_weight` does.
        """

        def padded(key, value):
            return tensordict.get(
                key, as_padded_tensor=True, padding_side="left", padding_value=value
            )

        if self.masking_strategy == "rlhf":
            mask = padded(_ASSISTANT_MASK_KEY, False)
            if mask is None:
                raise KeyError(f"masking_strategy='rlhf' needs {_ASSISTANT_MASK_KEY}.")
            mask = mask.bool()
        else:
            mask = padded(_ATTENTION_MASK_KEY, False)
            if mask is None:
                raise KeyError(f"masking_strategy={self.masking_strategy!r} needs {_ATTENTION_MASK_KEY}.")
            mask = mask.bool()
            if self.masking_strategy == "sft":
                prompt = padded(_PROMPT_KEY, -100)
                if prompt is None:
                    raise KeyError(f"masking_strategy='sft' needs {_PROMPT_KEY}.")
                mask = mask.clone()
                mask[..., : prompt.shape[-1]] = False
        log_prob = padded(self.tensor_keys.sample_log_prob, 0.0)
        if log_prob is None:
            raise KeyError(f"The behaviour log-probability {self.tensor_keys.sample_log_prob} is missing.")
        return self._with_loss_masks(tensordict, mask & torch.isfinite(log_prob))

    def _with_loss_masks(self, tensordict: TensorDictBase, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` and the validity masks the loss reduction applies (e.g. a sampler's
        ``("collector", "mask")``), so that counts and statistics cover the tokens the loss
        does."""
        valid = _loss_validity_mask(self, tensordict, mask)
        return mask if valid is None else mask & valid

    def count_tokens(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The number of valid tokens in ``tensordict``, as a scalar tensor (no sync)."""
        return self.token_mask(tensordict).sum()

    def count_sequences(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The number of sequences in ``tensordict`` that the collector mask (the loss's
        validity masks) keeps, as a scalar tensor (no sync): the batch size without one."""
        return self._kept_sequences(tensordict, self.token_mask(tensordict)).sum()

    def _kept_sequences(self, tensordict: TensorDictBase, mask: torch.Tensor) -> torch.Tensor:
        """``[N]`` booleans: the sequences the loss's validity masks keep (all without one)."""
        valid = _loss_validity_mask(self, tensordict, mask)
        return mask.new_ones(mask.shape[0]) if valid is None else valid.flatten(1).any(-1)

    def _apply_kl_mask(self, tensordict: TensorDictBase, mask: torch.Tensor) -> torch.Tensor:
        """GRPOLoss's optional KL-Mask: drops tokens with ``0.5 * (cur - behaviour)^2 > threshold``."""
        if self.kl_mask_threshold is None or not self.kl_mask_threshold > 0:
            return mask
        inference_log_prob = tensordict.get(
            self.tensor_keys.sample_log_prob,
            None,
            as_padded_tensor=True,
            padding_side="left",
            padding_value=0.0,
        )
        cur_log_prob = tensordict.get("_cur_log_prob", None)
        if inference_log_prob is None or cur_log_prob is None:
            return mask
        cur = torch.where(expand_as_right(mask, cur_log_prob), cur_log_prob, 0.0)
        inference = torch.where(expand_as_right(mask, inference_log_prob), inference_log_prob, 0.0)
        return mask & (0.5 * (cur - inference) ** 2 <= self.kl_mask_threshold)

    def _log_weight(self, tensordict: TensorDictBase, adv_shape: torch.Size):
        """GRPOLoss's, with the mask the loss reduces with (KL and collector masks
        included) and the log-weight set to 0 wherever that mask is ``False``."""
        log_weight, dist, kl_approx, mask = super()._log_weight(tensordict, adv_shape)
        mask = self._with_loss_masks(tensordict, self._apply_kl_mask(tensordict, mask))
        log_weight = torch.where(expand_as_right(mask, log_weight), log_weight, 0.0)
        return log_weight, dist, kl_approx, mask

    def _zero_masked_advantage(self, tensordict: TensorDictBase) -> TensorDictBase:
        """A shallow copy of ``tensordict`` whose advantage is 0 where no valid token
        uses it (padding, dropped sequences)."""
        tensordict = tensordict.copy()
        advantage = tensordict.get(self.tensor_keys.advantage, None, as_padded_tensor=True)
        if advantage is None or advantage.ndim < 2:
            return tensordict  # missing or malformed: forward says so
        mask = self.token_mask(tensordict)
        if advantage.shape[-2] == 1:  # one value per sequence
            mask = mask.any(-1, keepdim=True)
        if mask.shape != advantage.shape[:-1]:
            return tensordict
        advantage = torch.where(expand_as_right(mask, advantage), advantage, 0.0)
        tensordict.set(self.tensor_keys.advantage, advantage)
        return tensordict

    def forward(self, tensordict: TensorDictBase) -> LLMLossOutput:
        return super().forward(self._zero_masked_advantage(tensordict))

    def _token_mean(
        self, value: torch.Tensor, mask: torch.Tensor, tensordict: TensorDictBase | None = None
    ) -> torch.Tensor:
        """The mean of ``value`` over the valid tokens (over the full batch's, inside
        :meth:`accumulation`), whatever :attr:`aggregation` is."""
        mask_exp = expand_as_right(mask, value)
        acc = self._accumulation
        if acc is None:
            return self._reduce_loss(
                value, tensordict=tensordict, reduction="mean", mask=mask_exp
            ).squeeze(-1)
        total = self._reduce_loss(value, tensordict=tensordict, reduction="sum", mask=mask_exp)
        return total / acc.num_tokens

    def _aggregate_loss_value(
        self,
        value: torch.Tensor,
        mask: torch.Tensor,
        tensordict: TensorDictBase | None = None,
    ) -> torch.Tensor:
        if self.aggregation == "none" or self.reduction == "none":
            return super()._aggregate_loss_value(value, mask, tensordict=tensordict)
        if self.aggregation == "token_mean":
            return self._token_mean(value, mask, tensordict)
        # prompt_mean: each sequence's token mean (selected, not multiplied: padding may
        # hold inf), averaged over the sequences the collector mask keeps
        mask_exp = expand_as_right(mask, value)
        value = torch.where(mask_exp, value, torch.zeros_like(value))
        token_count = mask_exp.sum(dim=-2).clamp_min(1)
        acc = self._accumulation
        if acc is None:
            num_sequences = self._kept_sequences(tensordict, mask).sum().clamp_min(1)
        else:
            num_sequences = acc.num_sequences
        return (value.sum(dim=-2) / token_count).sum(dim=0) / num_sequences

    def _kl_to_ref(
        self,
        tensordict: TensorDictBase,
        key: NestedKey = ("next", "ref_log_probs"),
        ref_log_prob: torch.Tensor | None = None,
        coeff: float | None = None,
        mask: torch.Tensor | None = None,
        dist=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GRPOLoss's k3 estimate of the KL to the reference (or inference) policy, per
        valid token, aggregated as the objective is (GRPO's mean over each completion's
        tokens with ``prompt_mean``), with its mean over this call's valid tokens as
        diagnostic.

        GRPOLoss averages it over every padded position instead, so that its weight
        shrinks as the batch's padding grows.
        """
        if coeff is None:
            coeff = self.kl_to_ref_coeff
        cur_log_prob = tensordict.get("_cur_log_prob")
        if ref_log_prob is None:
            ref_log_prob = tensordict.get(
                key, as_padded_tensor=True, padding_side=self.ref_log_prob_padding_side,
                padding_value=self.ref_log_prob_padding_value)
            if ref_log_prob is None:
                raise KeyError(f"The reference log-probability {key} is missing.")
            if ref_log_prob.ndim == cur_log_prob.ndim + 1:
                ref_log_prob = ref_log_prob.squeeze(-1)
        if ref_log_prob.shape != cur_log_prob.shape:
            raise ValueError(f"The reference log-probability {key} has shape "
                             f"{tuple(ref_log_prob.shape)}, the current one {tuple(cur_log_prob.shape)}.")
        if mask is None:
            mask = torch.ones_like(cur_log_prob, dtype=torch.bool)
        diff = torch.where(expand_as_right(mask, cur_log_prob), ref_log_prob - cur_log_prob, 0.0)
        k3 = (diff.expm1() - diff).unsqueeze(-1)
        valid = expand_as_right(mask, k3)  # the diagnostic: this call's tokens, also inside accumulation()
        kl = torch.where(valid, k3.detach(), 0.0).sum() / valid.sum().clamp_min(1)
        return coeff * self._aggregate_loss_value(k3, mask, tensordict), kl


# --------------------------------------------------------------------------- R2VPO


class R2VPOLLMLossOutput(LLMLossOutput):
    """Output of :class:`R2VPOLLMLoss`.

    Adds to :class:`~torchrl.objectives.llm.LLMLossOutput` the penalty
    ``loss_ratio_var``, the constraint statistic ``ratio_var``, the multiplier,
    ratio diagnostics, and the detached sufficient statistics (``ratio_sum``,
    ``ratio_sq_sum`` in float64, ``num_tokens``) that :func:`merge_ratio_stats`
    adds up across micro-batches.
    """

    loss_ratio_var: torch.Tensor | None = None
    ratio_var: torch.Tensor | None = None
    lagrange_multiplier: torch.Tensor | None = None
    ratio_sum: torch.Tensor | None = None
    ratio_sq_sum: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    mean_ratio: torch.Tensor | None = None
    max_ratio: torch.Tensor | None = None


class R2VPOLLMLoss(_LagrangianMixin, _AccumulationMixin, GRPOLoss):
    r"""Token-level Ratio-Variance Regularized Policy Optimization (R2VPO) loss.

    R2VPO replaces GRPO's ratio clipping by a constraint on the variance of the
    per-token importance ratio ``r = pi_theta(y_t | x, y_<t) / pi_b(y_t | x, y_<t)``,
    enforced with a Lagrange multiplier ``lambda >= 0``:

    .. code-block:: text

        maximise    E_b[r * A]
        subject to  V = E_b[(r - rbar)^2] <= delta

        per token:  loss_objective = -r * A
                    loss_ratio_var = lambda * (r - rbar)^2         (lambda held fixed)

    Both terms are aggregated like every GRPOLoss term (``aggregation``:
    ``"token_mean"``, ``"prompt_mean"`` or ``"none"``). ``rbar`` is the detached
    mean of ``r`` over the valid tokens of the batch (``variance_center="mean"``,
    the default) or exactly 1 (``"one"``). Masked tokens (prompt, padding, and
    tokens with a non-finite behaviour log-probability) have ``r = 1`` inside
    GRPOLoss; they never enter ``rbar``, the variance or the loss. With
    ``token_mean`` over ``N`` valid tokens the gradient with respect to a
    token's log-probability is

    .. code-block:: text

        d loss / d log pi_theta(y_t) = -(r_t / N) * (A - 2 * lambda * (r_t - rbar))

    the *effective advantage* ``A - 2 lambda (r - rbar)``: where GRPO's clip
    zeroes a token's gradient outside ``[1 - eps, 1 + eps]``, this push shrinks
    linearly and reverses past ``r - rbar = A / (2 lambda)``. With
    ``lambda = 0`` the loss is GRPO's unclipped surrogate ``-mean(r A)``.

    The loss owns ``lambda`` (the ``lagrange_multiplier`` buffer) and the target
    ``delta`` (``ratio_var_target``), both saved in the ``state_dict``, but never
    updates them: :class:`~torchrl_r2vpo.DualVariableScheduler` does, from the
    ``ratio_var`` the loss reports (the LLM setting uses this adaptive dual
    variable). ``forward`` is pure apart from the ``last_ratio_var`` and
    ``last_ratio_sums`` records.

    An optional KL penalty to a reference model uses GRPOLoss's
    ``kl_to_ref_coeff`` (k3 estimator, reference log-probs under
    ``("next", "ref_log_probs", "full")``), aggregated over the valid tokens.

    Reference: "Ratio-Variance Regularized Policy Optimization", Luo et al.,
    ICML 2026, https://arxiv.org/abs/2605.26784 (LLM companion:
    https://arxiv.org/abs/2601.03320).

    Args:
        actor_network (LLMWrapperBase): the policy scorer, e.g.
            ``TransformersWrapper(model, tokenizer=..., input_mode="tokens",
            generate=False, pad_output=True)``.

    Keyword Args:
        ratio_var_target (float, optional): the variance target ``delta`` read
            by the scheduler. Defaults to ``0.02`` (a KL budget of 0.01).
        kl_target (float, optional): a KL budget; sets ``ratio_var_target`` to
            ``2 * kl_target``. Exclusive with ``ratio_var_target``.
        lagrange_multiplier (float, optional): the initial ``lambda``.
            Defaults to ``0.5``.
        variance_center (str, optional): ``"mean"`` or ``"one"``. Defaults to
            ``"mean"``.
        diagnostic_clip_epsilon (float or tuple, optional): the band used only
            for ``clip_fraction`` (stored as GRPOLoss's ``clip_epsilon_low`` /
            ``clip_epsilon_high`` buffers; R2VPO itself never clips). Defaults
            to ``0.2``.
        check_finite (bool, optional): raise on a non-finite ratio or advantage
            at a valid token (one host synchronisation per call; skipped under
            ``torch.compile``). Defaults to ``True``.
        **kwargs: every other :class:`~torchrl.objectives.llm.GRPOLoss` keyword
            argument (``aggregation``, ``masking_strategy``, ``entropy_bonus``,
            ``entropy_coeff``, ``kl_to_ref_coeff``, ``kl_to_inference_coeff``,
            ``kl_mask_threshold``, ``device``, ...), except ``clip_epsilon``.

    The output (:class:`R2VPOLLMLossOutput`) holds ``loss_objective``,
    ``loss_ratio_var`` and, when enabled, ``loss_entropy`` and the KL losses
    (trainers sum the ``loss_*`` entries), plus detached diagnostics: the ones
    GRPOLoss reports, with GRPOLoss's definitions so that tables compare like
    with like (``clip_fraction``, ``kl_approx``, ``entropy``, ``ESS``), and
    R2VPO's own, all over valid tokens only: ``ratio_var`` (the mean of
    ``(r - rbar)^2``, NaN without valid tokens), ``lagrange_multiplier``,
    ``mean_ratio``, ``max_ratio`` and the sufficient statistics ``ratio_sum``,
    ``ratio_sq_sum`` (float64) and ``num_tokens`` for :func:`merge_ratio_stats`.
    ``ratio_var`` is a token-level statistic for every ``aggregation``, and
    ``loss_ratio_var`` is ``lambda * ratio_var`` for every one too (``prompt_mean``
    weighs the objective per sequence, the constraint stays on tokens). Each
    call also records ``ratio_var`` in the non-persistent ``last_ratio_var``
    buffer, which a scheduler stepped without argument reads, and the sums in
    ``last_ratio_sums`` (count, sum, sum of squares).

    .. note:: Step :class:`~torchrl_r2vpo.DualVariableScheduler` on the
       output (or ``output.ratio_var``) after a single-batch update, on the
       :func:`merge_ratio_stats` of the micro-batch outputs after an
       accumulated one, or with no argument (``last_ratio_var``, the last
       micro-batch's own statistic only). In a TorchRL ``Trainer``,
       :class:`~torchrl_r2vpo.DualVariableSchedulerHook` with
       ``interval="optim"`` pools the micro-batches of each optimiser step itself.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.modules.distributions import LLMMaskedCategorical
        >>> from torchrl_r2vpo.objectives.llm import R2VPOLLMLoss
        >>> class Scorer(torch.nn.Module):  # a stand-in for TransformersWrapper
        ...     def __init__(self, vocab=8, length=6):
        ...         super().__init__()
        ...         self.logits = torch.nn.Parameter(torch.randn(length, vocab))
        ...     def get_dist(self, td, **kwargs):
        ...         mask = td["masks", "all_assistant_mask"]
        ...         return LLMMaskedCategorical(logits=self.logits.expand(*mask.shape, -1), mask=mask)
        >>> _ = torch.manual_seed(0)
        >>> actor = Scorer()
        >>> loss = R2VPOLLMLoss(actor, lagrange_multiplier=1.0, masking_strategy="rlhf",
        ...                     entropy_bonus=False)
        >>> tokens = torch.randint(8, (2, 6))
        >>> assistant = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
        >>> behaviour = torch.where(assistant, torch.randn(2, 6) - 2, 0.0)
        >>> data = TensorDict({
        ...     ("tokens", "full"): tokens,
        ...     ("masks", "all_assistant_mask"): assistant,
        ...     ("log_probs", "full"): behaviour,
        ...     "advantage": torch.tensor([1.0, -1.0]).reshape(2, 1, 1),
        ... }, [2])
        >>> out = loss(data)
        >>> sorted(k for k in out.to_tensordict().keys() if k.startswith("loss_"))
        ['loss_objective', 'loss_ratio_var']
        >>> int(out.num_tokens), bool(torch.isclose(out.loss_ratio_var, out.ratio_var))
        (8, True)
        >>> (out.loss_objective + out.loss_ratio_var).backward()
    """

    output_type: type[LLMLossOutput] = R2VPOLLMLossOutput
    _token_mean_terms = True
    _schedulable_buffers = frozenset(_NON_NEGATIVE_COEFFS)

    def __init__(
        self,
        actor_network=None,
        *,
        ratio_var_target: float | None = None,
        kl_target: float | None = None,
        lagrange_multiplier: float = 0.5,
        variance_center: Literal["mean", "one"] = "mean",
        diagnostic_clip_epsilon: float | tuple[float, float] = 0.2,
        check_finite: bool = True,
        **kwargs,
    ):
        if "clip_epsilon" in kwargs:
            raise TypeError(
                "R2VPOLLMLoss does not clip the ratio; pass diagnostic_clip_epsilon "
                "for the band of the clip_fraction diagnostic."
            )
        ratio_var_target = self._check_dual_arguments(
            ratio_var_target, kl_target, lagrange_multiplier, variance_center
        )
        super().__init__(actor_network, clip_epsilon=diagnostic_clip_epsilon, **kwargs)
        self._register_dual_buffers(
            ratio_var_target, lagrange_multiplier, self.clip_epsilon_low.device
        )
        self.variance_center = variance_center
        self.check_finite = check_finite

    @property
    def out_keys(self):
        if getattr(self, "_out_keys", None) is None:
            keys = ["loss_objective", "loss_ratio_var", "clip_fraction", "ESS", "kl_approx"]
            if self.entropy_bonus:
                keys.extend(["entropy", "loss_entropy"])
            keys.extend(
                [
                    "loss_kl_to_ref",
                    "kl_to_ref",
                    "loss_kl_to_inference",
                    "kl_to_inference",
                    "ratio_var",
                    "lagrange_multiplier",
                    "ratio_sum",
                    "ratio_sq_sum",
                    "num_tokens",
                    "mean_ratio",
                    "max_ratio",
                ]
            )
            self._out_keys = keys
        return self._out_keys

    @out_keys.setter
    def out_keys(self, values):
        self._out_keys = values

    def forward(self, tensordict: TensorDictBase) -> R2VPOLLMLossOutput:
        if self.tensor_keys.action not in tensordict:
            raise ValueError(f"Action key {self.tensor_keys.action} not in tensordict.")
        tensordict = self._zero_masked_advantage(tensordict)
        advantage = tensordict.get(self.tensor_keys.advantage, None, as_padded_tensor=True)
        if advantage is None:
            raise ValueError(f"Advantage key {self.tensor_keys.advantage} not in tensordict.")
        log_weight, dist, kl_approx, mask = self._log_weight(
            tensordict, adv_shape=advantage.shape[:-1]
        )
        if advantage.ndim != log_weight.ndim:
            raise ValueError(
                "advantage and log_weight must have the same number of dimensions, got "
                f"{advantage.ndim=} and {log_weight.ndim=}: store the advantage as "
                "[N, 1, 1] (one value per sequence) or [N, L, 1] (per token)."
            )
        log_weight = _at_least_float32(log_weight)  # bfloat16 ratios skew ratio_var
        ratio = log_weight.exp()
        if self.check_finite and not is_dynamo_compiling():
            _check_finite_llm(ratio, advantage, mask, self.tensor_keys)
        stats = _ratio_sums(ratio, mask)
        center = self._ratio_center(stats, ratio)

        # Each per-token term is aggregated as soon as it exists, so that no
        # [N, L] loss tensor outlives its reduction; the squared deviation
        # saves only the ratio (already saved by exp) for backward.
        aggregate = functools.partial(self._aggregate_loss_value, mask=mask, tensordict=tensordict)
        # the penalty is lambda times the token-level ratio_var under every aggregation
        # (prompt_mean weighs the objective per sequence, not the constraint)
        per_token = self.aggregation == "none" or self.reduction == "none"
        aggregate_penalty = aggregate if per_token else functools.partial(
            self._token_mean, mask=mask, tensordict=tensordict)
        td_out = TensorDict()
        td_out.set("loss_objective", aggregate(-ratio * advantage))
        td_out.set(
            "loss_ratio_var",
            aggregate_penalty(self.lagrange_multiplier * _squared_deviation(ratio, center)),
        )
        td_out.update(self._ratio_diagnostics(log_weight.detach(), kl_approx, mask, stats, center))
        if self.entropy_bonus:
            entropy = self._get_entropy(dist, adv_shape=advantage.shape[:-1])
            td_out.set("entropy", entropy.detach().mean())
            td_out.set("loss_entropy", aggregate(-self.entropy_coeff * entropy))
            del entropy
        self._add_kl_terms(tensordict, td_out, mask, dist)
        self._record_ratio_stats(td_out.get("ratio_var"), stats)
        del tensordict["_cur_log_prob"]
        return self.output_type.from_tensordict(td_out)

    @torch.no_grad()
    def _ratio_diagnostics(
        self,
        log_weight: torch.Tensor,
        kl_approx: torch.Tensor,
        mask: torch.Tensor,
        stats: dict[str, torch.Tensor],
        center: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The detached statistics: GRPOLoss's diagnostics, with its definitions
        (``clip_fraction``, ``kl_approx``: means over all padded positions), and
        R2VPO's own over the valid tokens, from the float64 sums."""
        count = stats["num_tokens"]
        n = count.clamp_min(1).to(torch.float64)
        s1, s2 = stats["ratio_sum"], stats["ratio_sq_sum"]
        c = center.to(torch.float64)
        # mean of (r - c)^2 over the valid tokens = (S2 - 2 c S1 + n c^2) / n
        ratio_var = ((s2 - 2 * c * s1) / n + c * c).clamp_min(0).to(log_weight.dtype)
        ratio_var = torch.where(count > 0, ratio_var, float("nan"))
        clipped = log_weight.clamp(*self._clip_bounds)
        valid_lw = torch.where(expand_as_right(mask, log_weight), log_weight, float("-inf"))
        flat = valid_lw.flatten()
        # ESS / n = mean(r)^2 / mean(r^2) over the valid tokens, in log space
        log_ess = 2 * flat.logsumexp(0) - (2 * flat).logsumexp(0)
        return {
            "clip_fraction": (clipped != log_weight).to(log_weight.dtype).mean(),
            "kl_approx": kl_approx.detach().mean(),
            "ESS": log_ess.exp() / count,
            "ratio_var": ratio_var,
            "lagrange_multiplier": self.lagrange_multiplier.detach().clone(),
            "ratio_sum": s1,
            "ratio_sq_sum": s2,
            "num_tokens": count,
            "mean_ratio": (s1 / n).to(log_weight.dtype),
            "max_ratio": flat.max().exp(),
        }

    def _ratio_center(self, stats: dict[str, torch.Tensor], ratio: torch.Tensor) -> torch.Tensor:
        if self.variance_center == "one":
            return torch.ones((), dtype=ratio.dtype, device=ratio.device)
        acc = self._accumulation
        if acc is not None and acc.ratio_mean is not None:
            return torch.as_tensor(acc.ratio_mean, device=ratio.device).to(ratio.dtype)
        mean = stats["ratio_sum"] / stats["num_tokens"].clamp_min(1)
        return mean.to(ratio.dtype)

    def _add_kl_terms(self, tensordict, td_out, mask, dist) -> None:
        """GRPOLoss's KL-to-reference and KL-to-inference terms (added after aggregation)."""
        if self.kl_to_ref_coeff is not None and self.kl_to_ref_coeff > 0:
            loss_kl, kl = self._kl_to_ref(
                tensordict, key=self.tensor_keys.ref_log_probs, mask=mask, dist=dist
            )
            td_out.set("loss_kl_to_ref", loss_kl)
            td_out.set("kl_to_ref", kl.detach())
        if self.kl_to_inference_coeff is not None:
            loss_kl, kl = self._kl_to_ref(
                tensordict,
                key=self.tensor_keys.sample_log_prob,
                coeff=self.kl_to_inference_coeff,
                mask=mask,
                dist=dist,
            )
            td_out.set("loss_kl_to_inference", loss_kl)
            td_out.set("kl_to_inference", kl.detach())


class _SquaredDeviation(torch.autograd.Function):
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


def _squared_deviation(ratio: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    return _SquaredDeviation.apply(ratio, center.detach())


def _check_finite_llm(ratio, advantage, mask, keys) -> None:
    def all_finite(value):
        return bool((torch.isfinite(value) | ~expand_as_right(mask, value)).all())

    if not all_finite(advantage.expand_as(ratio)):
        raise ValueError(
            f"The advantage (key {keys.advantage!r}) holds NaN or inf at valid tokens."
        )
    if not all_finite(ratio):
        raise ValueError(
            "The importance ratio is NaN or inf at valid tokens: the current "
            f"policy's log-probability of the stored tokens (key {keys.action!r}) "
            "is not finite, or the policy is extremely far from the one that "
            "sampled them (stale data, or too large a step)."
        )


def merge_ratio_stats(
    outputs: Iterable[Any], *, variance_center: Literal["mean", "one"] = "mean"
) -> TensorDict:
    """Merges the ratio statistics of micro-batch outputs into the full batch's, exactly.

    Each :class:`R2VPOLLMLoss` output carries the sums ``ratio_sum = sum r``,
    ``ratio_sq_sum = sum r^2`` (float64) and the count ``num_tokens`` over its
    valid tokens. Adding them up gives the full-batch statistics, not a mean
    of micro-batch means:

    .. code-block:: text

        ratio_mean = sum_k ratio_sum_k / sum_k num_tokens_k
        ratio_var  = sum_k ratio_sq_sum_k / N - ratio_mean^2          ("mean")
                   = sum_k ratio_sq_sum_k / N - 2 ratio_mean + 1      ("one")

    The result does not depend on the centre each micro-batch used.

    Args:
        outputs (iterable): loss outputs (TensorClass, TensorDict or mapping)
            holding ``ratio_sum``, ``ratio_sq_sum`` and ``num_tokens``.

    Keyword Args:
        variance_center (str, optional): ``"mean"`` (central second moment) or
            ``"one"`` (second moment about 1), as the loss's. Defaults to ``"mean"``.

    Returns:
        A TensorDict with ``ratio_mean``, ``ratio_var`` (float64; NaN without
        valid tokens), ``ratio_sum``, ``ratio_sq_sum`` and ``num_tokens``; step a
        :class:`~torchrl_r2vpo.DualVariableScheduler` on it directly, or pass
        ``ratio_mean`` to :meth:`R2VPOLLMLoss.accumulation`.

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
    if variance_center not in _VARIANCE_CENTERS:
        raise ValueError(
            f"variance_center must be one of {_VARIANCE_CENTERS}, got {variance_center!r}."
        )
    ratio_sum = ratio_sq_sum = num_tokens = None
    for out in outputs:
        parts = []
        for key in ("ratio_sum", "ratio_sq_sum", "num_tokens"):
            value = out.get(key, None)
            if value is None:
                raise KeyError(
                    f"merge_ratio_stats needs {key!r} in each output; R2VPOLLMLoss "
                    "outputs carry it."
                )
            parts.append(value.detach())
        s1, s2, n = parts
        if ratio_sum is None:
            ratio_sum, ratio_sq_sum, num_tokens = s1.double(), s2.double(), n
        else:
            ratio_sum = ratio_sum + s1.double()
            ratio_sq_sum = ratio_sq_sum + s2.double()
            num_tokens = num_tokens + n
    if ratio_sum is None:
        raise ValueError("merge_ratio_stats needs at least one output.")
    count = num_tokens.double()
    mean = ratio_sum / count.clamp_min(1)
    second = ratio_sq_sum / count.clamp_min(1)
    if variance_center == "mean":
        var = (second - mean.pow(2)).clamp_min(0)
    else:
        var = (second - 2 * mean + 1).clamp_min(0)
    nan = torch.full_like(var, float("nan"))
    return TensorDict(
        {
            "ratio_mean": torch.where(count > 0, mean, nan),
            "ratio_var": torch.where(count > 0, var, nan),
            "ratio_sum": ratio_sum,
            "ratio_sq_sum": ratio_sq_sum,
            "num_tokens": num_tokens,
        }
    )


# ------------------------------------------------------------------------ baselines


def _unit(log_weight: torch.Tensor) -> torch.Tensor:
    """``r / sg(r)``: equal to 1, with gradient ``d log pi``, i.e. ``sg(w) * _unit`` is
    the surrogate whose forward value is ``w`` and gradient ``w * grad log pi``."""
    return (log_weight - log_weight.detach()).exp()


class GRPOLLMLoss(_AccumulationMixin, GRPOLoss):
    r"""GRPO: TorchRL's :class:`~torchrl.objectives.llm.GRPOLoss`, unchanged, plus
    :meth:`~R2VPOLLMLoss.accumulation`.

    .. code-block:: text

        loss_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)

    The gradient is zero when ``r > 1 + eps_high`` with ``A > 0`` or
    ``r < 1 - eps_low`` with ``A < 0``. Defaults to ``clip_epsilon=0.2`` and,
    as TorchRL's GRPOLoss and verl, ``aggregation="token_mean"`` (a mean over all
    the batch's tokens, as DAPO); ``aggregation="prompt_mean"`` is the paper's
    mean over each completion's tokens, then over completions. Like every loss
    here it keeps GRPOLoss's entropy bonus (``entropy_coeff=0.01``) unless
    ``entropy_bonus=False``; the published objectives have none.

    Reference: DeepSeekMath, Shao et al. 2024, https://arxiv.org/abs/2402.03300

    Examples:
        >>> import torch
        >>> from torchrl_r2vpo.objectives.llm import GRPOLLMLoss
        >>> loss = GRPOLLMLoss(clip_epsilon=0.2)
        >>> ratio = torch.tensor([0.5, 1.0, 1.5]).reshape(1, 3, 1)
        >>> value, _ = loss._compute_policy_objective(ratio.log(), torch.ones(1, 1, 1))
        >>> value.flatten()
        tensor([-0.5000, -1.0000, -1.2000])
    """

    output_type: type[LLMLossOutput] = GRPOLossOutput


class DAPOLLMLoss(_AccumulationMixin, DAPO):
    r"""GRPO-CH (clip-higher, from DAPO): GRPO with an asymmetric band.

    .. code-block:: text

        loss_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A),   (eps_low, eps_high) = (0.2, 0.28)

    TorchRL's :class:`~torchrl.objectives.llm.DAPO` with the paper's band as
    the default ``clip_epsilon``, plus :meth:`~R2VPOLLMLoss.accumulation`.
    DAPO's dynamic sampling lives in the data path
    (:class:`~torchrl.objectives.llm.MCAdvantage` ``keep_return_bounds``), and its
    token-level mean is ``aggregation="token_mean"``.

    Reference: DAPO, Yu et al. 2025, https://arxiv.org/abs/2503.14476
    """

    output_type: type[LLMLossOutput] = DAPOLossOutput

    def __init__(self, actor_network=None, *, clip_epsilon=(0.2, 0.28), **kwargs):
        super().__init__(actor_network, clip_epsilon=clip_epsilon, **kwargs)


class CISPOLLMLoss(_AccumulationMixin, CISPOLoss):
    r"""CISPO: REINFORCE weighted by a clipped, *detached* importance ratio.

    .. code-block:: text

        loss_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A * log pi_theta(y_t)

    implemented as ``-sg(clip(r)) * A * r / sg(r)``: the forward value is
    ``-clip(r) A`` (as TorchRL's :class:`~torchrl.objectives.llm.CISPOLoss`)
    and the gradient ``-clip(r) A grad log pi`` for *every* token. TorchRL
    0.14.1's ``CISPOLoss`` omits the stop-gradient, so its gradient is zero
    wherever the ratio is clipped, the opposite of CISPO's intent; this class
    restores the paper's gradient. The paper bounds the weight from above only:
    ``clip_epsilon`` defaults to ``(1.0, 4.0)``, ScaleRL's ``clip(r, 0, 5)``
    (``eps_low = 1`` means no lower bound, a value GRPOLoss itself refuses).

    Reference: MiniMax-M1, 2025, https://arxiv.org/abs/2506.13585

    Keyword Args:
        clip_epsilon (float or tuple of floats, optional): ``eps`` or
            ``(eps_low, eps_high)``, with ``0 <= eps_low <= 1``. Defaults to
            ``(1.0, 4.0)``.
        **kwargs: every other :class:`~torchrl.objectives.llm.GRPOLoss`
            keyword argument.

    Examples:
        >>> import torch
        >>> from torchrl_r2vpo.objectives.llm import CISPOLLMLoss
        >>> ratio = torch.tensor([0.3, 1.0, 7.0]).reshape(3, 1, 1)
        >>> value, _ = CISPOLLMLoss()._compute_policy_objective(ratio.log(), torch.ones(3, 1, 1))
        >>> [round(v, 4) for v in value.view(-1).tolist()]  # -min(r, 5) * A: no lower bound
        [-0.3, -1.0, -5.0]
    """

    output_type: type[LLMLossOutput] = CISPOLossOutput

    def __init__(self, actor_network=None, *,
                 clip_epsilon: float | tuple[float, float] = (1.0, 4.0), **kwargs):
        low, high = clip_epsilon if isinstance(clip_epsilon, (tuple, list)) else (clip_epsilon,) * 2
        if not 0 <= float(low) <= 1:
            raise ValueError(f"clip_epsilon low must be in [0, 1] (1: no lower bound), got {low}.")
        # GRPOLoss validates eps_low < 1; no lower bound is set on its buffer afterwards
        super().__init__(actor_network, clip_epsilon=(min(float(low), 0.5), high), **kwargs)
        self.clip_epsilon_low.fill_(float(low))

    def _compute_policy_objective(
        self, log_weight: torch.Tensor, advantage: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight = log_weight.detach().clamp(*self._clip_bounds)
        clip_fraction = (weight != log_weight.detach()).to(log_weight.dtype).mean()
        return -weight.exp() * advantage * _unit(log_weight), clip_fraction


class GPPOLLMLoss(_AccumulationMixin, GRPOLoss):
    r"""GPPO: gradient-preserving clipping.

    PPO-clip's forward value, but in the two truly clipped regions the clipped
    ratio is replaced by ``(1 -+ eps) * r / sg(r)``, whose value equals the
    clipped ratio and whose gradient is bounded and non-zero:

    .. code-block:: text

        loss_t = -beta_high (1 + eps_high) r/sg(r) A     if A > 0 and r > 1 + eps_high
               = -beta_low  (1 - eps_low)  r/sg(r) A     if A < 0 and r < 1 - eps_low
               = -r A                                     otherwise

        d loss_t / d log pi = -beta_high (1 + eps_high) A, -beta_low (1 - eps_low) A, -r A

    ``beta_low = beta_high = 1`` (the default) is Klear-Reasoner's GPPO; other
    values are CE-GPPO's scaled variant (which then also scales the value).
    There is no dual clip (CE-GPPO's code adds one): for ``A < 0`` and a large
    ``r`` the gradient ``-r A`` is unbounded, as in Klear-Reasoner's equation.

    Reference: Klear-Reasoner, Su et al. 2025, https://arxiv.org/abs/2508.07629

    Keyword Args:
        beta_low (float, optional): gradient scale of the low clipped region
            (``A < 0``). Defaults to ``1.0``.
        beta_high (float, optional): gradient scale of the high clipped region
            (``A > 0``). Defaults to ``1.0``.
        **kwargs: every :class:`~torchrl.objectives.llm.GRPOLoss` keyword
            argument (``clip_epsilon`` defaults to ``0.2``).

    Examples:
        >>> import torch
        >>> from torchrl_r2vpo.objectives.llm import GPPOLLMLoss
        >>> loss = GPPOLLMLoss(clip_epsilon=0.2)
        >>> log_weight = torch.tensor([1.5]).log().reshape(1, 1, 1).requires_grad_()
        >>> value, clip_fraction = loss._compute_policy_objective(log_weight, torch.ones(1, 1, 1))
        >>> value.backward()
        >>> value.item(), log_weight.grad.item(), clip_fraction.item()  # GRPO's gradient is 0 here
        (-1.2000000476837158, -1.2000000476837158, 1.0)
    """

    output_type: type[LLMLossOutput] = GRPOLossOutput

    def __init__(self, actor_network=None, *, beta_low: float = 1.0, beta_high: float = 1.0, **kwargs):
        _check_non_negative("beta_low", beta_low)
        _check_non_negative("beta_high", beta_high)
        super().__init__(actor_network, **kwargs)
        self.beta_low = beta_low
        self.beta_high = beta_high

    def _compute_policy_objective(
        self, log_weight: torch.Tensor, advantage: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self._clip_bounds
        lw = log_weight.detach()
        high_clipped = (advantage > 0) & (lw > high)
        low_clipped = (advantage < 0) & (lw < low)
        unit = _unit(log_weight)
        coeff = torch.where(
            high_clipped,
            self.beta_high * high.exp() * unit,
            torch.where(low_clipped, self.beta_low * low.exp() * unit, log_weight.exp()),
        )
        clip_fraction = (high_clipped | low_clipped).to(log_weight.dtype).mean()
        return -coeff * advantage, clip_fraction


class TOPRLLMLoss(_AccumulationMixin, GRPOLoss):
    r"""TOPR: tapered off-policy REINFORCE.

    Positive samples get an unweighted (SFT-like) log-likelihood gradient,
    negative ones a truncated importance ratio ``min(r, 1)``:

    .. code-block:: text

        loss_t = -w_+ A log pi_theta(y_t)                    if A > 0
               = -w_- sg(min(r_t, 1)) A log pi_theta(y_t)    if A <= 0

    implemented as ``-sg(w) A r / sg(r)``: the forward value is ``-w A`` and the
    gradient ``-w A grad log pi``. The split uses the sign of the advantage (in
    the sequence-batch layout, the group-normalised reward of the sequence);
    the paper splits on the reward itself, so feed the raw reward as the
    advantage to follow it exactly. The ratio is per token, as in ROLL's
    implementation (the paper's is per sequence).

    Reference: Le Roux et al. 2025, https://arxiv.org/abs/2503.14286

    Keyword Args:
        positive_weight (float, optional): ``w_+``. Defaults to ``1.0``.
        negative_weight (float, optional): ``w_-``. Defaults to ``1.0``.
        **kwargs: every :class:`~torchrl.objectives.llm.GRPOLoss` keyword
            argument (``clip_epsilon`` is unused).

    Examples:
        >>> import torch
        >>> from torchrl_r2vpo.objectives.llm import TOPRLLMLoss
        >>> loss = TOPRLLMLoss()
        >>> log_weight = torch.tensor([2.0, 2.0]).log().reshape(2, 1, 1).requires_grad_()
        >>> advantage = torch.tensor([1.0, -1.0]).reshape(2, 1, 1)
        >>> value, _ = loss._compute_policy_objective(log_weight, advantage)
        >>> value.sum().backward()
        >>> log_weight.grad.flatten()  # r = 2: unweighted for A > 0, truncated to 1 for A < 0
        tensor([-1.,  1.])
    """

    output_type: type[LLMLossOutput] = GRPOLossOutput

    def __init__(
        self,
        actor_network=None,
        *,
        positive_weight: float = 1.0,
        negative_weight: float = 1.0,
        **kwargs,
    ):
        _check_non_negative("positive_weight", positive_weight)
        _check_non_negative("negative_weight", negative_weight)
        super().__init__(actor_network, **kwargs)
        self.positive_weight = positive_weight
        self.negative_weight = negative_weight

    def _compute_policy_objective(
        self, log_weight: torch.Tensor, advantage: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lw = log_weight.detach()
        positive = advantage > 0
        weight = torch.where(
            positive,
            torch.full_like(lw, self.positive_weight),
            self.negative_weight * lw.clamp_max(0).exp(),
        )
        clip_fraction = (~positive & (lw > 0)).to(log_weight.dtype).mean()
        return -weight * advantage * _unit(log_weight), clip_fraction


class SPOLLMLoss(_AccumulationMixin, GRPOLoss):
    r"""SPO: simple policy optimisation, a per-token quadratic penalty.

    .. code-block:: text

        loss_t = -[r_t A - |A| / (2 eps) * (r_t - 1)^2]

        d/dr of the bracket = A - |A| (r - 1) / eps,  zero at r = 1 + eps * sign(A)

    The per-token optimum sits on PPO's clip boundary and beyond it the
    objective pulls back instead of going flat. It is R2VPO's closest
    relative: R2VPO shares one coefficient ``lambda``, learned by dual ascent,
    instead of ``|A| / (2 eps)``, and centres on the batch mean. ``eps`` is
    ``clip_epsilon`` (a single value; defaults to ``0.2``); ``clip_fraction``
    reports the share of tokens outside ``[1 - eps, 1 + eps]``.

    Reference: Xie et al., ICML 2025, https://arxiv.org/abs/2401.16025

    Examples:
        >>> import torch
        >>> from torchrl_r2vpo.objectives.llm import SPOLLMLoss
        >>> loss = SPOLLMLoss(clip_epsilon=0.2)
        >>> ratio = torch.tensor([1.0, 1.2, 1.4]).reshape(1, 3, 1)
        >>> value, _ = loss._compute_policy_objective(ratio.log(), torch.ones(1, 1, 1))
        >>> value.flatten()  # -(r - (r - 1)^2 / 0.4)
        tensor([-1.0000, -1.1000, -1.0000])
    """

    output_type: type[LLMLossOutput] = GRPOLossOutput

    def __init__(self, actor_network=None, *, clip_epsilon: float = 0.2, **kwargs):
        if isinstance(clip_epsilon, (tuple, list)):
            raise ValueError(
                f"SPO has a single epsilon; got clip_epsilon={clip_epsilon!r}."
            )
        if not 0 < clip_epsilon < 1:
            raise ValueError(f"clip_epsilon must lie in (0, 1), got {clip_epsilon}.")
        super().__init__(actor_network, clip_epsilon=clip_epsilon, **kwargs)

    def _compute_policy_objective(
        self, log_weight: torch.Tensor, advantage: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = log_weight.exp()
        eps = self.clip_epsilon_high
        penalty = advantage.abs() / (2 * eps) * (ratio - 1).pow(2)
        with torch.no_grad():
            outside = log_weight.clamp(*self._clip_bounds) != log_weight
            clip_fraction = outside.to(log_weight.dtype).mean()
        return -(ratio * advantage - penalty), clip_fraction


# ------------------------------------------------------------------------- registry

LLM_LOSSES: Mapping[str, type[GRPOLoss]] = types.MappingProxyType(
    {
        "r2vpo": R2VPOLLMLoss,
        "grpo": GRPOLLMLoss,
        "grpo-ch": DAPOLLMLoss,
        "gppo": GPPOLLMLoss,
        "topr": TOPRLLMLoss,
        "spo": SPOLLMLoss,
        "cispo": CISPOLLMLoss,
    }
)
"""The LLM losses by name (read-only)."""


def make_llm_loss(name: str, actor_network=None, **kwargs) -> GRPOLoss:
    """Builds an LLM loss by name, with the same data path for all.

    Args:
        name (str): one of ``"r2vpo"``, ``"grpo"``, ``"grpo-ch"``, ``"gppo"``,
            ``"topr"``, ``"spo"``, ``"cispo"`` (case-insensitive; ``_`` works
            for ``-``).
        actor_network (LLMWrapperBase, optional): the policy scorer.
        **kwargs: the chosen class's keyword arguments (e.g. ``aggregation``,
            ``masking_strategy``, ``lagrange_multiplier``, ``clip_epsilon``).

    Examples:
        >>> from torchrl_r2vpo.objectives.llm import make_llm_loss
        >>> type(make_llm_loss("grpo-ch")).__name__
        'DAPOLLMLoss'
        >>> make_llm_loss("ppo")
        Traceback (most recent call last):
            ...
        ValueError: Unknown LLM loss 'ppo'. Valid names: 'r2vpo', 'grpo', 'grpo-ch', 'gppo', 'topr', 'spo', 'cispo'.
    """
    key = str(name).lower().replace("_", "-")
    cls = LLM_LOSSES.get(key)
    if cls is None:
        valid = ", ".join(repr(n) for n in LLM_LOSSES)
        raise ValueError(f"Unknown LLM loss {name!r}. Valid names: {valid}.")
    return cls(actor_network, **kwargs)
