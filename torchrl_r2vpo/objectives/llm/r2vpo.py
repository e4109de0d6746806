"""R2VPO for language models: the token-level ratio-variance loss."""

from __future__ import annotations

import functools
from typing import Literal

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import expand_as_right
from torchrl.objectives.llm import GRPOLoss, LLMLossOutput

from torchrl_r2vpo._compat import (
    CURRENT_LOG_PROB_KEY,
    grpo_log_weight,
    is_dynamo_compiling,
    log_clip_bounds,
)
from torchrl_r2vpo.objectives.llm.accumulation import _STATISTICS, GradientAccumulationMixin
from torchrl_r2vpo.objectives.proximal import check_max_behaviour_weight, check_ratio_form
from torchrl_r2vpo.objectives.ratio_variance import (
    at_least_float32,
    LagrangianMixin,
    nan_without_valid,
    RatioStats,
    squared_deviation,
)

__all__ = ["R2VPOLLMLoss", "R2VPOLLMLossOutput"]


class R2VPOLLMLossOutput(LLMLossOutput):
    """Output of :class:`R2VPOLLMLoss`.

    Adds to :class:`~torchrl.objectives.llm.LLMLossOutput` the penalty
    ``loss_ratio_var``, the constraint statistic ``ratio_var``, the multiplier,
    ratio diagnostics, and the detached sufficient statistics (``ratio_sum``,
    ``ratio_sq_sum`` in float64, ``num_tokens``, ``ratio_weight_sum``) that
    :func:`~torchrl_r2vpo.merge_ratio_stats` adds up across micro-batches.
    """

    loss_ratio_var: torch.Tensor | None = None
    ratio_var: torch.Tensor | None = None
    lagrange_multiplier: torch.Tensor | None = None
    ratio_sum: torch.Tensor | None = None
    ratio_sq_sum: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    ratio_weight_sum: torch.Tensor | None = None
    mean_ratio: torch.Tensor | None = None
    max_ratio: torch.Tensor | None = None


