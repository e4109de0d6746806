"""The TorchRL private internals ``torchrl_r2vpo._compat`` wraps, pinned to their shapes.

Each test fails loudly when a TorchRL release changes a private name or its shape; the fix
then belongs in ``_compat.py``, not in its callers.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import types

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.modules import ProbabilisticActor, TanhNormal
from torchrl.modules.distributions import LLMMaskedCategorical
from torchrl.objectives import LossModule, PPOLoss
from torchrl.objectives.llm import GRPOLoss
from torchrl.trainers import MixedPrecisionOptimizationStepper, Trainer

from torchrl_r2vpo import _compat, R2VPOLoss

B, N_OBS = 8, 3


def make_actor():
    return ProbabilisticActor(
        TensorDictModule(
            nn.Sequential(nn.Linear(N_OBS, 2), NormalParamExtractor()),
            in_keys=["observation"],
            out_keys=["loc", "scale"],
        ),
        in_keys=["loc", "scale"],
        distribution_class=TanhNormal,
        return_log_prob=True,
    )


def make_data(**extra):
    torch.manual_seed(0)
    data = {
        "observation": torch.randn(B, N_OBS),
        "action": torch.rand(B, 1) * 1.8 - 0.9,
        "action_log_prob": torch.randn(B),
        "advantage": torch.randn(B, 1),
    }
    data.update(extra)
    return TensorDict(data, [B])


class Scorer(nn.Module):
    """A stand-in for TorchRL's LLM wrappers: a learnt logit table scored with get_dist."""

    def __init__(self, vocab=8, length=6):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(length, vocab))

    def get_dist(self, td, **kwargs):
        mask = td["masks", "all_assistant_mask"]
        return LLMMaskedCategorical(logits=self.logits.expand(*mask.shape, -1), mask=mask)


def make_llm_data(n=2, length=6):
    torch.manual_seed(0)
    assistant = torch.zeros(n, length, dtype=torch.bool)
    assistant[:, 2:] = True
    return TensorDict(
        {
            ("tokens", "full"): torch.randint(8, (n, length)),
            ("masks", "all_assistant_mask"): assistant,
            ("log_probs", "full"): torch.where(assistant, torch.randn(n, length) - 2, 0.0),
            "advantage": torch.randn(n, 1, 1),
        },
        [n],
    )


# ------------------------------------------------------------------ PPOLoss


class TestPPOLossInternals:
    def test_log_weight_is_a_4_tuple_of_the_expected_shapes(self):
        loss = PPOLoss(make_actor())
        data = make_data()
        out = loss._log_weight(data.clone(False), adv_shape=torch.Size([B]))
        assert isinstance(out, tuple) and len(out) == 4, (
            "PPOLoss._log_weight no longer returns (log_weight, dist, kl_approx, "
            "log_is_weight): update _compat.ppo_log_weight"
        )
        log_weight, dist, kl_approx, log_is_weight = out
        assert log_weight.shape == kl_approx.shape == (B, 1)
        assert isinstance(dist, torch.distributions.Distribution)
        assert log_is_weight is None  # no delayed actor, no ratio cap
        torch.testing.assert_close(kl_approx, -log_weight)

    def test_log_is_weight_caps_the_behaviour_ratio(self):
        loss = PPOLoss(make_actor(), max_importance_ratio=1.5)
        named = _compat.ppo_log_weight(loss, make_data(), torch.Size([B]))
        assert isinstance(named, _compat.PPOLogWeight)
        assert named.log_is_weight.shape == (B, 1)
        assert (named.log_weight + named.log_is_weight <= torch.tensor(1.5).log() + 1e-6).all()

    def test_the_adapter_reads_torchrl_mains_3_tuple(self):
        log_weight, kl = torch.zeros(B, 1), torch.zeros(B, 1)
        main = types.SimpleNamespace(_log_weight=lambda td, adv_shape: (log_weight, "dist", kl))
        assert _compat.ppo_log_weight(main, None, torch.Size([B])) == (log_weight, "dist", kl, None)

    def test_maybe_normalize_advantage(self):
        params = inspect.signature(PPOLoss._maybe_normalize_advantage).parameters
        assert list(params)[:3] == ["self", "advantage", "tensordict"]
        assert params["update_norm"].kind is inspect.Parameter.KEYWORD_ONLY
        loss = PPOLoss(make_actor(), normalize_advantage=True)
        data = make_data()
        advantage = _compat.maybe_normalize_advantage(
            loss, data["advantage"], data, update_norm=True
        )
        assert advantage.mean().abs() < 1e-5 and (advantage.std() - 1).abs() < 1e-4

    def test_advantage_broadcast_helpers(self):
        per_decision, per_token = torch.randn(B, 1), torch.zeros(B, 4, 1)
        assert _compat.broadcast_advantage_to_log_weight(per_decision, per_token).shape == (B, 4, 1)
        same = torch.zeros(B, 1)
        assert _compat.broadcast_advantage_to_log_weight(per_decision, same) is per_decision
        with pytest.raises(ValueError, match="outer"):
            _compat.check_advantage_broadcast(torch.randn(B), torch.zeros(B, 1))
        _compat.check_advantage_broadcast(per_decision, same)

    def test_maybe_get_or_select_and_sum_td_features(self):
        data = make_data()
        stored = _compat.maybe_get_or_select(data, "action_log_prob", torch.Size([B]))
        assert torch.equal(stored, data["action_log_prob"])
        assert _compat.maybe_get_or_select(data, "missing") is None
        composite = TensorDict({"a": torch.ones(B, 2), "b": torch.ones(B)}, [B])
        torch.testing.assert_close(_compat.sum_td_features(composite), torch.full((B,), 3.0))


