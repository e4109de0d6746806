from __future__ import annotations

import math
import types
import weakref

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.checkpoint import Checkpoint
from torchrl.collectors import Collector
from torchrl.envs import GymEnv
from torchrl.modules import ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.trainers import (
    BatchSubSampler,
    DefaultOptimizationStepper,
    MixedPrecisionOptimizationStepper,
    Trainer,
)

from torchrl_r2vpo import DualVariableScheduler, DualVariableSchedulerHook, R2VPOLoss
from torchrl_r2vpo.objectives import LagrangianLoss, RatioStats


def make_actor(spec=None, bound=1.0):
    """A TanhNormal policy over a 1-D action in [-bound, bound], from a 3-D observation."""
    return ProbabilisticActor(
        TensorDictModule(
            nn.Sequential(nn.Linear(3, 2), NormalParamExtractor()),
            in_keys=["observation"],
            out_keys=["loc", "scale"],
        ),
        in_keys=["loc", "scale"],
        spec=spec,
        distribution_class=TanhNormal,
        distribution_kwargs={"low": -bound, "high": bound},
        return_log_prob=True,
    )


def make_loss(**kwargs):
    kwargs.setdefault("ratio_var_target", 0.02)
    kwargs.setdefault("lagrange_multiplier", 1.0)
    return R2VPOLoss(make_actor(), **kwargs)


def lam(loss):
    return loss.lagrange_multiplier.item()


