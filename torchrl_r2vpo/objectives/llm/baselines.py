"""The LLM baselines, on R2VPO's data path: GRPO, GRPO-CH (DAPO), CISPO, GPPO, TOPR, SPO,
and the stale-data methods: decoupled GRPO (AReaL), GRPO with truncated importance sampling,
M2PO.

Each is a :class:`~torchrl.objectives.llm.GRPOLoss` with
:class:`~torchrl_r2vpo.objectives.llm.accumulation.GradientAccumulationMixin`, so it
masks and aggregates exactly as :class:`~torchrl_r2vpo.R2VPOLLMLoss` does; only the
per-token objective (``_compute_policy_objective``) differs.
"""

from __future__ import annotations

import torch
from torchrl.objectives.llm import (
    CISPOLoss,
    CISPOLossOutput,
    DAPO,
    DAPOLossOutput,
    GRPOLoss,
    GRPOLossOutput,
    LLMLossOutput,
)

from tensordict import TensorDictBase
from tensordict.utils import expand_as_right

from torchrl_r2vpo._compat import log_clip_bounds
from torchrl_r2vpo.objectives.llm.accumulation import GradientAccumulationMixin
from torchrl_r2vpo.objectives.proximal import check_max_behaviour_weight
from torchrl_r2vpo.objectives.ratio_variance import check_non_negative

__all__ = [
    "CISPOLLMLoss",
    "DAPOLLMLoss",
    "DecoupledGRPOLLMLoss",
    "GPPOLLMLoss",
    "GRPOLLMLoss",
    "GRPOTISLLMLoss",
    "M2POLLMLoss",
    "SPOLLMLoss",
    "TOPRLLMLoss",
    "score_function_unit",
]


def score_function_unit(log_weight: torch.Tensor) -> torch.Tensor:
    r"""``r / sg(r) = exp(log_weight - sg(log_weight))``: the value 1, with the gradient
    of ``log pi_theta``.

    Multiplying a detached weight by it gives the score-function (REINFORCE)
    surrogate of that weight:

    .. code-block:: text

        sg(w) * score_function_unit(log_weight)   value: w    gradient: w * grad log pi_theta

    since ``d r / d theta = r * grad log pi_theta`` and ``r / sg(r)`` is 1 in value.
    (``sg`` is the stop-gradient, ``detach``.)

    Examples:
        >>> import torch
        >>> from torchrl_r2vpo.objectives.llm.baselines import score_function_unit
        >>> log_weight = torch.tensor([0.5, -1.0], requires_grad=True)
        >>> unit = score_function_unit(log_weight)
        >>> unit.detach()
        tensor([1., 1.])
        >>> (torch.tensor([2.0, 3.0]) * unit).sum().backward()
        >>> log_weight.grad  # the weights: the gradient of w * log pi
        tensor([2., 3.])
    """
    return (log_weight - log_weight.detach()).exp()


class GRPOLLMLoss(GradientAccumulationMixin, GRPOLoss):
    r"""GRPO: TorchRL's :class:`~torchrl.objectives.llm.GRPOLoss`, unchanged, plus
    :meth:`~torchrl_r2vpo.R2VPOLLMLoss.accumulation`.

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


class DAPOLLMLoss(GradientAccumulationMixin, DAPO):
    r"""GRPO-CH (clip-higher, from DAPO): GRPO with an asymmetric band.

    .. code-block:: text

        loss_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A),   (eps_low, eps_high) = (0.2, 0.28)

    TorchRL's :class:`~torchrl.objectives.llm.DAPO` with the paper's band as
    the default ``clip_epsilon``, plus
    :meth:`~torchrl_r2vpo.R2VPOLLMLoss.accumulation`.
    DAPO's dynamic sampling lives in the data path
    (:class:`~torchrl.objectives.llm.MCAdvantage` ``keep_return_bounds``), and its
    token-level mean is ``aggregation="token_mean"``.

    Reference: DAPO, Yu et al. 2025, https://arxiv.org/abs/2503.14476
    """

    output_type: type[LLMLossOutput] = DAPOLossOutput

    def __init__(self, actor_network=None, *, clip_epsilon=(0.2, 0.28), **kwargs):
        super().__init__(actor_network, clip_epsilon=clip_epsilon, **kwargs)


class CISPOLLMLoss(GradientAccumulationMixin, CISPOLoss):
    r"""CISPO: REINFORCE weighted by a clipped, *detached* importance ratio.

    .. code-block:: text

        loss_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A * log pi_theta(y_t)

    implemented as ``-sg(clip(r)) * A * r / sg(r)`` (:func:`score_function_unit`):
    the forward value is ``-clip(r) A`` (as TorchRL's
    :class:`~torchrl.objectives.llm.CISPOLoss`) and the gradient
    ``-clip(r) A grad log pi`` for *every* token. TorchRL
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
        weight = log_weight.detach().clamp(*log_clip_bounds(self))
        clip_fraction = (weight != log_weight.detach()).to(log_weight.dtype).mean()
        return -weight.exp() * advantage * score_function_unit(log_weight), clip_fraction


