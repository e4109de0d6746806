"""A TorchRL storage whose slots start at zero."""

from __future__ import annotations

from torchrl.data import LazyTensorStorage


class ZeroedLazyTensorStorage(LazyTensorStorage):
    """:class:`~torchrl.data.LazyTensorStorage` whose slots are zeros until written.

    TorchRL allocates the storage with ``torch.empty_like`` on the first write, so the slots
    not yet written hold whatever the memory held, NaN among it. A checkpoint of a buffer that
    is not yet full (an early interruption, or ``--reuse`` before its first K batches) then
    carries that garbage, and the finiteness check of
    :func:`~torchrl_r2vpo.recipes.run_state.save_checkpoint` refuses it at random. Zeroing the
    storage once, at allocation, makes the state deterministic; the slots written are the
    same as with the parent class.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> storage = ZeroedLazyTensorStorage(4)
        >>> storage.set(range(2), TensorDict({"x": torch.ones(2)}, [2]))
        >>> storage._storage["x"]
        tensor([1., 1., 0., 0.])
    """

    def _init(self, data) -> None:
        super()._init(data)
        self._storage.zero_()