class TestScheduler:
    def test_rises_above_target(self):
        loss = make_loss()
        sched = DualVariableScheduler(loss, lr=2.0)
        out = sched.step(torch.tensor(0.07))
        assert lam(loss) == pytest.approx(1.0 + 2.0 * 0.05)
        assert out.item() == pytest.approx(lam(loss))

    def test_falls_and_stops_at_zero(self):
        loss = make_loss()
        sched = DualVariableScheduler(loss, lr=20.0)
        sched.step(0.0)
        assert lam(loss) == pytest.approx(1.0 - 20.0 * 0.02)
        for _ in range(5):
            sched.step(0.0)
        assert lam(loss) == 0.0

    def test_respects_bounds(self):
        loss = make_loss()
        sched = DualVariableScheduler(loss, lr=1000.0, min_value=0.5, max_value=3.0)
        sched.step(1.0)
        assert lam(loss) == 3.0
        sched.step(0.0)
        assert lam(loss) == 0.5

    def test_fixed_mode_never_moves(self):
        loss = make_loss()
        sched = DualVariableScheduler(loss, lr=0.0)
        assert sched.fixed
        for value in (0.0, 0.5, 100.0):
            sched.step(value)
        assert lam(loss) == 1.0

    def test_reads_target_from_the_loss_each_step(self):
        loss = make_loss()
        sched = DualVariableScheduler(loss, lr=1.0)
        loss.ratio_var_target = 0.5
        sched.step(0.25)
        assert lam(loss) == pytest.approx(1.0 - 0.25)
        fixed_target = DualVariableScheduler(loss, lr=1.0, target=0.0)
        fixed_target.step(0.25)
        assert lam(loss) == pytest.approx(1.0)

    def test_step_accepts_loss_output_tensor_and_nothing(self):
        loss = make_loss()
        sched = DualVariableScheduler(loss, lr=1.0)
        data = TensorDict(
            {
                "observation": torch.randn(32, 3),
                "action": torch.rand(32, 1) * 1.8 - 0.9,
                "action_log_prob": torch.randn(32),
                "advantage": torch.randn(32, 1),
            },
            [32],
        )
        out = loss(data)
        sched.step(out)
        after_td = lam(loss)
        assert after_td == pytest.approx(1.0 + out["ratio_var"].item() - 0.02)
        sched.step()  # the statistic the loss recorded: the same one
        assert lam(loss) == pytest.approx(after_td + out["ratio_var"].item() - 0.02)
        with pytest.raises(KeyError, match="ratio_var"):
            sched.step(TensorDict({"other": torch.zeros(())}))
        with pytest.raises(ValueError, match="scalar"):
            sched.step(torch.zeros(3))

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_non_finite_statistic_is_skipped_and_reported(self, bad):
        loss = make_loss()
        sched = DualVariableScheduler(loss, lr=1.0)
        with pytest.warns(RuntimeWarning, match="non-finite"):
            sched.step(torch.tensor(bad))
        assert lam(loss) == 1.0
        assert sched.num_skipped == 1 and sched.num_steps == 0

    def test_before_first_forward_is_reported(self):
        sched = DualVariableScheduler(make_loss(), lr=1.0)
        with pytest.warns(RuntimeWarning, match="first forward"):
            sched.step()

    def test_pi_variant_damps_with_the_change_of_violation(self):
        loss = make_loss()
        sched = DualVariableScheduler(loss, lr=1.0, proportional_gain=4.0)
        sched.step(0.12)  # first step: no previous violation, plain ascent
        assert lam(loss) == pytest.approx(1.1)
        sched.step(0.07)  # violation 0.05, change -0.05: 0.05 - 4 * 0.05
        assert lam(loss) == pytest.approx(1.1 + 0.05 - 0.2)

    def test_state_round_trip_and_reset(self):
        loss = make_loss()
        sched = DualVariableScheduler(loss, lr=1.0, proportional_gain=1.0)
        for value in (0.1, 0.3):
            sched.step(value)
        with pytest.warns(RuntimeWarning):
            sched.step(float("nan"))
        other_loss = make_loss()
        other_loss.load_state_dict(loss.state_dict())
        other = DualVariableScheduler(other_loss, lr=1.0, proportional_gain=1.0)
        other.load_state_dict(sched.state_dict())
        assert (other.num_steps, other.num_skipped, other.last_statistic) == (2, 1, 0.3)
        # the restored pair continues exactly as the original
        assert sched.step(0.05).item() == pytest.approx(other.step(0.05).item())
        sched.reset()
        assert lam(loss) == 1.0 and sched.num_steps == 0

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"lr": -1.0}, "lr"),
            ({"proportional_gain": float("nan")}, "proportional_gain"),
            ({"min_value": -1.0}, "min_value"),
            ({"min_value": 2.0, "max_value": 1.0}, "max_value"),
            ({"target": -0.1}, "target"),
            ({"multiplier_name": "beta"}, "beta"),
        ],
    )
    def test_invalid_arguments(self, kwargs, match):
        with pytest.raises((ValueError, AttributeError), match=match):
            DualVariableScheduler(make_loss(), **kwargs)

    @settings(max_examples=200, deadline=None)
    @given(
        # finite statistics up to 1e30 (a variance), and the non-finite ones
        stats=st.lists(
            st.one_of(
                st.floats(-1e30, 1e30),
                st.sampled_from([float("nan"), float("inf"), -float("inf")]),
            ),
            max_size=30,
        ),
        lr=st.floats(0, 1e6),
        gain=st.floats(0, 1e6),
        max_value=st.one_of(st.none(), st.floats(0, 1e6)),
    )
    def test_property_any_statistic_sequence(self, stats, lr, gain, max_value):
        loss = make_loss()
        sched = DualVariableScheduler(loss, lr=lr, proportional_gain=gain, max_value=max_value)
        skipped = 0
        for value in stats:
            before = lam(loss)
            with pytest.warns(RuntimeWarning) if not math.isfinite(value) else _nothing():
                sched.step(value)
            after = lam(loss)
            assert math.isfinite(after) and after >= 0
            if max_value is not None:
                # the bound as the float32 buffer holds it; the initial value may exceed it
                assert after <= max(torch.tensor(max_value).item(), 1.0)
            if not math.isfinite(value):
                skipped += 1
                assert after == before
            elif lr == 0 and gain == 0:
                assert after == before
        assert sched.num_skipped == skipped
        assert sched.num_steps == len(stats) - skipped


