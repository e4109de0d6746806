"""ZeroedLazyTensorStorage: the slots not yet written are zeros, so a checkpoint of a buffer
that is not full is deterministic and passes the finiteness check."""

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

from torchrl_r2vpo.data import ZeroedLazyTensorStorage
from torchrl_r2vpo.recipes.run_state import read_checkpoint, save_checkpoint


def test_unwritten_slots_are_zero_and_a_partial_buffer_checkpoints(tmp_path, monkeypatch):
    # the parent allocates with empty_like: make that memory NaN, as it may be
    def nan_like(x, **kwargs):
        if isinstance(x, TensorDictBase):
            return x.apply(lambda leaf: nan_like(leaf, **kwargs))
        return torch.full_like(x, float("nan") if x.is_floating_point() else 0, **kwargs)

    monkeypatch.setattr(torch, "empty_like", nan_like)
    data = TensorDict({"advantage": torch.ones(2, 3)}, [2])
    plain = TensorDictReplayBuffer(storage=LazyTensorStorage(5))
    plain.extend(data)
    assert plain.storage._storage["advantage"][2:].isnan().all()  # what the subclass fixes
    buffer = TensorDictReplayBuffer(storage=ZeroedLazyTensorStorage(5))
    buffer.extend(data)
    stored = buffer.storage._storage["advantage"]
    assert (stored[:2] == 1).all() and (stored[2:] == 0).all()
    save_checkpoint(tmp_path / "checkpoint.pt", {"history": buffer.state_dict()})
    restored = TensorDictReplayBuffer(storage=ZeroedLazyTensorStorage(5))
    restored.load_state_dict(read_checkpoint(tmp_path / "checkpoint.pt")["history"])
    assert len(restored) == 2 and torch.equal(restored.storage._storage["advantage"], stored)