class R2VPOLLMLoss(LagrangianMixin, GradientAccumulationMixin, GRPOLoss):
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

    **Stale data.** When the input also holds the log-probabilities under the
    *proximal* policy ``pi_prox``, the policy at the start of the current update
    (tensor key ``proximal_log_prob``, by default ``("proximal_log_probs", "full")``,
    computed once per update without gradient), the ratio is decoupled
    (``ratio="proximal"``, the default; :mod:`torchrl_r2vpo.objectives.proximal`):

    .. code-block:: text

        r = pi_theta / pi_prox,   w = sg(min(pi_prox / pi_b, c))
        loss = -mean(w r A) + lambda Var(r)

    so the constraint, and the dual variable that reads ``ratio_var``, measure the
    step of this update (``r == 1``, up to rounding, at its first optimiser step, for fresh and
    stale tokens alike), while ``w`` corrects for the age of the data. ``Var(r)``
    is pooled over all tokens, whatever their age; it is unweighted by default, and with
    ``weighted_variance=True`` it is the self-normalised importance-weighted variance
    under ``pi_prox``, each token's penalty scaled by its ``w``:

    .. code-block:: text

        Var_w(r) = sum w (r - rbar_w)^2 / sum w,    rbar_w = sum w r / sum w

    A stale token that ``pi_prox`` has made unlikely (``w`` near 0) then barely counts:
    unweighted, such a token's ratio can grow by hundreds within one update (its
    probability under ``pi_prox`` is tiny) and the penalty's gradient,
    ``2 lambda (r - rbar) r / N``, grows with its square. Without the key,
    or with ``pi_prox == pi_b`` (nothing stale), the loss is the one above.
    ``ratio="behaviour"`` ignores the key: ``r = pi_theta / pi_b``, the papers'
    literal reading, whose penalty pulls the policy back toward the old policies
    that sampled stale data.

    The loss owns ``lambda`` (the ``lagrange_multiplier`` buffer) and the target
    ``delta`` (``ratio_var_target``), both saved in the ``state_dict``, but never
    updates them: :class:`~torchrl_r2vpo.DualVariableScheduler` does, from the
    ``ratio_var`` the loss reports (the LLM setting uses this adaptive dual
    variable). ``forward`` is pure apart from the ``last_ratio_var`` and
    ``last_ratio_stats`` records.

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
        check_finite (bool, optional): raise a ``ValueError`` on a non-finite
            ratio or advantage at a valid token, or a ``lagrange_multiplier``
            buffer out of bounds (see below); warn when tokens are left out for a
            non-finite behaviour log-probability, and raise when none is left
            (one host synchronisation per call; skipped under
            ``torch.compile``). Defaults to ``True``.
        ratio (str, optional): ``"proximal"`` (decoupled, when the input holds
            the proximal log-probabilities) or ``"behaviour"``. Defaults to
            ``"proximal"``.
        max_behaviour_weight (float, optional): the truncation ``c >= 1`` of the
            behaviour weight ``w``; ``None`` for none. Defaults to ``2.0``.
        weighted_variance (bool, optional): weigh each token's term of ``Var(r)``
            (the penalty, ``ratio_var`` and the sums) by ``w``. Inside
            :meth:`accumulation` it needs ``ratio_weight_sum``. Defaults to ``False``.
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
    ``ratio_sq_sum`` (float64) and ``num_tokens`` for :func:`~torchrl_r2vpo.merge_ratio_stats`.
    With no valid token the ``loss_*`` terms are 0, the counts and sums are 0 and
    every other statistic (all the diagnostics but ``lagrange_multiplier``) is NaN.
    ``ratio_var`` is a token-level statistic for every ``aggregation``, and
    ``loss_ratio_var`` is ``lambda * ratio_var`` for every one too (``prompt_mean``
    weighs the objective per sequence, the constraint stays on tokens). Each
    call also records ``ratio_var`` in the non-persistent ``last_ratio_var``
    buffer, which a scheduler stepped without argument reads, and the sums in
    ``last_ratio_stats`` (a :class:`~torchrl_r2vpo.objectives.ratio_variance.RatioStats`:
    count, sum, sum of squares). The loss implements
    :class:`~torchrl_r2vpo.objectives.ratio_variance.LagrangianLoss`, the protocol
    the scheduler reads.

    **Bad input.** As TorchRL's GRPOLoss, the loss leaves out the tokens whose stored
    behaviour log-probability is not finite (NaN, ``-inf`` or ``+inf``); it warns with
    their share, and raises a ``ValueError`` when no token is left (with
    ``check_finite``). :class:`~torchrl_r2vpo.R2VPOLoss` raises on any such sample
    instead: in control such a sample marks a broken collector, whereas an LLM
    inference engine may return a non-finite log-probability for a few tokens. An
    empty batch, a missing entry and a non-boolean mask raise an error naming the
    entry and its ``tensor_keys`` field (see
    :class:`~torchrl_r2vpo.objectives.llm.accumulation.GradientAccumulationMixin`).
    ``lambda`` is read within its bounds (NaN and values below 0 as 0), so a value
    written into the buffer in place (``fill_``, which bypasses the check on
    assignment) is never used out of bounds; with ``check_finite`` it raises a
    ``ValueError``.

    .. note:: Step :class:`~torchrl_r2vpo.DualVariableScheduler` on the
       output (or ``output.ratio_var``) after a single-batch update, on the
       :func:`~torchrl_r2vpo.merge_ratio_stats` of the micro-batch outputs after an
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
        ratio: Literal["proximal", "behaviour"] = "proximal",
        max_behaviour_weight: float | None = 2.0,
        weighted_variance: bool = True,
        **kwargs,
    ):
        check_ratio_form(ratio)
        check_max_behaviour_weight(max_behaviour_weight)
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
        self.decoupled = ratio == "proximal"
        self.max_behaviour_weight = max_behaviour_weight
        self.weighted_variance = bool(weighted_variance)

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
                    "ratio_weight_sum",
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
        self._check_input(tensordict)
        check = self.check_finite and not is_dynamo_compiling()
        token_counts = self._behaviour_token_counts(tensordict) if check else None
        tensordict, weight = self._decouple_with_weight(tensordict)
        tensordict = self._zero_unused_advantage(tensordict)
        advantage = tensordict.get(self.tensor_keys.advantage, None, as_padded_tensor=True)
        if advantage is None:
            raise ValueError(f"Advantage key {self.tensor_keys.advantage} not in tensordict.")
        log_weight, dist, kl_approx, mask = grpo_log_weight(
            self, tensordict, advantage.shape[:-1]
        )
        if advantage.ndim != log_weight.ndim:
            raise ValueError(
                "advantage and log_weight must have the same number of dimensions, got "
                f"{advantage.ndim=} and {log_weight.ndim=}: store the advantage as "
                "[N, 1, 1] (one value per sequence) or [N, L, 1] (per token)."
            )
        log_weight = at_least_float32(log_weight)  # bfloat16 ratios skew ratio_var
        ratio = log_weight.exp()
        if check:
            self._check_finite(ratio, advantage, mask, token_counts)
        if not self.weighted_variance or weight is None:
            weight = None
        else:
            weight = weight.to(ratio.dtype).unsqueeze(-1)  # [N, L, 1], as the ratio
        stats = RatioStats.of(ratio, mask, weight)
        center = self._ratio_center(stats, ratio)

        # Each per-token term is aggregated as soon as it exists, so that no
        # [N, L] loss tensor outlives its reduction; the squared deviation
        # saves only the ratio (already saved by exp) for backward.
        aggregate = functools.partial(self._aggregate_loss_value, mask=mask, tensordict=tensordict)
        # the penalty is lambda times the token-level ratio_var under every aggregation
        # (prompt_mean weighs the objective per sequence, not the constraint)
        per_token = self.aggregation == "none" or self.reduction == "none"
        if per_token:
            aggregate_penalty = aggregate
        elif weight is None:
            aggregate_penalty = functools.partial(self._token_mean, mask=mask, tensordict=tensordict)
        else:
            aggregate_penalty = functools.partial(self._weight_mean, mask=mask,
                                                  tensordict=tensordict, stats=stats)
        penalty = squared_deviation(ratio, center)
        if weight is not None:
            penalty = weight * penalty
        td_out = TensorDict()
        td_out.set("loss_objective", aggregate(-ratio * advantage))
        td_out.set("loss_ratio_var", aggregate_penalty(self._multiplier() * penalty))
        del penalty
        td_out.update(self._ratio_diagnostics(log_weight.detach(), kl_approx, mask, stats, center))
        if self.entropy_bonus:
            entropy = self._get_entropy(dist, adv_shape=advantage.shape[:-1])
            td_out.set("entropy", entropy.detach().mean())
            td_out.set("loss_entropy", aggregate(-self.entropy_coeff * entropy))
            del entropy
        self._add_kl_terms(tensordict, td_out, mask, dist)
        nan_without_valid(td_out, mask.any(), _STATISTICS)
        self._record_ratio_stats(td_out.get("ratio_var"), stats)
        del tensordict[CURRENT_LOG_PROB_KEY]
        return self.output_type.from_tensordict(td_out)

    @torch.no_grad()
    def _ratio_diagnostics(
        self,
        log_weight: torch.Tensor,
        kl_approx: torch.Tensor,
        mask: torch.Tensor,
        stats: RatioStats,
        center: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The detached statistics: GRPOLoss's diagnostics, with its definitions
        (``clip_fraction``, ``kl_approx``: means over all padded positions), and
        R2VPO's own over the valid tokens, from the float64 sums."""
        count = mask.sum()
        # the (weighted) mean of (r - c)^2 over the valid tokens; NaN without any
        ratio_var = stats.variance(center).to(log_weight.dtype)
        clipped = log_weight.clamp(*log_clip_bounds(self))
        valid_lw = torch.where(expand_as_right(mask, log_weight), log_weight, float("-inf"))
        flat = valid_lw.flatten()
        # ESS / n = mean(r)^2 / mean(r^2) over the valid tokens, in log space
        log_ess = 2 * flat.logsumexp(0) - (2 * flat).logsumexp(0)
        return {
            "clip_fraction": (clipped != log_weight).to(log_weight.dtype).mean(),
            "kl_approx": kl_approx.detach().mean(),
            "ESS": log_ess.exp() / count,
            "ratio_var": ratio_var,
            "lagrange_multiplier": self._multiplier().detach(),
            "ratio_sum": stats.ratio_sum,
            "ratio_sq_sum": stats.ratio_sq_sum,
            "num_tokens": count,
            "ratio_weight_sum": stats.count,
            "mean_ratio": stats.mean.to(log_weight.dtype),
            "max_ratio": flat.max().exp(),
        }

    def _weight_mean(self, value: torch.Tensor, mask: torch.Tensor, tensordict: TensorDictBase,
                     stats: RatioStats) -> torch.Tensor:
        """The sum of ``value`` (already weighted) over the valid tokens divided by the
        weights' sum (this call's, or the full batch's inside :meth:`accumulation`): the
        token mean times ``num_tokens / sum w``, exactly the token mean when ``w == 1``."""
        acc = self._accumulation
        if acc is None:
            num_tokens, weight_sum = mask.sum(), stats.count
        elif acc.ratio_weight_sum is None:
            raise ValueError(
                "accumulation() with weighted_variance=True on stale data needs "
                "ratio_weight_sum, the full batch's sum of behaviour weights (see "
                "count_weight()).")
        else:
            num_tokens, weight_sum = acc.num_tokens, acc.ratio_weight_sum
        scale = torch.as_tensor(num_tokens, dtype=torch.float64, device=value.device) / torch.as_tensor(
            weight_sum, dtype=torch.float64, device=value.device).clamp_min(1e-300)
        return self._token_mean(value, mask, tensordict) * scale.to(value.dtype)

    def _ratio_center(self, stats: RatioStats, ratio: torch.Tensor) -> torch.Tensor:
        """``rbar``: 1, the full batch's mean inside :meth:`accumulation` (when given), or
        the mean over this call's valid tokens."""
        if self.variance_center == "one":
            return torch.ones((), dtype=ratio.dtype, device=ratio.device)
        acc = self._accumulation
        if acc is not None and acc.ratio_mean is not None:
            return torch.as_tensor(acc.ratio_mean, device=ratio.device).to(ratio.dtype)
        return stats.mean.to(ratio.dtype)

    def _check_finite(self, ratio: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor,
                      token_counts: torch.Tensor) -> None:
        """Raises a ``ValueError`` when no token is left, or on a non-finite advantage or
        ratio at a valid token, or the multiplier out of bounds; warns when tokens are
        left out (:meth:`_behaviour_token_counts`). One host synchronisation."""
        def finite(value):
            return (torch.isfinite(value) | ~expand_as_right(mask, value)).all()

        selected, dropped, advantage_ok, ratio_ok, multiplier_ok = torch.cat([
            token_counts,
            torch.stack([finite(advantage.expand_as(ratio)), finite(ratio),
                         self._multiplier_in_bounds()]).to(token_counts.dtype),
        ]).tolist()
        self._check_dropped_tokens(selected, dropped)
        if not advantage_ok:
            raise ValueError(
                f"The advantage (key {self.tensor_keys.advantage!r}) holds NaN or inf at valid "
                "tokens."
            )
        if not ratio_ok:
            raise ValueError(
                "The importance ratio is NaN or inf at valid tokens: the current "
                f"policy's log-probability of the stored tokens (key {self.tensor_keys.action!r}) "
                "is not finite, or the policy is extremely far from the one that "
                "sampled them (stale data, or too large a step)."
            )
        self._check_multiplier(multiplier_ok)

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