class TestLossProtocol:
    """The scheduler reads a loss through the LagrangianLoss protocol only."""

    def test_r2vpo_loss_implements_the_protocol(self):
        loss = make_loss()
        assert isinstance(loss, LagrangianLoss)
        data = TensorDict(
            {
                "observation": torch.randn(32, 3),
                "action": torch.rand(32, 1) * 1.8 - 0.9,
                "action_log_prob": torch.randn(32),
                "advantage": torch.randn(32, 1),
            },
            [32],
        )
        out = loss(data)
        stats = loss.last_ratio_stats
        assert isinstance(stats, RatioStats) and int(stats.count) == 32
        assert stats.ratio_sum.dtype == torch.float64
        torch.testing.assert_close(stats.variance(loss.variance_center).float(), out["ratio_var"])
        torch.testing.assert_close(loss.last_ratio_var, out["ratio_var"])

    def test_any_module_with_the_protocol_is_scheduled(self):
        class Constrained(nn.Module):
            variance_center = "mean"

            def __init__(self):
                super().__init__()
                self.register_buffer("lagrange_multiplier", torch.tensor(1.0))
                self.register_buffer("ratio_var_target", torch.tensor(0.02))
                self.register_buffer("last_ratio_var", torch.tensor(0.05))

        loss = Constrained()
        scheduler = DualVariableScheduler(loss, lr=1.0)
        scheduler.step()
        assert lam(loss) == pytest.approx(1.03)
        # without last_ratio_stats (optional) the hook steps on last_ratio_var
        DualVariableSchedulerHook(scheduler, interval="optim")()
        assert lam(loss) == pytest.approx(1.06)

    def test_name_arguments_are_deprecated_but_work(self):
        loss = make_loss()
        with pytest.warns(DeprecationWarning, match="multiplier_name"):
            scheduler = DualVariableScheduler(loss, lr=1.0, multiplier_name="lagrange_multiplier")
        scheduler.step(0.07)
        assert lam(loss) == pytest.approx(1.05)
        with pytest.warns(DeprecationWarning, match="target_name"):
            scheduler = DualVariableScheduler(loss, lr=1.0, target_name="ratio_var_target")
        scheduler.step(0.07)
        assert lam(loss) == pytest.approx(1.10)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _FakeTrainer:
    """What DualVariableSchedulerHook reads of a Trainer and its stepper."""

    def __init__(self, **stepper):
        self._optim_count = 0
        self.optimization_stepper = types.SimpleNamespace(**stepper)


class _AccumulatingStepper(MixedPrecisionOptimizationStepper):
    """GRPOTrainer's default stepper, without the ``grad_norm`` it reports only on the
    micro-batches that step the optimiser (TorchRL's per-batch averaging needs every key)."""

    def step(self, trainer, sub_batch):
        metrics = super().step(trainer, sub_batch)
        metrics.pop("grad_norm", None)
        return metrics


def make_pendulum_trainer(interval, total_frames=256, optim_steps_per_batch=4, stepper=None,
                          **trainer_kwargs):
    torch.manual_seed(0)
    env = GymEnv("Pendulum-v1")
    env.set_seed(0)
    actor = make_actor(env.action_spec, bound=2.0)
    critic = ValueOperator(nn.Linear(3, 1), in_keys=["observation"])
    # a target far below what four large steps produce: lambda must rise
    loss = R2VPOLoss(actor, critic, ratio_var_target=1e-6, lagrange_multiplier=0.5)
    loss.make_value_estimator(gamma=0.9, lmbda=0.9)
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.05)
    if stepper is not None:
        stepper = stepper(optimizer)
    collector = Collector(
        env,
        actor,
        frames_per_batch=64,
        total_frames=total_frames,
        auto_register_policy_transforms=False,
    )
    trainer = Trainer(
        collector=collector,
        total_frames=total_frames,
        frame_skip=1,
        optim_steps_per_batch=optim_steps_per_batch,
        loss_module=loss,
        optimizer=optimizer,
        optimization_stepper=stepper or DefaultOptimizationStepper(),
        progress_bar=False,
        save_trainer_interval=1,
        **trainer_kwargs,
    )
    scheduler = DualVariableScheduler(loss, lr=10.0)
    hook = DualVariableSchedulerHook(scheduler, interval=interval)
    hook.register(trainer)
    return trainer, loss, scheduler, hook