class GPPOLLMLoss(GradientAccumulationMixin, GRPOLoss):
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
        check_non_negative("beta_low", beta_low)
        check_non_negative("beta_high", beta_high)
        super().__init__(actor_network, **kwargs)
        self.beta_low = beta_low
        self.beta_high = beta_high

    def _compute_policy_objective(
        self, log_weight: torch.Tensor, advantage: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = log_clip_bounds(self)
        lw = log_weight.detach()
        high_clipped = (advantage > 0) & (lw > high)
        low_clipped = (advantage < 0) & (lw < low)
        unit = score_function_unit(log_weight)
        coeff = torch.where(
            high_clipped,
            self.beta_high * high.exp() * unit,
            torch.where(low_clipped, self.beta_low * low.exp() * unit, log_weight.exp()),
        )
        clip_fraction = (high_clipped | low_clipped).to(log_weight.dtype).mean()
        return -coeff * advantage, clip_fraction


class TOPRLLMLoss(GradientAccumulationMixin, GRPOLoss):
    r"""TOPR: tapered off-policy REINFORCE.

    Positive samples get an unweighted (SFT-like) log-likelihood gradient,
    negative ones a truncated importance ratio ``min(r, 1)``:

    .. code-block:: text

        loss_t = -w_+ A log pi_theta(y_t)                    if A > 0
               = -w_- sg(min(r_t, 1)) A log pi_theta(y_t)    if A <= 0

    implemented as ``-sg(w) A r / sg(r)`` (:func:`score_function_unit`): the forward
    value is ``-w A`` and the gradient ``-w A grad log pi``. The split uses the sign
    of the advantage (in the sequence-batch layout, the group-normalised reward of
    the sequence); the paper splits on the reward itself, so feed the raw reward as
    the advantage to follow it exactly. The ratio is per token, as in ROLL's
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
        check_non_negative("positive_weight", positive_weight)
        check_non_negative("negative_weight", negative_weight)
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
        return -weight * advantage * score_function_unit(log_weight), clip_fraction


class SPOLLMLoss(GradientAccumulationMixin, GRPOLoss):
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
            outside = log_weight.clamp(*log_clip_bounds(self)) != log_weight
            clip_fraction = outside.to(log_weight.dtype).mean()
        return -(ratio * advantage - penalty), clip_fraction



class DecoupledGRPOLLMLoss(GRPOLLMLoss):
    r"""Decoupled GRPO, as AReaL trains on stale data: the clip on the proximal ratio, the
    behaviour policy corrected by a detached weight.

    .. code-block:: text

        r = pi_theta / pi_prox,   w = sg(pi_prox / pi_b)
        loss_t = -w * min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)

    ``pi_prox`` is the policy at the start of the current update, read from the
    ``proximal_log_prob`` tensor key (see :mod:`torchrl_r2vpo.objectives.proximal`); without
    it the loss is :class:`GRPOLLMLoss`. Tokens with ``w > max_behaviour_weight`` get weight 0
    (``behaviour_weight_mode="mask"``, AReaL's ``behav_imp_weight_cap``: no policy gradient,
    still counted in the token mean) or their weight is truncated (``"truncate"``). The clip
    then bounds the step of this update, whatever the age of the data, where :class:`GRPOLLMLoss` on stale data clips ``pi_theta / pi_b`` and
    gives no gradient for the tokens already outside the band.

    Reference: Fu et al. 2025, "AReaL: A Large-Scale Asynchronous Reinforcement Learning
    System for Language Reasoning", https://arxiv.org/abs/2505.24298; decoupled PPO:
    Hilton et al. 2021, https://arxiv.org/abs/2110.00641

    Keyword Args:
        max_behaviour_weight (float, optional): the bound ``>= 1`` of ``w``; ``None`` for
            none. Defaults to ``None``.
        behaviour_weight_mode (str, optional): ``"mask"`` or ``"truncate"``. Defaults to
            ``"mask"``.
        **kwargs: every :class:`~torchrl.objectives.llm.GRPOLoss` keyword argument
            (``clip_epsilon`` defaults to ``0.2``).
    """

    decoupled = True

    def __init__(self, actor_network=None, *, max_behaviour_weight: float | None = None,
                 behaviour_weight_mode: str = "mask", **kwargs):
        check_max_behaviour_weight(max_behaviour_weight, behaviour_weight_mode)
        super().__init__(actor_network, **kwargs)
        self.max_behaviour_weight = max_behaviour_weight
        self.behaviour_weight_mode = behaviour_weight_mode


class GRPOTISLLMLoss(DecoupledGRPOLLMLoss):
    r"""GRPO with truncated importance sampling (TIS): decoupled GRPO whose behaviour weight
    is truncated at ``c``.

    .. code-block:: text

        loss_t = -min(pi_prox / pi_b, c) * min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
        r = pi_theta / pi_prox

    The truncation trades the bias of a bounded weight for the variance of an unbounded
    one, as verl's and slime's rollout corrections do. ``max_behaviour_weight`` (``c``)
    defaults to ``2.0``.

    Reference: Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy
    RL Training", https://fengyao.notion.site/off-policy-rl; Ionides 2008, "Truncated
    importance sampling".
    """

    def __init__(self, actor_network=None, *, max_behaviour_weight: float | None = 2.0,
                 behaviour_weight_mode: str = "truncate", **kwargs):
        super().__init__(actor_network, max_behaviour_weight=max_behaviour_weight,
                         behaviour_weight_mode=behaviour_weight_mode, **kwargs)


def second_moment_mask(log_ratio: torch.Tensor, mask: torch.Tensor, threshold: float
                       ) -> torch.Tensor:
    r"""M2PO's mask: ``mask`` without the fewest tokens of largest ``(log r)^2`` that bring
    the mean of ``(log r)^2`` over the kept tokens to ``<= threshold``.

    The tokens are sorted by ``m = (log r)^2``, largest first; the ``k`` first are dropped,
    with ``k`` the smallest count whose remainder has a mean ``<= threshold`` (at least one
    token is kept).

    Examples:
        >>> import torch
        >>> log_ratio = torch.tensor([0.0, 0.1, -0.1, 1.0, 0.0])
        >>> second_moment_mask(log_ratio, torch.ones(5, dtype=torch.bool), 0.04)
        tensor([ True,  True,  True, False,  True])
    """
    m2 = log_ratio.detach().double().pow(2)[mask]
    count = m2.numel()
    if count == 0:
        return mask
    sorted_m2, order = m2.sort(descending=True)
    # the mean of (log r)^2 once the k largest are dropped, for k = 0 .. count - 1
    remainder_mean = sorted_m2.flip(0).cumsum(0).flip(0) / torch.arange(
        count, 0, -1, dtype=m2.dtype, device=m2.device)
    under = (remainder_mean <= threshold).nonzero()
    dropped = int(under[0]) if under.numel() else count - 1
    kept = torch.empty_like(mask[mask])
    kept[order] = torch.arange(count, device=m2.device) >= dropped
    out = mask.clone()
    out[mask] = kept
    return out


class M2POLLMLoss(GRPOLLMLoss):
    r"""M2PO: second-moment trust region by masking, for stale data.

    .. code-block:: text

        M2 = mean over valid tokens of (log r)^2,   r = pi_theta / pi_b
        drop the tokens of largest (log r)^2 until M2 over the rest is <= tau
        loss_t = -M_t * r_t * A        (unclipped; token mean over the kept tokens)

    The mask is recomputed at each call from the current ratio (detached); it depends on
    the current policy, so :meth:`accumulation` refuses it, as it refuses
    ``kl_mask_threshold``. ``clip_fraction`` reports the share of valid tokens masked.

    Reference: Zheng et al. 2025, "Prosperity before Collapse: How Far Can Off-Policy RL
    Reach with Stale Data on LLMs?", https://arxiv.org/abs/2510.01161

    Keyword Args:
        m2_threshold (float, optional): ``tau``. Defaults to ``0.04``, the paper's.
        **kwargs: every :class:`~torchrl.objectives.llm.GRPOLoss` keyword argument
            (``clip_epsilon`` is unused).
    """

    def __init__(self, actor_network=None, *, m2_threshold: float = 0.04, **kwargs):
        if not m2_threshold > 0:
            raise ValueError(f"m2_threshold must be > 0, got {m2_threshold}.")
        super().__init__(actor_network, **kwargs)
        self.m2_threshold = m2_threshold

    def accumulation(self, *args, **kwargs):
        raise ValueError("accumulation() is not exact with M2POLLMLoss: its mask depends on "
                         "the current policy and on the whole batch.")

    def _log_weight(self, tensordict: TensorDictBase, adv_shape: torch.Size):
        log_weight, dist, kl_approx, mask = super()._log_weight(tensordict, adv_shape)
        kept = second_moment_mask(log_weight.squeeze(-1) if log_weight.dim() > mask.dim()
                                  else log_weight, mask, self.m2_threshold)
        self._masked_share = ((mask & ~kept).sum() / mask.sum().clamp_min(1)).to(log_weight.dtype)
        log_weight = torch.where(expand_as_right(kept, log_weight), log_weight, 0.0)
        return log_weight, dist, kl_approx, kept

    def _compute_policy_objective(
        self, log_weight: torch.Tensor, advantage: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return -log_weight.exp() * advantage, self._masked_share
