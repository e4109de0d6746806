"""The optimiser step of torchrl_r2vpo.recipes.update: a non-finite loss or gradient norm skips
the step, and a few in a row stop training; and the minibatches of its epochs."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torchrl.data import LazyTensorStorage, SamplerWithoutReplacement, TensorDictReplayBuffer

from torchrl_r2vpo.recipes import update as update_module
from torchrl_r2vpo.recipes.update import (MAX_SKIPS, make_update, mean_metrics, minibatch_epochs,
                                          NonFiniteUpdateError)

GOOD = TensorDict(target=torch.ones(2))
NAN_LOSS = TensorDict(target=torch.full((2,), torch.nan))  # loss and gradient NaN
INF_GRAD = TensorDict(target=torch.zeros(2), sqrt=torch.ones(()))  # a finite loss, gradient inf


class Quadratic(nn.Module):
    """``|w - target|^2`` plus, where the batch asks, ``sqrt(w - w)`` (``w - w`` without
    gradient through its second term): 0, with an infinite gradient."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, batch: TensorDict) -> TensorDict:
        out = TensorDict(loss_fit=(self.w - batch["target"]).square().sum())
        if "sqrt" in batch.keys():
            out["loss_sqrt"] = (self.w - self.w.detach()).sqrt().sum()
        return out


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def step(request, monkeypatch):
    """A quadratic loss, Adam, and its update step (compiled: through the compiled path, with
    torch.compile itself replaced by the function)."""
    if request.param:
        monkeypatch.setattr(update_module, "compile_with_warmup", lambda fn, **kwargs: fn)
    loss = Quadratic()
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.1)
    return loss, optimizer, make_update(loss, optimizer, 1.0, clip_groups=[loss.parameters()],
                                        compile=request.param)


def state(loss: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"w": loss.w.detach().clone(),
            "adam": {k: v.clone() for k, v in optimizer.state[loss.w].items()}}


@pytest.mark.parametrize("batch, bad", [(NAN_LOSS, "loss_fit nan, grad_norm nan"),
                                        (INF_GRAD, "grad_norm inf")], ids=["nan-loss", "inf-grad"])
def test_a_non_finite_step_is_skipped_and_leaves_the_parameters_unchanged(step, batch, bad):
    loss, optimizer, update = step
    assert update(GOOD) is not None  # Adam has moments to keep
    before = state(loss, optimizer)
    with pytest.warns(RuntimeWarning, match=f"skipped an optimiser step .*non-finite {bad}"):
        assert update(batch) is None
    after = state(loss, optimizer)
    assert torch.equal(after["w"], before["w"]) and before["w"].ne(0).all()
    for key, value in before["adam"].items():  # moments and step count: no step was taken
        assert torch.equal(after["adam"][key], value), key
    assert loss.w.grad is None  # no gradient left over for the next step
    out = update(GOOD)  # and the next finite step trains on
    assert out is not None and torch.isfinite(out["grad_norm"]) and not torch.equal(loss.w, after["w"])


def test_max_skips_in_a_row_raise_with_the_values(step):
    loss, _, update = step
    assert MAX_SKIPS == 3
    with pytest.warns(RuntimeWarning):
        assert update(NAN_LOSS) is None and update(INF_GRAD) is None
    with pytest.raises(NonFiniteUpdateError, match=r"^3 optimiser steps in a row had a non-finite "
                       r"loss or gradient norm: loss_fit nan, grad_norm nan; training stopped$"):
        update(NAN_LOSS)
    assert torch.isfinite(loss.w).all()


def test_a_finite_step_resets_the_count(step):
    _, _, update = step
    with pytest.warns(RuntimeWarning):
        for batch in (NAN_LOSS, NAN_LOSS, GOOD, NAN_LOSS, NAN_LOSS, GOOD, NAN_LOSS, NAN_LOSS):
            skipped = update(batch) is None
            assert skipped == (batch is NAN_LOSS)
        with pytest.raises(NonFiniteUpdateError, match="^3 optimiser steps in a row"):
            update(NAN_LOSS)


def test_max_skips_is_checked_and_can_be_one():
    loss = Quadratic()
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="max_skips must be >= 1, got 0"):
        make_update(loss, optimizer, 1.0, clip_groups=[loss.parameters()], max_skips=0)
    update = make_update(loss, optimizer, 1.0, clip_groups=[loss.parameters()], max_skips=1)
    with pytest.raises(NonFiniteUpdateError, match="^1 optimiser steps in a row"):
        update(INF_GRAD)


def test_an_iteration_whose_steps_were_all_skipped_has_no_metrics():
    assert mean_metrics([]) == {}


@pytest.mark.parametrize("drop_last", [True, False])
def test_minibatches_are_the_refilled_replay_buffers(drop_last):
    stored = TensorDict(x=torch.arange(2 * 11).reshape(2, 11), batch_size=[2, 11])
    buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(22), batch_size=4,
                                    sampler=SamplerWithoutReplacement(drop_last=drop_last))
    torch.manual_seed(0)
    expected = []
    for _ in range(3):  # what minibatch_epochs replaced: the buffer refilled each pass
        buffer.empty()
        buffer.extend(stored.reshape(-1))
        expected += [batch["x"] for batch in buffer]
    after_buffer = torch.rand(())
    torch.manual_seed(0)
    passes = [batch["x"] for batch in minibatch_epochs(stored, 4, 3, drop_last=drop_last)]
    assert [len(b) for b in passes] == ([4] * 5 if drop_last else [4] * 5 + [2]) * 3
    assert len(passes) == len(expected)
    for got, want in zip(passes, expected):  # row for row, in every pass
        assert torch.equal(got, want)
    assert torch.rand(()) == after_buffer  # and the generator is left where the buffer left it
    for epoch in passes[:len(passes) // 3], passes[len(passes) // 3:2 * len(passes) // 3]:
        seen = torch.cat(epoch)
        assert len(seen.unique()) == len(seen) == (20 if drop_last else 22)  # no row twice
    assert not torch.equal(passes[0], passes[len(passes) // 3])  # a new order each pass


def test_prepare_runs_before_each_pass_without_gradients():
    stored = TensorDict(x=torch.zeros(8), batch_size=[8])
    grad_enabled = []
    batches = minibatch_epochs(stored, 8, 3,
                               prepare=lambda td: grad_enabled.append(torch.is_grad_enabled()))
    assert len(list(batches)) == 3 and grad_enabled == [False] * 3
    with pytest.raises(ValueError, match="minibatch_size must be >= 1, got 0"):
        next(minibatch_epochs(stored, 0, 1))