# ------------------------------------------------------------------ GRPOLoss


class TestGRPOLossInternals:
    def test_log_weight_is_a_4_tuple_with_the_token_mask(self):
        loss = GRPOLoss(Scorer(), masking_strategy="rlhf", entropy_bonus=False)
        data = make_llm_data()
        td = data.copy()
        out = loss._log_weight(td, data["advantage"].shape[:-1])
        assert isinstance(out, tuple) and len(out) == 4, (
            "GRPOLoss._log_weight no longer returns (log_weight, dist, kl_approx, mask): "
            "update _compat.grpo_log_weight"
        )
        log_weight, dist, kl_approx, mask = out
        assert log_weight.shape == kl_approx.shape == (2, 6, 1)
        assert mask.dtype == torch.bool and torch.equal(mask, data["masks", "all_assistant_mask"])
        assert torch.equal(dist.mask, mask)
        assert (log_weight.squeeze(-1)[~mask] == 0).all()
        assert td.get(_compat.CURRENT_LOG_PROB_KEY).shape == (2, 6)

    def test_the_adapter_reads_torchrl_mains_3_tuple(self):
        dist = types.SimpleNamespace(mask=torch.ones(2, 6, dtype=torch.bool))
        main = types.SimpleNamespace(_log_weight=lambda td, adv_shape: ("lw", dist, "kl"))
        named = _compat.grpo_log_weight(main, None, torch.Size([2, 1]))
        assert named.mask is dist.mask and named.log_weight == "lw"

    def test_clip_bounds_are_the_log_band(self):
        loss = GRPOLoss(Scorer(), clip_epsilon=(0.2, 0.28))
        low, high = _compat.log_clip_bounds(loss)
        torch.testing.assert_close(low, torch.tensor(0.8).log())
        torch.testing.assert_close(high, torch.tensor(1.28).log())


# ------------------------------------------------------------------ LossModule


