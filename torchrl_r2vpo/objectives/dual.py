"""The dual update of R2VPO's Lagrange multiplier, and its TorchRL Trainer hook."""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Literal

import torch
from tensordict import is_tensor_collection, TensorDictBase
from tensordict.utils import NestedKey
from torchrl.objectives import LossModule
from torchrl.trainers import Trainer, TrainerHookBase

from torchrl_r2vpo._compat import accumulation_window_closed, optimizer_step_count
from torchrl_r2vpo.objectives.ratio_variance import RatioStats

__all__ = ["DualVariableScheduler", "DualVariableSchedulerHook"]


class DualVariableScheduler:
    r"""Projected dual ascent on a loss's Lagrange multiplier.

    After each optimiser step (or each collected batch), with the measured ratio
    variance ``V`` and the target ``delta`` (the loss's ``ratio_var_target``):

    .. code-block:: text

        e_t    = V_t - delta
        lambda <- clip(lambda + lr * e_t + proportional_gain * (e_t - e_{t-1}), min_value, max_value)

    With ``proportional_gain=0`` (the default) this is plain projected dual
    ascent, ``lambda <- clip(lambda + lr * (V - delta), 0, lambda_max)``. A
    positive ``proportional_gain`` gives the velocity form of a PI controller
    (Stooke et al., "Responsive Safety in Reinforcement Learning by PID
    Lagrangian Methods", ICML 2020): ``lr`` is the integral gain, and the extra
    term reacts to the *change* of the violation, which damps the oscillation of
    plain dual ascent when the statistic responds to ``lambda`` with a lag.
    Because it acts on ``lambda`` itself, the projection also bounds the
    integral (no wind-up). ``lr=0`` and ``proportional_gain=0`` keep ``lambda``
    fixed: the paper's setting for continuous control.

    The loss owns ``lambda`` (a buffer, saved in its ``state_dict``); the
    scheduler owns the rule and its own small state (the previous violation
    and counters), saved by :meth:`state_dict`.

    **What the scheduler reads on the loss** (the
    :class:`~torchrl_r2vpo.objectives.ratio_variance.LagrangianLoss` protocol, which
    every R2VPO loss implements):

    * ``lagrange_multiplier``: the scalar buffer ``lambda``, updated in place;
    * ``ratio_var_target``: the target ``delta``, read at each step unless ``target``
      is given;
    * ``last_ratio_var``: the statistic of the last forward call, read by
      :meth:`step` without argument;
    * ``last_ratio_stats`` and ``variance_center`` (read by
      :class:`DualVariableSchedulerHook` only): the
      :class:`~torchrl_r2vpo.objectives.ratio_variance.RatioStats` of the last
      forward call, pooled over the micro-batches of an optimiser step.

    A non-finite statistic leaves ``lambda`` unchanged, is counted in
    ``num_skipped`` and is reported with a :class:`RuntimeWarning`. In fixed
    mode the statistic is recorded and ``lambda`` is never touched.

    Args:
        loss_module (LossModule): the loss holding the multiplier buffer, e.g.
            :class:`~torchrl_r2vpo.R2VPOLoss`.

    Keyword Args:
        lr (float, optional): the dual step size ``eta`` (integral gain). ``0``
            gives a fixed multiplier. Defaults to ``1.0``.
        proportional_gain (float, optional): the damping gain of the PI variant.
            Defaults to ``0.0``.
        target (float, optional): the target ``delta``. Defaults to ``None``:
            read the loss's ``ratio_var_target`` at each step, so scheduling it
            on the loss is honoured.
        min_value (float, optional): lower projection bound. Defaults to ``0.0``.
        max_value (float, optional): upper projection bound ``lambda_max``.
            Stale replayed data can hold the variance above any reachable
            target, in which case plain ascent grows ``lambda`` without bound;
            set this in such settings. Defaults to ``None`` (no bound).
        statistic_key (NestedKey, optional): the entry read when :meth:`step`
            receives the loss's output TensorDict. Defaults to ``"ratio_var"``.
        last_statistic_name (str, optional): schedules on another statistic
            the loss records: the name of the loss attribute :meth:`step` reads
            when it receives nothing, instead of ``last_ratio_var``. Defaults to
            ``None`` (``last_ratio_var``).
        multiplier_name (str, optional): deprecated; a loss exposes its
            multiplier as ``lagrange_multiplier``.
        target_name (str, optional): deprecated; a loss exposes its target as
            ``ratio_var_target``.

    Examples:
        >>> import torch
        >>> from tensordict.nn import NormalParamExtractor, TensorDictModule
        >>> from torchrl.modules import ProbabilisticActor, TanhNormal
        >>> from torchrl_r2vpo import DualVariableScheduler, R2VPOLoss
        >>> actor = ProbabilisticActor(
        ...     TensorDictModule(
        ...         torch.nn.Sequential(torch.nn.Linear(3, 4), NormalParamExtractor()),
        ...         in_keys=["observation"], out_keys=["loc", "scale"]),
        ...     in_keys=["loc", "scale"], distribution_class=TanhNormal, return_log_prob=True)
        >>> loss = R2VPOLoss(actor, ratio_var_target=0.02, lagrange_multiplier=1.0)
        >>> scheduler = DualVariableScheduler(loss, lr=10.0, max_value=100.0)
        >>> scheduler.step(torch.tensor(0.05))  # above target: lambda rises by 10 * 0.03
        tensor(1.3000)
        >>> scheduler.step(torch.tensor(0.0))  # below target: lambda falls by 10 * 0.02
        tensor(1.1000)
    """

    def __init__(
        self,
        loss_module: LossModule,
        *,
        lr: float = 1.0,
        proportional_gain: float = 0.0,
        target: float | None = None,
        min_value: float = 0.0,
        max_value: float | None = None,
        statistic_key: NestedKey = "ratio_var",
        last_statistic_name: str | None = None,
        multiplier_name: str | None = None,
        target_name: str | None = None,
    ) -> None:
        if multiplier_name is None:
            multiplier = getattr(loss_module, "lagrange_multiplier", None)
        else:
            multiplier = getattr(loss_module, multiplier_name, None)
        if not isinstance(multiplier, torch.Tensor):
            raise AttributeError(
                f"{type(loss_module).__name__} has no tensor attribute "
                f"{multiplier_name or 'lagrange_multiplier'!r} to schedule."
            )
        for name, value in (("lr", lr), ("proportional_gain", proportional_gain)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        if not (min_value >= 0 and math.isfinite(min_value)):
            raise ValueError(f"min_value must be a finite number >= 0, got {min_value}.")
        if max_value is not None and not max_value >= min_value:
            raise ValueError(
                f"max_value ({max_value}) must be >= min_value ({min_value})."
            )
        if target is None and not isinstance(
            getattr(loss_module, target_name or "ratio_var_target", None), torch.Tensor
        ):
            raise AttributeError(
                f"{type(loss_module).__name__} has no attribute "
                f"{target_name or 'ratio_var_target'!r}: pass target= explicitly."
            )
        if target is not None and not (target >= 0 and math.isfinite(target)):
            raise ValueError(f"target must be a finite number >= 0, got {target}.")
        self.loss_module = loss_module
        self.lr = lr
        self.proportional_gain = proportional_gain
        self.target = target
        self.min_value = min_value
        self.max_value = max_value
        self.statistic_key = statistic_key
        if last_statistic_name == "last_ratio_var":
            last_statistic_name = None
        self.last_statistic_name = last_statistic_name
        self._multiplier_name = multiplier_name
        self._target_name = target_name
        for name, value, replacement in (
            ("multiplier_name", multiplier_name, "lagrange_multiplier"),
            ("target_name", target_name, "ratio_var_target"),
        ):
            if value is not None:
                warnings.warn(
                    f"DualVariableScheduler({name}=...) is deprecated: the scheduler reads "
                    f"the loss's {replacement!r} (the LagrangianLoss protocol).",
                    DeprecationWarning,
                    stacklevel=2,
                )
        self._init_multiplier = multiplier.detach().clone()
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.num_steps = 0
        self.num_skipped = 0
        self.last_statistic: float | None = None
        self._last_violation: float | None = None

    @property
    def multiplier(self) -> torch.Tensor:
        """The loss's multiplier buffer, ``lagrange_multiplier`` (updated in place)."""
        if self._multiplier_name is not None:
            return getattr(self.loss_module, self._multiplier_name)
        return self.loss_module.lagrange_multiplier

    @property
    def reads_ratio_variance(self) -> bool:
        """Whether :meth:`step` without argument reads the loss's ratio variance
        (``last_ratio_var``), so that the loss's ``last_ratio_stats`` can stand in for
        it (not when ``last_statistic_name`` names another statistic)."""
        return self.last_statistic_name is None

    @property
    def fixed(self) -> bool:
        """Whether this scheduler never moves the multiplier."""
        return self.lr == 0 and self.proportional_gain == 0

    def _current_target(self) -> float:
        if self.target is not None:
            return self.target
        if self._target_name is not None:
            return float(getattr(self.loss_module, self._target_name))
        return float(self.loss_module.ratio_var_target)

    def _read_statistic(
        self, statistic: float | torch.Tensor | TensorDictBase | None
    ) -> float:
        if statistic is None:
            name = self.last_statistic_name or "last_ratio_var"
            statistic = getattr(self.loss_module, name, None)
            if statistic is None:
                raise AttributeError(
                    f"{type(self.loss_module).__name__} records no "
                    f"{name!r}: pass the statistic to step()."
                )
        elif is_tensor_collection(statistic):  # a TensorDict or a tensorclass (LLM losses)
            value = statistic.get(self.statistic_key, None)
            if value is None:
                raise KeyError(
                    f"The TensorDict passed to step() has no {self.statistic_key!r} "
                    f"entry; it has {sorted(map(str, statistic.keys(True, True)))}."
                )
            statistic = value
        if isinstance(statistic, torch.Tensor):
            if statistic.numel() != 1:
                raise ValueError(
                    "The statistic must be a scalar, got a tensor of shape "
                    f"{tuple(statistic.shape)}."
                )
            statistic = statistic.detach().float().cpu().item()
        return float(statistic)

    def step(
        self, statistic: float | torch.Tensor | TensorDictBase | None = None
    ) -> torch.Tensor:
        """Updates the multiplier from one measurement of the ratio variance.

        Args:
            statistic (float, Tensor or TensorDictBase, optional): the measured
                ratio variance, or the loss output (TensorDict or tensorclass) holding it under
                ``statistic_key``. ``None`` reads the last value the loss
                recorded (``loss.last_ratio_var``, or the attribute named by
                ``last_statistic_name``).

        Returns:
            A detached copy of the multiplier after the update.
        """
        value = self._read_statistic(statistic)
        violation = value - self._current_target()
        previous = violation if self._last_violation is None else self._last_violation
        delta = self.lr * violation
        if self.proportional_gain:
            delta += self.proportional_gain * (violation - previous)
        # a non-finite statistic, or inf - inf from overflowing ones
        if not math.isfinite(value) or math.isnan(delta):
            self.num_skipped += 1
            warnings.warn(
                f"DualVariableScheduler: non-finite ratio statistic or update "
                f"(statistic {value}); {self._multiplier_name or 'lagrange_multiplier'} left at "
                f"{float(self.multiplier):.6g} ({self.num_skipped} skipped step(s) so "
                "far). A NaN before the loss's first forward call is expected.",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.multiplier.detach().clone()
        if not self.fixed:
            # an infinite delta saturates at the bounds; without max_value, at
            # the largest finite value of the buffer's dtype
            upper = self.max_value
            if upper is None:
                upper = torch.finfo(self.multiplier.dtype).max
            with torch.no_grad():
                self.multiplier.add_(delta).clamp_(self.min_value, upper)
        self.num_steps += 1
        self.last_statistic = value
        self._last_violation = violation
        return self.multiplier.detach().clone()

    def reset(self) -> None:
        """Restores the multiplier the loss had when the scheduler was built."""
        with torch.no_grad():
            self.multiplier.copy_(self._init_multiplier)
        self._reset_counters()

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's own state; the multiplier is in the loss's ``state_dict``."""
        return {
            "num_steps": self.num_steps,
            "num_skipped": self.num_skipped,
            "last_statistic": self.last_statistic,
            "last_violation": self._last_violation,
            "init_multiplier": self._init_multiplier.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_steps = int(state_dict["num_steps"])
        self.num_skipped = int(state_dict["num_skipped"])
        self.last_statistic = state_dict["last_statistic"]
        self._last_violation = state_dict["last_violation"]
        self._init_multiplier = torch.as_tensor(state_dict["init_multiplier"]).clone()


class DualVariableSchedulerHook(TrainerHookBase):
    """Steps a :class:`DualVariableScheduler` inside a :class:`~torchrl.trainers.Trainer`.

    Args:
        scheduler (DualVariableScheduler): the scheduler to step.
        interval (str, optional): ``"batch"`` steps once per collected batch, at
            the ``post_optim_complete_log`` stage, from the ``ratio_var`` the
            trainer averaged over the batch's last epoch (the policy furthest
            from the behaviour policy).
            ``"optim"`` steps once per optimiser step (``post_optim``), from
            the statistic the loss recorded for that step. Under gradient
            accumulation (an ``optimization_stepper`` with
            ``gradient_accumulation_steps > 1``) that is the ratio variance of
            all the step's micro-batches together, pooled exactly from the
            loss's ``last_ratio_stats`` (a window the stepper drops, for a
            non-finite loss or gradient, is dropped from it too), and ``lambda``
            stays fixed within the step. A scheduler reading another statistic
            (``last_statistic_name``) is stepped on that one. Defaults to
            ``"batch"``.

    The trainer already logs the loss's ``ratio_var`` and ``lagrange_multiplier``
    diagnostics (the multiplier each batch ran with), so the hook logs nothing.
    Registered with :meth:`register`, the hook is part of the trainer's
    ``state_dict`` and checkpoints; the multiplier itself is saved with the
    loss module. Like :class:`~torchrl.trainers.LRSchedulerHook`, it skips a
    call when no optimiser step has run since the previous one (counted as
    TorchRL's ``UpdateWeights`` counts them: the stepper's
    ``optimizer_step_count`` when the trainer has one).

    Example, with ``loss`` an :class:`~torchrl_r2vpo.R2VPOLoss` and ``trainer`` a
    :class:`~torchrl.trainers.Trainer` built on it (``tests/test_dual.py`` runs
    this on Pendulum)::

        hook = DualVariableSchedulerHook(DualVariableScheduler(loss, lr=1.0))
        hook.register(trainer)
        trainer.train()
    """

    def __init__(
        self,
        scheduler: DualVariableScheduler,
        interval: Literal["batch", "optim"] = "batch",
    ) -> None:
        if not isinstance(scheduler, DualVariableScheduler):
            raise TypeError(
                f"scheduler must be a DualVariableScheduler, got {type(scheduler).__name__}."
            )
        if interval not in ("batch", "optim"):
            raise ValueError(f"interval must be 'batch' or 'optim', got {interval!r}.")
        self.scheduler = scheduler
        self.interval = interval
        self._trainer_ref: weakref.ReferenceType[Trainer] | None = None
        self._last_optim_count = 0
        # the packed RatioStats of the micro-batches of the optimiser step under way
        self._micro_batch_sums: list[torch.Tensor] = []

    def _optimised_since_last_call(self) -> bool:
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is None:
            return True
        count = optimizer_step_count(trainer)
        if count == self._last_optim_count:
            if accumulation_window_closed(trainer):
                # the accumulation window ended without an optimiser step (a non-finite loss
                # or gradient): its micro-batches' statistics go with their gradients
                self._micro_batch_sums.clear()
            return False
        self._last_optim_count = count
        return True

    def __call__(
        self,
        optim_steps: int | None = None,
        average_losses: TensorDictBase | None = None,
    ) -> None:
        if self.interval == "batch":
            if self._optimised_since_last_call():
                self.scheduler.step(average_losses)
            return
        loss = self.scheduler.loss_module
        if self.scheduler.reads_ratio_variance:
            stats = getattr(loss, "last_ratio_stats", None)  # optional in the protocol
            if stats is not None:
                self._micro_batch_sums.append(stats.pack())
        if not self._optimised_since_last_call():
            return  # a micro-batch whose gradient is still being accumulated
        if not self._micro_batch_sums:  # a loss without the statistics: its last statistic
            self.scheduler.step()
            return
        pooled = RatioStats.unpack(torch.stack(self._micro_batch_sums).sum(0))
        self._micro_batch_sums.clear()
        self.scheduler.step(pooled.variance(loss.variance_center))

    def state_dict(self) -> dict[str, Any]:
        # an accumulation window may span two batches: its statistics so far are kept too
        return {
            "scheduler": self.scheduler.state_dict(),
            "last_optim_count": self._last_optim_count,
            "micro_batch_sums": [sums.cpu() for sums in self._micro_batch_sums],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self._last_optim_count = state_dict["last_optim_count"]
        device = self.scheduler.multiplier.device
        self._micro_batch_sums = [sums.to(device) for sums in state_dict.get("micro_batch_sums", [])]

    def register(self, trainer: Trainer, name: str = "dual_variable_scheduler") -> None:
        self._trainer_ref = weakref.ref(trainer)
        dest = "post_optim" if self.interval == "optim" else "post_optim_complete_log"
        trainer.register_op(dest, self)
        trainer.register_module(name, self)
