"""Exact token-level reductions and gradient accumulation for TorchRL's LLM losses.

:class:`GradientAccumulationMixin` is what every LLM loss of this package adds to
:class:`~torchrl.objectives.llm.GRPOLoss`: reductions over exactly the tokens the loss
scores, and :meth:`~GradientAccumulationMixin.accumulation`, which normalises each
micro-batch by the full batch's quantities so that micro-batch gradients add up to the
full-batch gradient.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from tensordict import TensorDictBase
from tensordict.utils import expand_as_right, NestedKey
from torchrl.objectives.llm import GRPOLoss, LLMLossOutput

from torchrl_r2vpo._compat import (
    CURRENT_LOG_PROB_KEY,
    grpo_log_weight,
    input_validity_mask,
    is_dynamo_compiling,
    reduce_loss,
)
from torchrl_r2vpo.data.llm import (ASSISTANT_MASK_KEY, ATTENTION_MASK_KEY, PROMPT_TOKENS_KEY,
                                    PROXIMAL_LOG_PROBS_KEY)
from torchrl_r2vpo.objectives.proximal import behaviour_log_weight
from torchrl_r2vpo.objectives.ratio_variance import (
    check_bool_mask,
    check_loss_input,
    nan_without_valid,
    reject_unknown_kwargs,
)

__all__ = ["AGGREGATIONS", "GradientAccumulationMixin", "MASKING_STRATEGIES"]

AGGREGATIONS = ("token_mean", "prompt_mean", "none")
"""GRPOLoss's ``aggregation`` values."""
MASKING_STRATEGIES = ("sft", "rlhf", "generic")
"""GRPOLoss's ``masking_strategy`` values."""
# the statistics over the valid tokens: NaN when there is none
_STATISTICS = ("clip_fraction", "kl_approx", "ESS", "entropy", "kl_to_ref", "kl_to_inference",
               "ratio_var", "mean_ratio", "max_ratio")
# the entries TorchRL's LLM wrappers read and write (pad_output=True layout)


@dataclass(frozen=True)
class _FullBatchNormalizers:
    """The full-batch quantities an :meth:`~GradientAccumulationMixin.accumulation` block
    normalises by."""

    num_tokens: torch.Tensor | int | None
    num_sequences: torch.Tensor | int | None
    ratio_mean: torch.Tensor | float | None
    ratio_weight_sum: torch.Tensor | float | None = None