class TestTrainerHook:
    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("interval, steps", [("batch", 4), ("optim", 16)])
    def test_hook_moves_lambda_in_a_real_trainer(self, interval, steps):
        trainer, loss, scheduler, hook = make_pendulum_trainer(interval)
        dest = "post_optim" if interval == "optim" else "post_optim_complete_log"
        ops = getattr(trainer, f"_{dest}_ops")
        assert any(op.__wrapped__ is hook for op, _ in ops)
        assert trainer._modules["dual_variable_scheduler"] is hook
        trainer.train()
        assert scheduler.num_steps == steps
        assert lam(loss) > 0.5
        # the trainer logs the multiplier each batch ran with (the loss's diagnostic)
        logged = [float(x) for x in trainer._log_dict["lagrange_multiplier"]]
        assert len(logged) == 4 and lam(loss) > logged[-1]
        if interval == "batch":  # constant within a batch
            assert logged[0] == 0.5 and all(b > a for a, b in zip(logged, logged[1:]))

    @pytest.mark.timeout(120)
    def test_optim_interval_steps_once_per_accumulated_step_on_the_pooled_variance(self):
        # 2 batches x 8 micro-batches, 4 per optimiser step: 4 dual steps, lambda fixed within each
        trainer, loss, scheduler, hook = make_pendulum_trainer(
            "optim", total_frames=128, optim_steps_per_batch=8,
            stepper=lambda optimizer: _AccumulatingStepper(optimizer, gradient_accumulation_steps=4))
        BatchSubSampler(batch_size=16).register(trainer)  # micro-batches of different samples
        used, sums = [], []
        forward = loss.forward

        def spy(tensordict):
            used.append(lam(loss))
            out = forward(tensordict)
            sums.append(loss.last_ratio_sums.clone())
            return out

        loss.forward = spy
        trainer.train()
        assert trainer.optimization_stepper.optimizer_step_count == scheduler.num_steps == 4
        assert len(used) == 16 and all(len(set(used[i:i + 4])) == 1 for i in range(0, 16, 4))
        assert used[-1] > used[0] == 0.5
        count, ratio_sum, ratio_sq_sum = torch.stack(sums[-4:]).sum(0)
        pooled = ratio_sq_sum / count - (ratio_sum / count) ** 2
        assert scheduler.last_statistic == pytest.approx(pooled.item(), rel=1e-6)
        assert scheduler.last_statistic != pytest.approx(loss.last_ratio_var.item(), rel=1e-3)

    def test_a_window_the_stepper_drops_leaves_the_pooled_statistic(self):
        # MixedPrecisionOptimizationStepper with 2 micro-batches per step: the first has a
        # non-finite loss, so the stepper drops it and restarts its window
        loss = make_loss()
        scheduler = DualVariableScheduler(loss, lr=1.0)
        hook = DualVariableSchedulerHook(scheduler, interval="optim")
        trainer = _FakeTrainer(optimizer_step_count=0, _micro_step=0, gradient_accumulation_steps=2)
        hook._trainer_ref = weakref.ref(trainer)  # what register() sets
        for micro_step, count, sums in ((0, 0, [8.0, math.inf, math.inf]), (1, 0, [8.0, 8.4, 9.0]),
                                        (2, 1, [8.0, 7.6, 7.4])):
            stepper = trainer.optimization_stepper
            stepper._micro_step, stepper.optimizer_step_count = micro_step, count
            loss.last_ratio_sums.copy_(torch.tensor(sums, dtype=torch.float64))
            hook()
        assert scheduler.num_steps == 1 and scheduler.num_skipped == 0
        n, s1, s2 = 16.0, 8.4 + 7.6, 9.0 + 7.4
        assert scheduler.last_statistic == pytest.approx(s2 / n - (s1 / n) ** 2)
        # a window that spans a checkpoint keeps the statistics of its first micro-batches
        stepper._micro_step += 1
        hook()
        restored = DualVariableSchedulerHook(DualVariableScheduler(loss, lr=1.0), interval="optim")
        restored.load_state_dict(hook.state_dict())
        assert [t.tolist() for t in restored._micro_batch_sums] == [[8.0, 7.6, 7.4]]

    def test_a_scheduler_of_another_statistic_is_stepped_on_it(self):
        loss = make_loss()
        loss.my_statistic = torch.tensor(0.5)
        scheduler = DualVariableScheduler(loss, lr=1.0, last_statistic_name="my_statistic")
        hook = DualVariableSchedulerHook(scheduler, interval="optim")
        loss.last_ratio_sums.copy_(torch.tensor([4.0, 4.0, 4.0], dtype=torch.float64))  # variance 0
        hook()
        assert scheduler.last_statistic == 0.5

    @pytest.mark.timeout(120)
    def test_trainer_checkpoint_restores_lambda_and_scheduler(self, tmp_path):
        path = tmp_path / "ckpt"
        trainer, loss, scheduler, hook = make_pendulum_trainer(
            "batch", total_frames=128, checkpoint=Checkpoint(), save_trainer_file=path
        )
        trainer.train()  # saves after each batch
        restored, restored_loss, restored_scheduler, restored_hook = make_pendulum_trainer(
            "batch", checkpoint=Checkpoint()
        )
        assert lam(restored_loss) == 0.5
        restored.load_from_file(path)
        assert lam(restored_loss) == lam(loss) > 0.5
        assert restored_scheduler.num_steps == scheduler.num_steps == 2
        assert restored_scheduler.last_statistic == scheduler.last_statistic
        assert restored_hook._last_optim_count == hook._last_optim_count == 8

    def test_invalid_hook_arguments(self):
        sched = DualVariableScheduler(make_loss())
        with pytest.raises(ValueError, match="interval"):
            DualVariableSchedulerHook(sched, interval="epoch")
        with pytest.raises(TypeError, match="DualVariableScheduler"):
            DualVariableSchedulerHook(object())


if __name__ == "__main__":
    pytest.main([__file__])
