"""R2VPO: PPO with a ratio-variance constraint instead of ratio clipping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from tensordict import is_tensor_collection, NestedKey, TensorDict, TensorDictBase
from tensordict.nn import dispatch, ProbabilisticTensorDictSequential, TensorDictModule
from torchrl.objectives import PPOLoss

from torchrl_r2vpo._compat import (
    broadcast_advantage_to_log_weight,
    check_advantage_broadcast,
    input_validity_mask,
    is_dynamo_compiling,
    maybe_get_or_select,
    maybe_normalize_advantage,
    ppo_log_weight,
    reduce_loss,
    sum_td_features,
)
from torchrl_r2vpo.modules.exploration import UpdateMeanNoise
from torchrl_r2vpo.objectives.proximal import (
    behaviour_log_weight,
    check_max_behaviour_weight,
    check_ratio_form,
)
from torchrl_r2vpo.objectives.ratio_variance import (
    at_least_float32,
    check_loss_input,
    LagrangianMixin,
    masked_mean,
    nan_without_valid,
    RatioStats,
    reject_unknown_kwargs,
)

__all__ = ["R2VPOLoss"]

# the statistics over the valid positions: NaN when there is none
_STATISTICS = ("ratio_var", "kl_approx", "ESS", "clip_fraction", "mean_ratio", "max_ratio",
               "entropy", "explained_variance", "value_clip_fraction")


class R2VPOLoss(LagrangianMixin, PPOLoss):
    r"""Ratio-Variance Regularized Policy Optimization (R2VPO) loss.

    R2VPO replaces PPO's ratio clipping by a constraint on the variance of the
    importance ratio :math:`r = \pi_\theta(a|s) / \pi_b(a|s)`, enforced with a
    Lagrange multiplier :math:`\lambda \geq 0`:

    .. code-block:: text

        maximise    E_b[r * A]
        subject to  V = E_b[(r - rbar)^2] <= delta

        loss = -mean(r * A) + lambda * mean((r - rbar)^2)    (lambda held fixed)

    ``rbar`` is the detached (masked) batch mean of ``r`` (``variance_center="mean"``,
    the paper's "second central moment") or exactly 1 (``variance_center="one"``,
    an unbiased estimate of the Pearson chi-square divergence on on-policy data).
    Detaching ``rbar`` does not change the gradient, since the deviations sum to
    zero. Per sample, the gradient with respect to the policy log-probability is

    .. code-block:: text

        d loss / d log pi_theta(a_i|s_i) = -(r_i / N) * (A_i - 2 * lambda * (r_i - rbar))

    so each sample has the *effective advantage* ``A - 2 * lambda * (r - rbar)``:
    where PPO's clip zeroes a sample's gradient outside ``[1 - eps, 1 + eps]``,
    this push shrinks linearly and reverses past ``r - rbar = A / (2 * lambda)``.

    **Link to a KL trust region.** With :math:`\pi_\theta = \pi_b (1 + \epsilon)` and
    :math:`E_b[\epsilon] = 0`, both :math:`KL(\pi_b \| \pi_\theta)` and
    :math:`KL(\pi_\theta \| \pi_b)` equal :math:`\tfrac12 E_b[\epsilon^2] + O(\epsilon^3)`,
    and :math:`E_b[\epsilon^2] = Var_b(r)`. A KL budget ``kl_target`` therefore
    maps to the variance target ``delta = 2 * kl_target`` for small steps; pass
    ``kl_target=`` instead of ``ratio_var_target=`` to use it.

    **Stale data.** When the input also holds the log-probabilities under the
    *proximal* policy ``pi_prox``, the policy at the start of the current update
    (tensor key ``proximal_log_prob``, computed once per update without gradient for
    every stored sample, fresh and replayed), the ratio is decoupled
    (``ratio="proximal"``, the default; :mod:`torchrl_r2vpo.objectives.proximal`):

    .. code-block:: text

        r = pi_theta / pi_prox,   w = sg(min(pi_prox / pi_b, c))
        loss = -mean(w * r * A) + lambda * mean((r - rbar)^2)

    so the constraint, ``ratio_var`` (which the dual variable reads) and the ratio
    diagnostics (``ESS``, ``clip_fraction``, ``mean_ratio``, ``max_ratio``, and
    ``kl_approx``, then ``log(pi_prox / pi_theta)``) measure the step of this update
    (``r == 1``, up to rounding, at its first optimiser step, whatever the data's age), while ``w``
    corrects for the age of the data. Without the key, or with ``pi_prox == pi_b``
    (nothing stale), the loss is the one above, value and gradient.
    ``ratio="behaviour"`` ignores the key: ``r = pi_theta / pi_b``, whose penalty
    pulls the policy back toward the old policies that sampled stale data.

    The loss owns ``lambda`` (the ``lagrange_multiplier`` buffer) but never
    updates it: :class:`~torchrl_r2vpo.DualVariableScheduler` does, from the
    ``ratio_var`` the loss reports. Without a scheduler ``lambda`` stays fixed,
    which is the paper's setting for continuous control.

    Reference: "Ratio-Variance Regularized Policy Optimization", Luo et al.,
    ICML 2026, https://arxiv.org/abs/2605.26784

    Args:
        actor_network (ProbabilisticTensorDictSequential): the policy. It must
            write the action log-probability when collecting data.
        critic_network (ValueOperator, optional): the value network. Without it,
            the input must already carry the advantage.

    Keyword Args:
        ratio_var_target (float, optional): the variance target ``delta``, read
            by :class:`~torchrl_r2vpo.DualVariableScheduler`. Defaults to
            ``0.02`` (a KL budget of 0.01).
        kl_target (float, optional): a KL budget; sets ``ratio_var_target`` to
            ``2 * kl_target``. Exclusive with ``ratio_var_target``.
        lagrange_multiplier (float, optional): the initial multiplier ``lambda``.
            A sample's push stops at ``r - rbar = A / (2 * lambda)``. Defaults
            to ``0.5``.
        variance_center (str, optional): ``"mean"`` (centre on the detached batch
            mean of the ratio) or ``"one"``. Defaults to ``"mean"``.
        diagnostic_clip_epsilon (float, optional): the band ``[1 - eps, 1 + eps]``
            used only for the ``clip_fraction`` diagnostic (the share of samples
            PPO would have clipped). Defaults to ``0.2``.
        check_finite (bool, optional): raise a ``ValueError`` naming the input
            when a log-probability (stored behaviour or proximal, or the current
            one of the stored action: NaN, ``-inf`` or ``+inf``), a ratio or an
            advantage is not finite at a valid position, or when the
            ``lagrange_multiplier`` buffer is out of bounds (see below). Costs
            one host-device synchronisation per call; it is skipped under
            ``torch.compile``, and can be disabled for CUDA-graph loops.
            Defaults to ``True``.
        ratio (str, optional): ``"proximal"`` (decoupled, when the input holds
            the proximal log-probabilities) or ``"behaviour"``. Defaults to
            ``"proximal"``.
        max_behaviour_weight (float, optional): the truncation ``c >= 1`` of the
            behaviour weight ``w``; ``None`` for none. Defaults to ``2.0``.
        weighted_variance (bool, optional): with the proximal key, weigh each
            sample's term of the variance by its behaviour weight ``w`` (the
            self-normalised ``sum w (r - rbar_w)^2 / sum w``, ``rbar_w`` the
            weighted mean), as :class:`~torchrl_r2vpo.R2VPOLLMLoss` does.
            Defaults to ``False``.
        **kwargs: every other :class:`~torchrl.objectives.PPOLoss` keyword
            argument (``entropy_coeff``, ``critic_coeff``, ``loss_critic_type``,
            ``normalize_advantage``, ``reduction``, ``functional``,
            ``delay_actor``, ``max_importance_ratio``, ...).

    **Which ratio.** The objective is weighted by the behaviour ratio
    ``pi_theta / pi_behaviour``, capped at ``max_importance_ratio`` if set. The
    constraint, ``ratio_var`` and the ratio diagnostics use the uncapped ratio
    to the *proximal* policy: the behaviour policy by default, or the delayed
    copy of the actor with ``delay_actor=True`` (PPO-EWMA), exactly where
    :class:`~torchrl.objectives.ClipPPOLoss` applies its clip. Without
    ``delay_actor`` and ``max_importance_ratio`` the two coincide. With the
    ``proximal_log_prob`` key (``ratio="proximal"``) the proximal policy is the
    stored one, and ``max_importance_ratio`` caps ``w * r``; the key and
    ``delay_actor`` (a second proximal policy) are exclusive: the loss raises a
    ``ValueError`` when given both.

    With RPO's noise on the actor's mean (an active
    :class:`~torchrl_r2vpo.modules.UpdateMeanNoise` in the actor), the objective takes the
    ratio of the perturbed policy and the constraint and diagnostics that of the policy
    itself, from a second pass of the actor with the noise paused: the penalty bounds the
    policy's step, not the injected noise (on the perturbed ratio it would, and pull the
    scale up to absorb it).

    The input keys are TorchRL's (:meth:`~torchrl.objectives.LossModule.set_keys`:
    ``advantage``, ``value_target``, ``value``, ``sample_log_prob``, ``action``,
    ``reward``, ``done``, ``terminated``) and ``proximal_log_prob``
    (default ``"proximal_log_prob"``, optional: the joint log-probability
    :math:`\log \pi_{prox}(a|s)` of the stored action, shaped as ``sample_log_prob``
    or, for a composite action, as the advantage without its last dimension).

    The output holds ``loss_objective``, ``loss_ratio_var`` and, when enabled,
    ``loss_entropy`` and ``loss_critic`` (trainers sum the ``loss_*`` entries),
    and the detached diagnostics ``ratio_var``, ``lagrange_multiplier``,
    ``kl_approx``, ``ESS`` (normalised effective sample size,
    ``1 / (1 + Var(r) / mean(r)^2)``), ``clip_fraction``, ``mean_ratio``,
    ``max_ratio``, ``entropy`` and, with a critic, ``explained_variance`` (one
    scalar). All statistics, and the advantage
    normalisation, are taken over the valid positions selected by
    :attr:`~torchrl.objectives.LossModule.loss_mask_key`. With no valid position
    every ``loss_*`` term is 0 and every statistic (all the diagnostics but
    ``lagrange_multiplier``) is NaN; the scheduler skips a NaN ``ratio_var``. Padding
    may hold anything in the stored entries (log-probabilities, advantages, value
    targets), but the networks' inputs there must be finite, as TorchRL's collectors
    pad them (zeros): a NaN observation gives NaN gradients through the networks even
    at weight 0.

    **Bad input.** A sample whose stored log-probability is not finite is an error
    (with ``check_finite``), not left out: in control it marks a broken collector or
    actor, and leaving it out would bias the batch statistics.
    :class:`~torchrl_r2vpo.R2VPOLLMLoss` follows TorchRL's GRPOLoss instead: it leaves
    such tokens out with a warning, and raises a ``ValueError`` only when none is left. An
    empty batch, a missing entry (the action, its log-probability, the actor's inputs,
    or what the value estimator reads when the advantage is absent) and a validity mask
    that is not boolean raise an error naming the entry (and its ``tensor_keys`` field,
    where it has one; checked from metadata, skipped under ``torch.compile``).

    ``lambda`` is read within its bounds (NaN and values below 0 as 0): assignment
    (``loss.lagrange_multiplier = value``) validates it, and a value written into the
    buffer in place (``fill_``) that is out of bounds is never used as it is, and raises
    a ``ValueError`` with ``check_finite``.

    Each call also records ``ratio_var`` in the ``last_ratio_var`` buffer, which a
    scheduler stepped without argument reads, and the count, sum and sum of squares
    of the ratio as ``last_ratio_stats`` (a
    :class:`~torchrl_r2vpo.objectives.ratio_variance.RatioStats`, float64), which
    :class:`~torchrl_r2vpo.DualVariableSchedulerHook` pools over the micro-batches
    of a gradient-accumulation step; neither is saved in the ``state_dict``. The
    loss implements :class:`~torchrl_r2vpo.objectives.ratio_variance.LagrangianLoss`,
    the protocol the scheduler reads.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import NormalParamExtractor, TensorDictModule
        >>> from torchrl.modules import ProbabilisticActor, TanhNormal, ValueOperator
        >>> from torchrl_r2vpo import R2VPOLoss
        >>> n_obs, n_act, batch = 3, 2, 8
        >>> actor = ProbabilisticActor(
        ...     TensorDictModule(
        ...         torch.nn.Sequential(torch.nn.Linear(n_obs, 2 * n_act), NormalParamExtractor()),
        ...         in_keys=["observation"], out_keys=["loc", "scale"]),
        ...     in_keys=["loc", "scale"], distribution_class=TanhNormal, return_log_prob=True)
        >>> critic = ValueOperator(torch.nn.Linear(n_obs, 1), in_keys=["observation"])
        >>> loss = R2VPOLoss(actor, critic, lagrange_multiplier=1.0)
        >>> data = TensorDict({
        ...     "observation": torch.randn(batch, n_obs),
        ...     "action": torch.rand(batch, n_act) * 1.8 - 0.9,
        ...     "action_log_prob": torch.randn(batch),
        ...     "advantage": torch.randn(batch, 1),
        ...     "value_target": torch.randn(batch, 1),
        ... }, [batch])
        >>> out = loss(data)
        >>> sorted(k for k in out.keys() if k.startswith("loss_"))
        ['loss_critic', 'loss_entropy', 'loss_objective', 'loss_ratio_var']
        >>> bool(torch.isclose(out["loss_ratio_var"], out["lagrange_multiplier"] * out["ratio_var"]))
        True
    """

    @dataclass
    class _AcceptedKeys(PPOLoss._AcceptedKeys):
        """PPOLoss's keys, and ``proximal_log_prob``: the log-probability of the stored
        action under the policy at the start of the current update (optional)."""

        proximal_log_prob: NestedKey = "proximal_log_prob"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys

    def __init__(
        self,
        actor_network: ProbabilisticTensorDictSequential | None = None,
        critic_network: TensorDictModule | None = None,
        *,
        ratio_var_target: float | None = None,
        kl_target: float | None = None,
        lagrange_multiplier: float = 0.5,
        variance_center: Literal["mean", "one"] = "mean",
        diagnostic_clip_epsilon: float = 0.2,
        check_finite: bool = True,
        ratio: Literal["proximal", "behaviour"] = "proximal",
        max_behaviour_weight: float | None = 2.0,
        weighted_variance: bool = True,
        device: torch.device | None = None,
        **kwargs,
    ):
        check_ratio_form(ratio)
        check_max_behaviour_weight(max_behaviour_weight)
        if "clip_epsilon" in kwargs:
            raise TypeError(
                "R2VPOLoss does not clip the ratio; pass diagnostic_clip_epsilon "
                "for the band of the clip_fraction diagnostic."
            )
        ratio_var_target = self._check_dual_arguments(
            ratio_var_target, kl_target, lagrange_multiplier, variance_center
        )
        if not 0 < diagnostic_clip_epsilon < 1:
            raise ValueError(
                f"diagnostic_clip_epsilon must lie in (0, 1), got {diagnostic_clip_epsilon}."
            )
        super().__init__(actor_network, critic_network, device=device, **kwargs)
        reject_unknown_kwargs(type(self).__name__, PPOLoss, kwargs)
        if device is None:
            device = self.entropy_coeff.device
        self._register_dual_buffers(ratio_var_target, lagrange_multiplier, device)
        self.variance_center = variance_center
        self.diagnostic_clip_epsilon = diagnostic_clip_epsilon
        self.check_finite = check_finite
        self.ratio = ratio
        self.max_behaviour_weight = max_behaviour_weight
        self.weighted_variance = bool(weighted_variance)
        # RPO's noise modules in the actor, found once (a tuple: not registered twice)
        self._mean_noise = tuple(m for m in self.actor_network.modules()
                                 if isinstance(m, UpdateMeanNoise))

    @property
    def out_keys(self):
        if self._out_keys is None:
            keys = ["loss_objective", "loss_ratio_var"]
            if self.entropy_bonus:
                keys.extend(["entropy", "loss_entropy"])
            if self._has_critic:
                keys.append("loss_critic")
            if self.clip_value:
                keys.append("value_clip_fraction")
            keys.extend(
                [
                    "ratio_var",
                    "lagrange_multiplier",
                    "kl_approx",
                    "ESS",
                    "clip_fraction",
                    "mean_ratio",
                    "max_ratio",
                ]
            )
            self._out_keys = keys
        return self._out_keys

    @out_keys.setter
    def out_keys(self, values):
        self._out_keys = values

    def _standardize_advantage(
        self, advantage: torch.Tensor, tensordict: TensorDictBase
    ) -> torch.Tensor:
        # PPOLoss masks with "shifted_valid" only, and multiplies (inf * 0 = nan):
        # standardise over every validity mask, exactly as on the valid positions
        # alone (mean, unbiased std), selecting padding away
        mask = input_validity_mask(self, tensordict, advantage)
        if mask is None:
            return super()._standardize_advantage(advantage, tensordict)
        exclude = {d % advantage.ndim for d in self.normalize_advantage_exclude_dims}
        dims = tuple(d for d in range(advantage.ndim) if d not in exclude)
        count = mask.sum(dims, keepdim=True)
        mean = torch.where(mask, advantage, 0).sum(dims, keepdim=True) / count.clamp_min(1)
        sq_dev = torch.where(mask, advantage - mean, 0).pow(2)
        std = (sq_dev.sum(dims, keepdim=True) / (count - 1).clamp_min(1)).sqrt()
        std = std.clamp_min(torch.finfo(torch.float).resolution)
        return torch.where(mask, (advantage - mean) / std, 0)

    def _check_finite(
        self,
        tensordict: TensorDictBase,
        log_weight: torch.Tensor,
        ratios: torch.Tensor,
        advantage: torch.Tensor,
        mask: torch.Tensor | None,
        proximal: torch.Tensor | None = None,
    ) -> None:
        """Raises a ``ValueError`` naming what is not finite at valid positions: the
        advantage, the stored behaviour or proximal log-probability (``proximal``, if
        read), the current one (through ``log_weight``), or ``ratios`` (the proximal and
        behaviour ratios, stacked); or the multiplier out of bounds. One host
        synchronisation."""
        def finite(value):
            valid = torch.isfinite(value)
            return (valid if mask is None else valid | ~mask).all()

        keys = self.tensor_keys
        stored = maybe_get_or_select(tensordict, keys.sample_log_prob, log_weight.shape[:-1])
        if is_tensor_collection(stored):
            stored = sum_td_features(stored)
        # the advantage may have more columns than the ratio (several reward heads)
        checks = [
            (advantage, f"The advantage (key {keys.advantage!r}) holds NaN or inf at valid "
                        "positions. When the loss computes it, check the reward (key "
                        f"{keys.reward!r}) and the critic's values."),
            (stored.reshape(log_weight.shape), "The behaviour log-probability (key "
                                               f"{keys.sample_log_prob!r}) holds NaN or inf "
                                               "at valid positions."),
            (proximal, f"The proximal log-probability (key {keys.proximal_log_prob!r}) holds "
                       "NaN or inf at valid positions."),
            (log_weight, "The current policy's log-probability of the stored action (key "
                         f"{keys.action!r}) is NaN or inf at valid positions: the action may "
                         "lie outside the distribution's support, or the policy parameters "
                         "may have diverged."),
            (ratios, "The importance ratio overflowed at valid positions: the policy is "
                     "extremely far from the one that collected the data (stale data, or "
                     "too large a step)."),
        ]
        checks = [(value, message) for value, message in checks if value is not None]
        *finite_ok, multiplier_ok = torch.stack(
            [finite(value) for value, _ in checks] + [self._multiplier_in_bounds()]).tolist()
        for ok, (_, message) in zip(finite_ok, checks):
            if not ok:
                raise ValueError(message)
        self._check_multiplier(multiplier_ok)

    def _decoupled_log_weight(
        self,
        tensordict: TensorDictBase,
        log_weight: torch.Tensor,
        log_is_weight: torch.Tensor | None,
        kl_approx: torch.Tensor,
        adv_shape: torch.Size,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """The ratio against the proximal policy, when ``ratio="proximal"`` and the input
        holds ``proximal_log_prob``; else the arguments unchanged, and ``None``.

        From ``log_weight = log(pi_theta / pi_b)`` it returns ``log(pi_theta / pi_prox)``,
        the detached ``log w = log min(pi_prox / pi_b, c)`` as the ``log_is_weight`` (capped
        further so that ``w * r <= max_importance_ratio`` if that is set), the
        ``kl_approx`` ``log(pi_prox / pi_theta)``, and ``log pi_prox`` shaped as
        ``log_weight`` (for :meth:`_check_finite`). With ``pi_prox == pi_b`` the ratio
        is bit for bit the behaviour one and ``log w == 0``.
        """
        key = self.tensor_keys.proximal_log_prob
        proximal = tensordict.get(key, None) if self.ratio == "proximal" else None
        if proximal is None:
            return log_weight, log_is_weight, kl_approx, None
        if self.delay_actor:
            raise ValueError(
                f"The input holds proximal log-probabilities (key {key!r}) and the loss has "
                "delay_actor=True: two proximal policies. Drop the key, or use "
                "ratio='behaviour' or delay_actor=False."
            )
        if is_tensor_collection(proximal):  # per head: the joint log-probability
            proximal = sum_td_features(proximal)
        behaviour = maybe_get_or_select(tensordict, self.tensor_keys.sample_log_prob, adv_shape)
        if is_tensor_collection(behaviour):
            behaviour = sum_td_features(behaviour)
        if proximal.numel() != log_weight.numel():
            raise ValueError(
                f"The proximal log-probability (key {key!r}) has shape "
                f"{tuple(proximal.shape)}; expected one value per sample, as the behaviour "
                f"log-probability {tuple(behaviour.shape)}."
            )
        proximal = proximal.detach().reshape(log_weight.shape).to(log_weight.dtype)
        behaviour = behaviour.reshape(log_weight.shape).to(log_weight.dtype)
        # non-finite at padding only (else _check_finite names it); the mask drops it
        log_weight = log_weight - (proximal - behaviour)
        log_is_weight = behaviour_log_weight(proximal, behaviour, self.max_behaviour_weight)
        if self.max_importance_ratio is not None:
            log_is_weight = torch.minimum(
                log_is_weight, self.max_importance_ratio.log() - log_weight.detach()
            )
        return log_weight, log_is_weight, -log_weight.detach(), proximal

    def _log_weights(self, tensordict: TensorDictBase, adv_shape: torch.Size):
        """``(log_weight, log_is_weight, kl_approx, proximal, dist)`` of the actor on
        ``tensordict``: :func:`ppo_log_weight` (at least float32), then
        :meth:`_decoupled_log_weight`."""
        try:
            log_weight, dist, kl_approx, log_is_weight = ppo_log_weight(
                self, tensordict, adv_shape=adv_shape
            )
        except Exception as error:
            self._raise_if_missing(
                tensordict, self.actor_network.in_keys, "the actor reads them to score the "
                f"stored action (tensor_keys.action {self.tensor_keys.action!r}).", error)
            raise
        # the ratio and its variance in float32 at least (bfloat16 ratios skew
        # ratio_var, which the dual ascent reads)
        log_weight = at_least_float32(log_weight)
        if log_is_weight is not None:
            log_is_weight = at_least_float32(log_is_weight)
        return (*self._decoupled_log_weight(
            tensordict, log_weight, log_is_weight, kl_approx, adv_shape=adv_shape), dist)

    def _critic_loss_inputs(self, target_return, state_value, old_state_value):
        # the critic's prediction, for the explained variance (with separate_losses,
        # loss_critic runs the critic on a copy of the input)
        self._critic_prediction = state_value.detach()
        return super()._critic_loss_inputs(target_return, state_value, old_state_value)

    @torch.no_grad()
    def _explained_variance(self, tensordict: TensorDictBase) -> torch.Tensor:
        """``1 - Var(target - value) / Var(target)`` over the valid positions, with the
        value the critic predicted in :meth:`loss_critic`."""
        target = tensordict.get(self.tensor_keys.value_target)
        value, self._critic_prediction = self._critic_prediction, None
        mask = input_validity_mask(self, tensordict, target)

        def variance(x):
            return masked_mean((x - masked_mean(x, mask)).pow(2), mask)

        return 1.0 - variance(target - value) / (variance(target) + torch.finfo(target.dtype).eps)

    def _raise_if_missing(self, tensordict: TensorDictBase, in_keys, why: str, error) -> None:
        """After ``error`` in a module reading ``in_keys``: raises a ``KeyError`` naming
        the ones missing from ``tensordict`` and ``why`` they are needed, if any are
        missing (else returns)."""
        missing = [key for key in in_keys if key not in tensordict]
        if missing:
            raise KeyError(
                f"{type(self).__name__}: {missing} missing from the input; {why}"
            ) from error

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if not is_dynamo_compiling():
            check_loss_input(self, tensordict, {
                "action": "the stored action",
                "sample_log_prob": "the behaviour policy's log-probability of the action",
            })
        tensordict = tensordict.clone(False)
        advantage = tensordict.get(
            self.tensor_keys.advantage, None, as_padded_tensor=True
        )
        update_norm = advantage is None
        if advantage is None:
            if self.critic_network is None:
                raise KeyError(
                    f"The advantage (key {self.tensor_keys.advantage!r}) is missing "
                    "and there is no critic to compute it: pass a critic_network "
                    "or precompute the advantage."
                )
            try:
                self.value_estimator(
                    tensordict,
                    params=self._cached_critic_network_params_detached,
                    target_params=self.target_critic_network_params,
                )
            except Exception as error:
                self._raise_if_missing(
                    tensordict, self.value_estimator.in_keys, "the advantage "
                    f"(tensor_keys.advantage {self.tensor_keys.advantage!r}) is missing too, "
                    "and the value estimator computes it from them: add them, or "
                    "precompute the advantage.", error)
                raise
            advantage = tensordict.get(self.tensor_keys.advantage)
        advantage = maybe_normalize_advantage(
            self, advantage, tensordict, update_norm=update_norm
        )

        adv_shape = advantage.shape[:-1]
        log_weight, log_is_weight, kl_approx, proximal, dist = self._log_weights(
            tensordict, adv_shape)
        # RPO's noise on the actor's mean: the objective scores the perturbed policy, the
        # constraint and the diagnostics the policy itself
        noise = next((m for m in self._mean_noise if m.is_active), None)
        perturbed = None
        if noise is not None:
            perturbed = (log_weight, log_is_weight)
            with noise.paused():
                log_weight, log_is_weight, kl_approx, proximal, dist = self._log_weights(
                    tensordict, adv_shape)
        advantage = broadcast_advantage_to_log_weight(advantage, log_weight)
        check_advantage_broadcast(advantage, log_weight)
        mask = input_validity_mask(self, tensordict, log_weight)

        def masked(log_weight, log_is_weight):
            if mask is None:
                return log_weight, log_is_weight
            # padding stays out of the backward pass too (0 * inf would be NaN there)
            return (torch.where(mask, log_weight, 0),
                    None if log_is_weight is None else torch.where(mask, log_is_weight, 0))

        # the constraint acts on the proximal ratio (the behaviour ratio unless
        # delay_actor or the proximal key), uncapped; the objective on the (capped,
        # weighted) behaviour ratio
        log_weight, log_is_weight = masked(log_weight, log_is_weight)
        ratio = log_weight.exp()
        objective_log_weight, objective_log_is_weight = (
            (log_weight, log_is_weight) if perturbed is None else masked(*perturbed))
        if perturbed is None and log_is_weight is None:
            behaviour_ratio = ratio
        elif objective_log_is_weight is None:
            behaviour_ratio = objective_log_weight.exp()
        else:
            behaviour_ratio = (objective_log_weight + objective_log_is_weight).exp()
        if self.check_finite and not is_dynamo_compiling():
            self._check_finite(tensordict, log_weight, torch.stack([ratio, behaviour_ratio]),
                               advantage, mask, proximal)

        # the variance's weights (1, or w / mean(w) over the valid positions)
        weight = var_weight = None
        if self.weighted_variance and proximal is not None:
            var_weight = log_is_weight.detach().exp()
            if mask is not None:
                var_weight = torch.where(mask, var_weight, 0)
            weight = var_weight / masked_mean(var_weight, mask).clamp_min(
                torch.finfo(var_weight.dtype).tiny)
        if self.variance_center == "mean":
            center = masked_mean(ratio.detach() if weight is None else weight * ratio.detach(), mask)
        else:
            center = torch.ones((), dtype=ratio.dtype, device=ratio.device)
        sq_dev = (ratio - center).pow(2)
        if weight is not None:
            sq_dev = weight * sq_dev
        td_out = TensorDict(
            {
                "loss_objective": -behaviour_ratio * advantage,
                "loss_ratio_var": self._multiplier() * sq_dev,
            }
        )
        with torch.no_grad():
            ratio_var = masked_mean(sq_dev.detach(), mask)
            if mask is not None:  # no valid position: no statistic
                ratio_var = torch.where(mask.any(), ratio_var, float("nan"))
            self._record_ratio_stats(ratio_var, RatioStats.of(ratio, mask, var_weight))
            td_out.set("ratio_var", ratio_var)
            td_out.set("lagrange_multiplier", self._multiplier().detach())
            td_out.set("kl_approx", masked_mean(kl_approx.detach(), mask))
            td_out.update(self._ratio_diagnostics(log_weight.detach(), mask))

        if self.entropy_bonus:
            entropy = self._get_entropy(dist, adv_shape=advantage.shape[:-1])
            summed = sum_td_features(entropy) if is_tensor_collection(entropy) else entropy
            if is_tensor_collection(entropy):
                td_out.set("composite_entropy", entropy.detach())
            entropy_mask = None if mask is None else mask.reshape(summed.shape)
            td_out.set("entropy", masked_mean(summed.detach(), entropy_mask))
            td_out.set("loss_entropy", self._weighted_loss_entropy(entropy))
        if self._has_critic:
            for key in (self.tensor_keys.value_target, self.tensor_keys.value):
                value = tensordict.get(key, None)  # as the log-weight: padding holds 0
                value_mask = None if value is None else input_validity_mask(self, tensordict, value)
                if value_mask is not None:
                    tensordict.set(key, torch.where(value_mask, value, 0))
            loss_critic, value_clip_fraction, explained_variance = self.loss_critic(
                tensordict
            )
            td_out.set("loss_critic", loss_critic)
            if value_clip_fraction is not None:
                td_out.set("value_clip_fraction", value_clip_fraction)
            if explained_variance is not None:  # over the valid positions, as the others
                td_out.set("explained_variance", self._explained_variance(tensordict))
        if mask is not None:
            nan_without_valid(td_out, mask.any(), _STATISTICS)
        td_out = td_out.named_apply(
            lambda name, value: reduce_loss(self, value, tensordict).squeeze(-1)
            if name.startswith("loss_")
            else value,
        )
        self._clear_weakrefs(
            tensordict,
            td_out,
            "actor_network_params",
            "critic_network_params",
            "target_actor_network_params",
            "target_critic_network_params",
        )
        return td_out

    def _ratio_diagnostics(
        self, log_weight: torch.Tensor, mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """ESS, PPO's would-be clip fraction, mean and max of the ratio (detached)."""
        ratio = log_weight.exp()
        eps = self.diagnostic_clip_epsilon
        outside = ((ratio < 1 - eps) | (ratio > 1 + eps)).to(ratio.dtype)
        if mask is not None:
            log_weight = torch.where(mask, log_weight, float("-inf"))
            ratio = torch.where(mask, ratio, torch.zeros_like(ratio))
            count = mask.sum().clamp_min(1)
        else:
            count = log_weight.numel()
        # ESS / N = mean(r)^2 / mean(r^2), computed in log space
        log_weight = log_weight.flatten()
        log_ess = 2 * log_weight.logsumexp(0) - (2 * log_weight).logsumexp(0)
        return {
            "ESS": log_ess.exp() / count,
            "clip_fraction": masked_mean(outside, mask),
            "mean_ratio": masked_mean(ratio, mask),
            "max_ratio": ratio.max(),
        }