class GradientAccumulationMixin:
    """Exact gradient accumulation, and exact valid-token reductions, for a
    :class:`~torchrl.objectives.llm.GRPOLoss`.

    Placed before GRPOLoss (or a subclass) in the bases. It adds
    :meth:`accumulation`, :meth:`token_mask`, :meth:`count_tokens` and
    :meth:`count_sequences`. Micro-batch losses add up exactly only if every
    reduction covers exactly the tokens the loss scores, so, inside
    :meth:`accumulation` or not, it also changes the following, the same for
    every loss:

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
    * unknown keyword arguments raise a ``TypeError`` instead of being ignored;
    * with no valid token every ``loss_*`` term is 0 and every statistic over the
      valid tokens (``clip_fraction``, ``kl_approx``, ``ESS``, ``entropy``, the KL
      diagnostics, and R2VPO's ``ratio_var``, ``mean_ratio``, ``max_ratio``) is NaN;
      the counts and sums (``num_tokens``, ``ratio_sum``, ...) are 0;
    * bad input raises an error naming the entry and its ``tensor_keys`` field: an
      empty batch, a missing action, advantage or behaviour log-probability (or the
      masking strategy's mask), a validity mask or an ``("masks",
      "all_assistant_mask")`` that is not boolean (metadata checks, skipped under
      ``torch.compile``);
    * tokens whose stored behaviour log-probability is not finite are left out, as
      GRPOLoss does, with a warning giving their share, and a ``ValueError`` when no
      token is left (one host synchronisation per call, skipped under
      ``torch.compile`` and, for :class:`~torchrl_r2vpo.R2VPOLLMLoss`, with
      ``check_finite=False``). :class:`~torchrl_r2vpo.R2VPOLoss` raises on any such
      sample instead.

    It also gives every loss the ``proximal_log_prob`` tensor key (default
    ``("proximal_log_probs", "full")``), which a *decoupled* loss
    (``decoupled = True``: :class:`~torchrl_r2vpo.R2VPOLLMLoss` by default, the
    decoupled GRPO baselines) reads when the input holds it: the ratio is then taken
    against the proximal policy and the advantage of each token multiplied by the
    detached behaviour weight ``w = pi_prox / pi_behaviour``, bounded at
    ``max_behaviour_weight`` (see :mod:`torchrl_r2vpo.objectives.proximal`). For a
    per-token objective that scales with the advantage, ``L(r, w A) = w L(r, A)`` for
    ``w >= 0`` (every loss here), this is exactly ``w * L(r, A)``; the
    KL-to-inference term, which reads the behaviour log-probabilities, then measures
    the KL to the proximal policy. Without the key the input is used as it is.
    """

    @dataclass
    class _AcceptedKeys(GRPOLoss._AcceptedKeys):
        """GRPOLoss's keys, and ``proximal_log_prob``: the log-probabilities under the
        policy at the start of the current update, read by decoupled losses."""

        proximal_log_prob: NestedKey = PROXIMAL_LOG_PROBS_KEY

    _accumulation: _FullBatchNormalizers | None = None
    # the input checks that cost a host synchronisation (R2VPOLLMLoss's argument)
    check_finite: bool = True
    # a decoupled loss takes the ratio against the proximal policy when the input has it
    decoupled: bool = False
    max_behaviour_weight: float | None = None
    behaviour_weight_mode: Literal["truncate", "mask"] = "truncate"
    # accumulation() needs num_tokens for prompt_mean too (a penalty that is a token mean)
    _token_mean_terms: bool = False

    def __init__(self, *args, **kwargs) -> None:
        aggregation = kwargs.get("aggregation") or "token_mean"
        if aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}."
            )
        masking_strategy = kwargs.get("masking_strategy", "sft")
        if masking_strategy not in MASKING_STRATEGIES:
            raise ValueError(
                f"masking_strategy must be one of {MASKING_STRATEGIES}, got "
                f"{masking_strategy!r}."
            )
        super().__init__(*args, **kwargs)
        reject_unknown_kwargs(type(self).__name__, GRPOLoss, kwargs)

    @contextlib.contextmanager
    def accumulation(
        self,
        num_tokens: int | torch.Tensor | None = None,
        *,
        num_sequences: int | torch.Tensor | None = None,
        ratio_mean: float | torch.Tensor | None = None,
        ratio_weight_sum: float | torch.Tensor | None = None,
    ) -> Iterator[GradientAccumulationMixin]:
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
        * ``ratio_mean`` (used by :class:`~torchrl_r2vpo.R2VPOLLMLoss` with
          ``variance_center="mean"``, ignored by the other losses) is the
          full-batch masked mean of the current ratio. It depends on the
          current parameters, so it needs a forward pass: either a
          ``torch.no_grad()`` pass over the micro-batches merged with
          :func:`~torchrl_r2vpo.merge_ratio_stats` (exact; one extra forward), or the merged
          mean of the previous optimiser step (one step stale), or ``1.0`` on
          the first step of an update when the ratio's denominator (the proximal
          log-probabilities of a decoupled loss, else the behaviour ones) was
          computed by the trained model itself (then ``r == 1`` up to rounding).
          Without it, each micro-batch is centred on its own mean: the penalty becomes the pooled *within*-micro-batch
          variance, which misses the spread between micro-batch means, and the
          gradient differs from the full-batch one by ``2 lambda (m_k - m) / N``
          per token of micro-batch ``k``. ``variance_center="one"`` needs no
          centre and is exact.
        * ``ratio_weight_sum`` (:class:`~torchrl_r2vpo.R2VPOLLMLoss` with
          ``weighted_variance=True`` on stale data) is the full batch's sum of the
          behaviour weights over its valid tokens, the variance's normaliser:
          :meth:`count_weight` computes it without a forward pass.
        * Each micro-batch is scored with the same parameters.
          ``kl_mask_threshold`` is incompatible: its mask depends on the current
          policy.

        Args:
            num_tokens (int or Tensor, optional): the full batch's valid-token
                count. Required for ``aggregation="token_mean"``, and for
                :class:`~torchrl_r2vpo.R2VPOLLMLoss` (whose penalty is a token mean) with any.

        Keyword Args:
            num_sequences (int or Tensor, optional): the full batch's number of
                sequences the collector mask keeps. Required for
                ``aggregation="prompt_mean"``.
            ratio_mean (float or Tensor, optional): the full batch's masked mean
                ratio, the variance centre for :class:`~torchrl_r2vpo.R2VPOLLMLoss`.
            ratio_weight_sum (float or Tensor, optional): the full batch's sum of
                behaviour weights (:meth:`count_weight`), for a weighted variance.

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
        self._accumulation = _FullBatchNormalizers(num_tokens, num_sequences, ratio_mean,
                                                   ratio_weight_sum)
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

        log_prob = self._behaviour_log_prob(tensordict)
        return self._drop_invalid_samples(
            tensordict, self._strategy_mask(tensordict) & torch.isfinite(log_prob))

    def _behaviour_log_prob(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The stored behaviour log-probabilities ``[N, L]``, left-padded with 0."""
        log_prob = tensordict.get(self.tensor_keys.sample_log_prob, None, as_padded_tensor=True,
                                  padding_side="left", padding_value=0.0)
        if log_prob is None:
            raise KeyError(f"The behaviour log-probability {self.tensor_keys.sample_log_prob} is missing.")
        return log_prob

    def _strategy_mask(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The tokens :attr:`masking_strategy` selects ``[N, L]``, before the validity
        masks and the finite log-probabilities."""

        def padded(key, value):
            return tensordict.get(
                key, as_padded_tensor=True, padding_side="left", padding_value=value
            )

        if self.masking_strategy == "rlhf":
            mask = padded(ASSISTANT_MASK_KEY, False)
            if mask is None:
                raise KeyError(f"masking_strategy='rlhf' needs {ASSISTANT_MASK_KEY}.")
            mask = mask.bool()
        else:
            mask = padded(ATTENTION_MASK_KEY, False)
            if mask is None:
                raise KeyError(f"masking_strategy={self.masking_strategy!r} needs {ATTENTION_MASK_KEY}.")
            mask = mask.bool()
            if self.masking_strategy == "sft":
                prompt = padded(PROMPT_TOKENS_KEY, -100)
                if prompt is None:
                    raise KeyError(f"masking_strategy='sft' needs {PROMPT_TOKENS_KEY}.")
                mask = mask.clone()
                mask[..., : prompt.shape[-1]] = False
        return mask

    def _check_input(self, tensordict: TensorDictBase) -> None:
        """Raises a clear error for an input the loss cannot read (metadata only: no host
        synchronisation; skipped under ``torch.compile``)."""
        if is_dynamo_compiling():
            return
        check_loss_input(self, tensordict, {
            "action": "the token ids, [N, L]",
            "advantage": "one value per sequence, [N, 1, 1], or per token, [N, L, 1]",
            "sample_log_prob": "the behaviour policy's log-probability of each token, [N, L]",
        })
        if self.masking_strategy == "rlhf":
            check_bool_mask(self, tensordict, ASSISTANT_MASK_KEY, "the assistant mask")

    def _behaviour_token_counts(self, tensordict: TensorDictBase) -> torch.Tensor:
        """``[selected, dropped]`` (no host synchronisation): the tokens the masking
        strategy and the validity masks select, and those of them whose stored behaviour
        log-probability is not finite, which the loss leaves out."""
        selected = self._drop_invalid_samples(tensordict, self._strategy_mask(tensordict))
        dropped = selected & ~torch.isfinite(self._behaviour_log_prob(tensordict))
        return torch.stack([selected.sum(), dropped.sum()])

    def _check_dropped_tokens(self, selected: int, dropped: int) -> None:
        """Warns when ``dropped`` of the ``selected`` tokens are left out for a non-finite
        behaviour log-probability; raises a ``ValueError`` when that leaves none."""
        if not dropped:
            return
        key = self.tensor_keys.sample_log_prob
        if dropped == selected:
            raise ValueError(
                f"{type(self).__name__}: the behaviour log-probability (tensor_keys."
                f"sample_log_prob {key!r}) is NaN or infinite at every one of the {selected} "
                "tokens the masks select, so no token is left to train on."
            )
        warnings.warn(
            f"{type(self).__name__} leaves out {dropped} of {selected} tokens "
            f"({dropped / selected:.1%}) whose behaviour log-probability (tensor_keys."
            f"sample_log_prob {key!r}) is NaN or infinite.",
            stacklevel=3,
        )

    def _drop_invalid_samples(
        self, tensordict: TensorDictBase, mask: torch.Tensor
    ) -> torch.Tensor:
        """``mask`` restricted to the samples the input's validity masks keep (those the
        loss reduction applies, e.g. a sampler's ``("collector", "mask")``), so that counts
        and statistics cover the tokens the loss does."""
        valid = input_validity_mask(self, tensordict, mask)
        return mask if valid is None else mask & valid

    def count_tokens(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The number of valid tokens in ``tensordict``, as a scalar tensor (no sync)."""
        return self.token_mask(tensordict).sum()

    def count_sequences(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The number of sequences in ``tensordict`` that the collector mask (the loss's
        validity masks) keeps, as a scalar tensor (no sync): the batch size without one."""
        return self._valid_sequences(tensordict, self.token_mask(tensordict)).sum()

    def _valid_sequences(self, tensordict: TensorDictBase, mask: torch.Tensor) -> torch.Tensor:
        """``[N]`` booleans: the sequences the input's validity masks keep (all without one)."""
        valid = input_validity_mask(self, tensordict, mask)
        return mask.new_ones(mask.shape[0]) if valid is None else valid.flatten(1).any(-1)

    def _drop_kl_masked_tokens(
        self, tensordict: TensorDictBase, mask: torch.Tensor
    ) -> torch.Tensor:
        """GRPOLoss's optional KL-Mask: drops the tokens with
        ``0.5 * (cur - behaviour)^2 > kl_mask_threshold``."""
        if self.kl_mask_threshold is None or not self.kl_mask_threshold > 0:
            return mask
        inference_log_prob = tensordict.get(
            self.tensor_keys.sample_log_prob,
            None,
            as_padded_tensor=True,
            padding_side="left",
            padding_value=0.0,
        )
        cur_log_prob = tensordict.get(CURRENT_LOG_PROB_KEY, None)
        if inference_log_prob is None or cur_log_prob is None:
            return mask
        cur = torch.where(expand_as_right(mask, cur_log_prob), cur_log_prob, 0.0)
        inference = torch.where(expand_as_right(mask, inference_log_prob), inference_log_prob, 0.0)
        return mask & (0.5 * (cur - inference) ** 2 <= self.kl_mask_threshold)

    def _log_weight(self, tensordict: TensorDictBase, adv_shape: torch.Size):
        """GRPOLoss's, with the mask the loss reduces with (KL and collector masks
        included) and the log-weight set to 0 wherever that mask is ``False``."""
        log_weight, dist, kl_approx, mask = grpo_log_weight(super(), tensordict, adv_shape)
        mask = self._drop_invalid_samples(tensordict, self._drop_kl_masked_tokens(tensordict, mask))
        log_weight = torch.where(expand_as_right(mask, log_weight), log_weight, 0.0)
        self._any_valid_token = mask.any()  # for the statistics of forward's output
        return log_weight, dist, kl_approx, mask

    def _zero_unused_advantage(self, tensordict: TensorDictBase) -> TensorDictBase:
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

    def count_weight(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The sum of the behaviour weights ``w`` over the valid tokens of
        ``tensordict`` (the token count when nothing is decoupled), as a scalar tensor,
        without a forward pass."""
        mask = self.token_mask(tensordict)
        weight = self._decouple_with_weight(tensordict)[1]
        if weight is None:
            return mask.sum()
        return torch.where(mask, weight, 0.0).sum()

    def _decouple(self, tensordict: TensorDictBase) -> TensorDictBase:
        """For a decoupled loss whose input holds the proximal log-probabilities, a
        shallow copy whose behaviour log-probabilities are the proximal ones and whose
        advantage is ``w * A`` per token (``[N, L, 1]``); else ``tensordict`` itself."""
        return self._decouple_with_weight(tensordict)[0]

    def _decouple_with_weight(
        self, tensordict: TensorDictBase
    ) -> tuple[TensorDictBase, torch.Tensor | None]:
        """:meth:`_decouple`, and the detached behaviour weight ``w`` ``[N, L]`` it
        applied (``None`` when it applied none)."""
        if not self.decoupled:
            return tensordict, None

        def padded(key):
            return tensordict.get(key, None, as_padded_tensor=True, padding_side="left",
                                  padding_value=0.0)

        proximal, behaviour = padded(self.tensor_keys.proximal_log_prob), padded(
            self.tensor_keys.sample_log_prob)
        advantage = tensordict.get(self.tensor_keys.advantage, None, as_padded_tensor=True)
        if proximal is None or behaviour is None or advantage is None:
            return tensordict, None  # nothing to decouple, or forward names what is missing
        key = self.tensor_keys.proximal_log_prob
        if proximal.shape != behaviour.shape:
            raise ValueError(
                f"The proximal log-probabilities {key} have shape {tuple(proximal.shape)}, "
                f"the behaviour ones {self.tensor_keys.sample_log_prob} {tuple(behaviour.shape)}.")
        if advantage.ndim != 3 or advantage.shape[:2] not in (
                (behaviour.shape[0], 1), behaviour.shape):
            return tensordict, None  # malformed: forward says so
        if not torch.isfinite(proximal)[self.token_mask(tensordict)].all():
            raise ValueError(f"The proximal log-probabilities {key} hold NaN or inf at valid "
                             "tokens.")
        log_w = behaviour_log_weight(proximal, behaviour, self.max_behaviour_weight,
                                     self.behaviour_weight_mode)
        tensordict = tensordict.copy()
        # a token the behaviour policy left non-finite stays masked
        tensordict.set(self.tensor_keys.sample_log_prob,
                       torch.where(torch.isfinite(behaviour), proximal.detach(), behaviour))
        weight = log_w.exp()
        tensordict.set(self.tensor_keys.advantage, advantage * weight.unsqueeze(-1))
        return tensordict, weight

    def forward(self, tensordict: TensorDictBase) -> LLMLossOutput:
        self._check_input(tensordict)
        if self.check_finite and not is_dynamo_compiling():
            self._check_dropped_tokens(*self._behaviour_token_counts(tensordict).tolist())
        out = super().forward(self._zero_unused_advantage(self._decouple(tensordict)))
        nan_without_valid(out, self._any_valid_token, _STATISTICS)
        return out

    def _token_mean(
        self, value: torch.Tensor, mask: torch.Tensor, tensordict: TensorDictBase | None = None
    ) -> torch.Tensor:
        """The mean of ``value`` over the valid tokens (over the full batch's, inside
        :meth:`accumulation`), whatever :attr:`aggregation` is."""
        mask_exp = expand_as_right(mask, value)
        acc = self._accumulation
        if acc is None:
            return reduce_loss(
                self, value, tensordict, reduction="mean", mask=mask_exp
            ).squeeze(-1)
        total = reduce_loss(self, value, tensordict, reduction="sum", mask=mask_exp)
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
            num_sequences = self._valid_sequences(tensordict, mask).sum().clamp_min(1)
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
        cur_log_prob = tensordict.get(CURRENT_LOG_PROB_KEY)
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