class TestLossModuleInternals:
    def test_loss_mask_keys_and_their_expansion(self):
        loss = PPOLoss(make_actor())
        keys = loss._loss_mask_keys()
        assert isinstance(keys, tuple)
        assert ("collector", "mask") in keys and "shifted_valid" in keys
        expanded = LossModule._expand_loss_mask(torch.ones(B, 1, dtype=torch.bool), torch.zeros(B))
        assert expanded.shape == (B,)

    def test_input_validity_mask_combines_the_masks(self):
        loss = PPOLoss(make_actor())
        collector = torch.ones(B, 1, dtype=torch.bool)
        collector[0] = False
        shifted = torch.ones(B, dtype=torch.bool)
        shifted[-1] = False
        data = make_data(shifted_valid=shifted)
        data["collector", "mask"] = collector
        like = torch.zeros(B, 1)
        mask = _compat.input_validity_mask(loss, data, like)
        assert mask.shape == (B, 1) and mask.sum() == B - 2
        assert not mask[0] and not mask[-1]
        assert _compat.input_validity_mask(loss, make_data(), like) is None

    def test_reduce_loss_with_mask_and_reduction(self):
        loss = PPOLoss(make_actor())
        value = torch.arange(4.0)
        mask = torch.tensor([True, True, False, True])
        assert _compat.reduce_loss(loss, value, None, reduction="sum", mask=mask) == 4.0
        assert _compat.reduce_loss(loss, value, None, reduction="mean", mask=mask) == 4.0 / 3
        assert _compat.reduce_loss(loss, value) == 1.5  # the loss's own reduction: mean

    @pytest.mark.parametrize("owner", sorted(_compat.PROTECTED_HOOKS))
    def test_protected_hooks_exist(self, owner):
        module, name = owner.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        # methods and properties on the class, attributes set in __init__ on an instance
        make = {"PPOLoss": lambda: PPOLoss(make_actor()), "LossModule": lambda: PPOLoss(make_actor()),
                "GRPOLoss": lambda: GRPOLoss(Scorer())}
        instance = make[name]()
        missing = [hook for hook in _compat.PROTECTED_HOOKS[owner]
                   if not (hasattr(cls, hook) or hasattr(instance, hook))]
        assert not missing, f"{owner} lost {missing}: update _compat and the losses"


# ------------------------------------------------------------------ trainer state


class _Stepper(MixedPrecisionOptimizationStepper):
    """Without the ``grad_norm`` it reports only when it steps (the trainer averages keys)."""

    def step(self, trainer, sub_batch):
        metrics = super().step(trainer, sub_batch)
        metrics.pop("grad_norm", None)
        return metrics


class TestTrainerState:
    def test_stepper_counters(self):
        stepper = _Stepper(torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=0.0),
                           gradient_accumulation_steps=2)
        assert stepper.optimizer_step_count == 0
        assert stepper._micro_step == 0 and stepper.gradient_accumulation_steps == 2

    def test_optimizer_step_count_and_accumulation_window(self):
        loss = R2VPOLoss(make_actor())
        optimizer = torch.optim.SGD(loss.parameters(), lr=0.0)
        trainer = Trainer(
            collector=None,
            total_frames=0,
            frame_skip=1,
            optim_steps_per_batch=3,
            loss_module=loss,
            optimizer=optimizer,
            optimization_stepper=_Stepper(optimizer, gradient_accumulation_steps=2),
            progress_bar=False,
        )
        assert trainer._optim_count == 0
        trainer.optim_steps(make_data())  # 3 micro-batches: one optimiser step, one pending
        assert trainer._optim_count == 3
        assert _compat.optimizer_step_count(trainer) == 1
        assert _compat.accumulation_window_closed(trainer) is False
        trainer.optimization_stepper._micro_step += 1
        assert _compat.accumulation_window_closed(trainer) is True
        # without a stepper: the trainer's own count
        bare = types.SimpleNamespace(_optim_count=5, optimization_stepper=None)
        assert _compat.optimizer_step_count(bare) == 5
        assert _compat.accumulation_window_closed(bare) is False


# ------------------------------------------------------------------ re-exports


def test_re_exports():
    from torchrl._utils import compile_with_warmup
    from torchrl.envs.libs.jax_utils import _ndarray_to_tensor, _tensor_to_ndarray

    assert _compat.compile_with_warmup is compile_with_warmup
    assert _compat.ndarray_to_tensor is _ndarray_to_tensor
    assert _compat.tensor_to_ndarray is _tensor_to_ndarray
    assert _compat.is_dynamo_compiling() is False
    for name in _compat.__all__:
        assert hasattr(_compat, name), name


def test_jax_conversions_round_trip():
    # in a process of its own: JAX in the test process would warn at every later fork (Ray)
    pytest.importorskip("jax")
    code = (
        "import numpy as np, torch\n"
        "from torchrl_r2vpo import _compat\n"
        "tensor = _compat.ndarray_to_tensor(np.arange(6, dtype=np.float32).reshape(2, 3))\n"
        "assert tensor.dtype == torch.float32 and tensor.shape == (2, 3)\n"
        "back = np.asarray(_compat.tensor_to_ndarray(tensor))\n"
        "np.testing.assert_array_equal(back, np.arange(6, dtype=np.float32).reshape(2, 3))\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
