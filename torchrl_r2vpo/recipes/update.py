"""The optimiser step and the epochs of minibatches over replayed data, shared by the examples.

One training iteration of either example is::

    for batch in minibatch_epochs(stored, minibatch_size, epochs, prepare=gae):
        out = update(batch)           # loss, backward, gradient clipping, optimiser step
        if out is None:               # a non-finite loss or gradient: no step was taken
            skipped += 1
            continue
        metrics.append(out)
    row = mean_metrics(metrics)       # one number per statistic for the learning curve

``update`` raises :class:`NonFiniteUpdateError` after :data:`MAX_SKIPS` skipped steps in a row.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from tensordict import TensorDictBase
from torch import nn

from torchrl_r2vpo._compat import compile_with_warmup

__all__ = ["MAX_SKIPS", "NonFiniteUpdateError", "make_update", "mean_metrics", "minibatch_epochs"]

MAX_SKIPS = 3
"""Optimiser steps in a row with a non-finite loss or gradient norm that stop training."""


class NonFiniteUpdateError(FloatingPointError):
    """``max_skips`` optimiser steps in a row had a non-finite loss or gradient norm: the run
    diverged (or its data did) and training stops (:func:`make_update`)."""


def make_update(loss: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float, *,
                clip_groups: Iterable[Iterable[torch.Tensor]] | None = None,
                compile: bool = False, max_skips: int = MAX_SKIPS,
                ) -> Callable[[TensorDictBase], TensorDictBase | None]:
    """One optimiser step on a minibatch, returning the loss's outputs and ``grad_norm``, or
    ``None`` where the step was skipped.

    The step sums the loss's ``loss_*`` entries, back-propagates, clips the gradient norm of
    each group of ``clip_groups`` to ``max_grad_norm`` (by default, each network of a TorchRL
    loss: its ``actor_network_params`` and ``critic_network_params``), steps the optimiser and
    zeroes the gradients. ``grad_norm`` is the norm of all clipped gradients before clipping,
    :math:`\\sqrt{\\sum_g \\lVert \\nabla_g \\rVert^2}`.

    A step whose summed loss or gradient norm is NaN or infinite is skipped: the gradients are
    zeroed, the optimiser does not step (the parameters and its state are unchanged), a
    ``RuntimeWarning`` names the non-finite values, and ``update`` returns ``None``, whose
    statistics a caller keeps out of its metrics and its dual-variable scheduler. After
    ``max_skips`` skipped steps in a row (a finite step resets the count) it raises
    :class:`NonFiniteUpdateError` instead: training has diverged, and the caller keeps its
    last checkpoint from before the fault. Reading the check costs one device sync per step.

    ``compile`` puts the loss, backward pass and clipping through ``torch.compile`` after one
    eager call (TensorDict's first-use caches fill there), with CUDA graphs
    (``mode="reduce-overhead"``) on CUDA, and static shapes: every minibatch has the same
    size, and another network size (a later run in the process) gets a graph of its own. The
    optimiser then needs a tensor learning rate
    (:func:`torchrl_r2vpo.recipes.control.make_optimizer` with ``compile=True``).

    Args:
        loss: a loss module whose output (a TensorDict or a tensorclass) holds ``loss_*``
            entries to minimise.
        optimizer: the optimiser of the loss's parameters.
        max_grad_norm: the largest gradient norm of a group.
        clip_groups: groups of parameters clipped separately.
        compile: compile the step.
        max_skips: the skipped steps in a row that stop training (at least 1).

    Returns:
        ``update(batch) -> TensorDict | None``, the detached outputs of the loss with
        ``grad_norm``, or ``None`` for a skipped step.

    Raises:
        NonFiniteUpdateError: from ``update``, at the ``max_skips``-th skipped step in a row.

    Examples:
        A loop of one's own counts the skipped steps and stops on the error:

        >>> import warnings
        >>> from tensordict import TensorDict
        >>> class Quadratic(nn.Module):  # a loss: the squared distance of w to the target
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = nn.Parameter(torch.zeros(2))
        ...     def forward(self, batch):
        ...         return TensorDict(loss_fit=(self.w - batch["target"]).square().sum())
        >>> quadratic = Quadratic()
        >>> optimizer = torch.optim.SGD(quadratic.parameters(), lr=0.1)
        >>> update = make_update(quadratic, optimizer, 1.0, clip_groups=[quadratic.parameters()],
        ...                      max_skips=2)
        >>> warnings.simplefilter("ignore", RuntimeWarning)  # one per skipped step
        >>> good, bad = TensorDict(target=torch.ones(2)), TensorDict(target=torch.full((2,), torch.nan))
        >>> skipped = 0
        >>> for batch in (good, bad, good, bad, bad):
        ...     try:
        ...         out = update(batch)
        ...     except NonFiniteUpdateError as err:
        ...         print(err)
        ...         break
        ...     skipped += out is None
        2 optimiser steps in a row had a non-finite loss or gradient norm: loss_fit nan, grad_norm nan; training stopped
        >>> skipped, quadratic.w.isfinite().all().item()  # the parameters never took a NaN step
        (2, True)
    """
    if max_skips < 1:
        raise ValueError(f"max_skips must be >= 1, got {max_skips}")
    if clip_groups is None:
        clip_groups = [loss.actor_network_params, loss.critic_network_params]
    clip_groups = [list(group.values(True, True)) if isinstance(group, TensorDictBase) else
                   list(group) for group in clip_groups]

    def backward(batch: TensorDictBase) -> tuple[TensorDictBase, torch.Tensor]:
        """The loss's detached outputs with ``grad_norm``, and whether both are finite."""
        out = loss(batch)
        total = sum(v for k, v in out.items() if k.startswith("loss_"))
        total.backward()
        norms = [nn.utils.clip_grad_norm_(params, max_grad_norm) for params in clip_groups]
        out = out if isinstance(out, TensorDictBase) else out.to_tensordict()
        grad_norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        finite = torch.isfinite(total.detach()) & torch.isfinite(grad_norm)
        return out.detach().set("grad_norm", grad_norm), finite

    if compile:
        cuda = next(loss.parameters()).device.type == "cuda"
        # static shapes: on CUDA, torch 2.11 failed to build the guards of a dynamic graph
        compiled = compile_with_warmup(backward, warmup=1,
                                       mode="reduce-overhead" if cuda else None, dynamic=False)

        def compiled_backward(batch: TensorDictBase) -> tuple[TensorDictBase, torch.Tensor]:
            if cuda:  # a new step of the CUDA graphs
                torch.compiler.cudagraph_mark_step_begin()
            out, finite = compiled(batch)
            return out.clone(), finite.clone()  # a CUDA graph's outputs change at its next replay

    skips = skipped = 0  # skipped steps in a row, and in all

    def update(batch: TensorDictBase) -> TensorDictBase | None:
        nonlocal skips, skipped
        out, finite = (compiled_backward if compile else backward)(batch)
        if finite.item():
            skips = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out
        optimizer.zero_grad(set_to_none=True)
        skips, skipped = skips + 1, skipped + 1
        values = ", ".join(f"{key} {value.item():.4g}" for key, value in out.items()
                           if (key.startswith("loss_") or key == "grad_norm")
                           and isinstance(value, torch.Tensor) and value.numel() == 1
                           and not value.isfinite()) or "the summed loss"
        if skips >= max_skips:
            raise NonFiniteUpdateError(
                f"{skips} optimiser steps in a row had a non-finite loss or gradient norm: "
                f"{values}; training stopped")
        warnings.warn(f"skipped an optimiser step ({skipped} so far, {skips} in a row; "
                      f"{max_skips} in a row stop training): non-finite {values}",
                      RuntimeWarning, stacklevel=2)
        return None

    return update


def minibatch_epochs(stored: TensorDictBase, minibatch_size: int, epochs: int,
                     prepare: Callable[[TensorDictBase], object] | None = None, *,
                     drop_last: bool = True) -> Iterator[TensorDictBase]:
    """The minibatches of ``epochs`` passes over ``stored``, flattened, each pass in a new
    random order: the minibatches of TorchRL's ``SamplerWithoutReplacement`` over a replay
    buffer refilled with ``stored`` each pass, row for row and drawing the same random numbers,
    without the buffer's copy and per-sample bookkeeping.

    ``prepare(stored)`` runs without gradients before each pass: GAE, recomputed with the
    current critic, stale batches included. With ``drop_last`` the last ``len % minibatch_size``
    rows of each pass's order are left out (every minibatch the same size), else the last
    minibatch is smaller.

    Examples:
        >>> from tensordict import TensorDict
        >>> stored = TensorDict(x=torch.arange(10).reshape(2, 5), batch_size=[2, 5])
        >>> [len(b) for b in minibatch_epochs(stored, 4, 2)]
        [4, 4, 4, 4]
        >>> [len(b) for b in minibatch_epochs(stored, 4, 1, drop_last=False)]
        [4, 4, 2]
    """
    if minibatch_size < 1:
        raise ValueError(f"minibatch_size must be >= 1, got {minibatch_size}")
    for _ in range(epochs):
        if prepare is not None:
            with torch.no_grad():
                prepare(stored)
        flat = stored.reshape(-1)
        order = torch.randperm(len(flat), device=flat.device)
        end = len(flat) - len(flat) % minibatch_size if drop_last else len(flat)
        for start in range(0, end, minibatch_size):
            if start + minibatch_size >= end:
                # the sampler draws its next order with the last minibatch, which refilling the
                # buffer discards: drawn here too, a seed's run stays the buffer's
                torch.randperm(len(flat), device=flat.device)
            yield flat[order[start:start + minibatch_size]]


def mean_metrics(metrics: list[TensorDictBase]) -> dict[str, float]:
    """The mean over optimiser steps of each scalar entry of their outputs (``{}`` for none:
    every step of the iteration was skipped).

    Examples:
        >>> from tensordict import TensorDict
        >>> steps = [TensorDict(loss=torch.tensor(x), ratio=torch.ones(2)) for x in (1.0, 2.0)]
        >>> mean_metrics(steps)
        {'loss': 1.5}
    """
    return {key: torch.stack([m[key].float() for m in metrics]).mean().item()
            for key in (metrics[0].keys() if metrics else ()) if metrics[0][key].numel() == 1}
