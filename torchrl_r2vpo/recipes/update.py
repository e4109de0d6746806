"""The optimiser step and the epochs of minibatches over replayed data, shared by the examples.

One training iteration of either example is::

    for batch in minibatch_epochs(stored, minibatches, epochs, prepare=gae):
        out = update(batch)           # loss, backward, gradient clipping, optimiser step
        metrics.append(out)
    row = mean_metrics(metrics)       # one number per statistic for the learning curve
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from tensordict import TensorDictBase
from torch import nn
from torchrl.data import TensorDictReplayBuffer

from torchrl_r2vpo._compat import compile_with_warmup

__all__ = ["make_update", "mean_metrics", "minibatch_epochs"]


def make_update(loss: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float, *,
                clip_groups: Iterable[Iterable[torch.Tensor]] | None = None,
                compile: bool = False) -> Callable[[TensorDictBase], TensorDictBase]:
    """One optimiser step on a minibatch, returning the loss's outputs and ``grad_norm``.

    The step sums the loss's ``loss_*`` entries, back-propagates, clips the gradient norm of
    each group of ``clip_groups`` to ``max_grad_norm`` (by default, each network of a TorchRL
    loss: its ``actor_network_params`` and ``critic_network_params``), steps the optimiser and
    zeroes the gradients. ``grad_norm`` is the norm of all clipped gradients before clipping,
    :math:`\\sqrt{\\sum_g \\lVert \\nabla_g \\rVert^2}`.

    ``compile`` puts the step through ``torch.compile`` after one eager call (TensorDict's
    first-use caches fill there), with CUDA graphs (``mode="reduce-overhead"``) on CUDA, and
    static shapes: every minibatch has the same size, and another network size (a later run
    in the process) gets a graph of its own. The optimiser then needs a tensor learning rate
    (:func:`torchrl_r2vpo.recipes.control.make_optimizer` with ``compile=True``).

    Args:
        loss: a loss module whose output (a TensorDict or a tensorclass) holds ``loss_*``
            entries to minimise.
        optimizer: the optimiser of the loss's parameters.
        max_grad_norm: the largest gradient norm of a group.
        clip_groups: groups of parameters clipped separately.
        compile: compile the step.

    Returns:
        ``update(batch) -> TensorDict``, the detached outputs of the loss with ``grad_norm``.
    """
    if clip_groups is None:
        clip_groups = [loss.actor_network_params, loss.critic_network_params]
    clip_groups = [list(group.values(True, True)) if isinstance(group, TensorDictBase) else
                   list(group) for group in clip_groups]

    def update(batch: TensorDictBase) -> TensorDictBase:
        out = loss(batch)
        total = sum(v for k, v in out.items() if k.startswith("loss_"))
        total.backward()
        norms = [nn.utils.clip_grad_norm_(params, max_grad_norm) for params in clip_groups]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out = out if isinstance(out, TensorDictBase) else out.to_tensordict()
        grad_norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        return out.detach().set("grad_norm", grad_norm)

    if not compile:
        return update
    cuda = next(loss.parameters()).device.type == "cuda"
    # static shapes: on CUDA, torch 2.11 failed to build the guards of a dynamic graph
    compiled = compile_with_warmup(update, warmup=1, mode="reduce-overhead" if cuda else None,
                                   dynamic=False)

    def compiled_update(batch: TensorDictBase) -> TensorDictBase:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(batch).clone()  # a CUDA graph's outputs are overwritten at its next replay

    return compiled_update


def minibatch_epochs(stored: TensorDictBase, minibatches: TensorDictReplayBuffer, epochs: int,
                     prepare: Callable[[TensorDictBase], object] | None = None,
                     ) -> Iterator[TensorDictBase]:
    """The minibatches of ``epochs`` passes over ``stored``, flattened, each pass in a new
    random order (``minibatches`` is emptied and refilled, and samples them).

    ``prepare(stored)`` runs without gradients before each pass: GAE, recomputed with the
    current critic, stale batches included.
    """
    for _ in range(epochs):
        if prepare is not None:
            with torch.no_grad():
                prepare(stored)
        minibatches.empty()
        minibatches.extend(stored.reshape(-1))
        yield from minibatches


def mean_metrics(metrics: list[TensorDictBase]) -> dict[str, float]:
    """The mean over optimiser steps of each scalar entry of their outputs.

    Examples:
        >>> from tensordict import TensorDict
        >>> steps = [TensorDict(loss=torch.tensor(x), ratio=torch.ones(2)) for x in (1.0, 2.0)]
        >>> mean_metrics(steps)
        {'loss': 1.5}
    """
    return {key: torch.stack([m[key].float() for m in metrics]).mean().item()
            for key in metrics[0].keys() if metrics[0][key].numel() == 1}
