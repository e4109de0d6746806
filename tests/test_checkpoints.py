"""Checkpoints that cannot lie: a sound one loads back equal; a damaged, foreign, unsafe or
non-finite one is refused, on save or on load, by a one-line error naming the file."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrl_r2vpo.recipes.run_state import (CheckpointError, load_checkpoint, read_checkpoint,
                                             save_checkpoint, seal, snapshot)


@dataclasses.dataclass
class Config:
    lr: float = 1e-3
    resume: bool = True
    RESUMABLE = frozenset()


class RunsCode:
    """Unpickled, it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def training_state() -> dict:
    """What the examples save: a module's and its optimiser's states, counters, stored data,
    the logger's scalars (a NaN metric among them: only tensors must be finite)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    history = {"tokens": torch.arange(6).reshape(2, 3), "mask": torch.ones(2, 3, dtype=torch.bool),
               "log_probs": torch.randn(4096), "half": torch.randn(3, dtype=torch.bfloat16),
               "shape": torch.Size([2, 3])}
    return dict(frames=2048, loss=net.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=None, history=history, name="r2vpo",
                logger={"scalars": {"reward": [(1, 0.5), (2, float("nan"))]}})


def assert_same(a, b, key: str = "") -> None:
    assert type(a) is type(b), key
    if isinstance(a, dict):
        assert list(a) == list(b), key
        for k in a:
            assert_same(a[k], b[k], f"{key}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{key}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), key
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), key
    else:
        assert a == b, key


def write_sealed(path: Path, state) -> None:
    """``state`` written as :func:`save_checkpoint` writes it, without its checks."""
    with open(path, "w+b") as f:
        torch.save(state, f)
        seal(f)


def refusal(excinfo, path: Path) -> str:
    message = str(excinfo.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


@pytest.fixture
def saved(tmp_path) -> tuple[Path, dict]:
    path = tmp_path / "checkpoint.pt"
    state = snapshot(Config(), **training_state())
    save_checkpoint(path, state)
    return path, state


def test_a_checkpoint_loads_back_equal(saved):
    path, state = saved
    assert_same(read_checkpoint(path), state)
    # still an archive that torch.load reads, without allowing code
    assert_same(torch.load(path, weights_only=True), state)
    assert not path.with_suffix(".tmp").exists()


def test_a_resume_restores_every_generator(tmp_path):
    path, cfg = tmp_path / "checkpoint.pt", Config()
    state = snapshot(cfg, frames=1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    save_checkpoint(path, state)
    random.random(), np.random.rand(), torch.rand(1)
    assert load_checkpoint(path, cfg)["frames"] == 1
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1:]


CORRUPTIONS = {
    "empty": (lambda data: b"", "empty file"),
    "truncated": (lambda data: data[: len(data) // 2], "truncated or damaged"),
    "last byte cut": (lambda data: data[:-1], "truncated or damaged"),
    "text": (lambda data: b"frames,reward\n1024,0.5\n", "not a checkpoint"),
    "first byte flipped": (lambda data: flip(data, 0), "do not match the SHA-256"),
    "middle byte flipped": (lambda data: flip(data, len(data) // 2), "do not match the SHA-256"),
    "last byte flipped": (lambda data: flip(data, len(data) - 1), "do not match the SHA-256"),
    "4 KB of garbage": (lambda data: data[:1024] + bytes(range(256)) * 16 + data[1024 + 4096:],
                        "do not match the SHA-256"),
    "another checksum": (lambda data: data[:-64] + b"0" * 64, "do not match the SHA-256"),
    "seal's label flipped": (lambda data: flip(data, len(data) - 70), "truncated or damaged"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_damaged_checkpoint_is_refused_by_name(saved, corruption):
    path, _ = saved
    damage, problem = CORRUPTIONS[corruption]
    data = path.read_bytes()
    assert len(data) > 1024 + 4096
    path.write_bytes(damage(data))
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(path)
    assert problem in refusal(excinfo, path)


@pytest.mark.parametrize("how", ["pickled", "saved without a checksum", "sealed"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, how):
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "hacked"
    state = {"config": {}, "rng": {}, "payload": RunsCode(marker)}
    if how == "pickled":
        path.write_bytes(pickle.dumps(state))
    elif how == "saved without a checksum":
        torch.save(state, path)
    else:  # a valid checksum proves no more than that the bytes are the ones written
        write_sealed(path, state)
    unsealed = how == "saved without a checksum"
    with pytest.warns(UserWarning, match="without a checksum") if unsealed \
            else contextlib.nullcontext(), pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path, Config())
    message = refusal(excinfo, path)
    if how == "pickled":
        assert "not a checkpoint" in message
    else:
        assert "refused, not loaded: it holds posix.system" in message
    assert not marker.exists()
    if how == "pickled":  # what an unchecked load would have done
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("sealed", [True, False])
def test_a_non_finite_tensor_is_refused_on_load_by_its_key(tmp_path, sealed):
    path = tmp_path / "checkpoint.pt"
    state = training_state()
    state["loss"]["weight"][1, 2] = float("nan")
    if sealed:
        write_sealed(path, state)
    else:
        torch.save(state, path)
    with contextlib.nullcontext() if sealed else pytest.warns(UserWarning, match="checksum"), \
            pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(path)
    assert "not loaded: ['loss']['weight'] (nan) is not finite" in refusal(excinfo, path)


@pytest.mark.parametrize("entry, key, value", [
    (("optimizer", "state", 0, "exp_avg"), "['optimizer']['state'][0]['exp_avg'] (nan)", math.nan),
    (("loss", "bias"), "['loss']['bias'] (inf)", math.inf),
    (("history", "log_probs"), "['history']['log_probs'] (inf)", -math.inf),
])
def test_a_non_finite_tensor_is_not_saved_and_its_key_is_named(saved, entry, key, value):
    path, _ = saved
    before = path.read_bytes()
    state = training_state()
    tensor = state
    for k in entry:
        tensor = tensor[k]
    tensor.view(-1)[-1] = value
    with pytest.raises(CheckpointError) as excinfo:
        save_checkpoint(path, state)
    assert f"not saved: {key} is not finite" in refusal(excinfo, path)
    assert path.read_bytes() == before and not path.with_suffix(".tmp").exists()


def test_a_value_that_would_not_load_is_not_saved(tmp_path):
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "hacked"
    state = {"rng": {"numpy": np.random.get_state()}, "hook": RunsCode(marker)}
    with pytest.raises(CheckpointError) as excinfo:
        save_checkpoint(path, state)
    message = refusal(excinfo, path)
    assert "['rng']['numpy'][1] (numpy.ndarray)" in message
    assert f"['hook'] ({__name__}.RunsCode)" in message
    assert not path.exists() and not marker.exists()


def test_a_checkpoint_saved_before_checksums_still_resumes_with_a_warning(tmp_path):
    path, cfg = tmp_path / "checkpoint.pt", Config()
    state = snapshot(cfg, frames=1)
    state["rng"]["numpy"] = np.random.get_state()  # an array, as it was saved then
    expected = np.random.rand()
    torch.save(state, path)  # as save_checkpoint wrote it then
    np.random.rand()
    with pytest.warns(UserWarning, match="without a checksum"):
        assert load_checkpoint(path, cfg)["frames"] == 1
    assert np.random.rand() == expected


def test_a_state_dict_that_is_not_a_runs_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, torch.nn.Linear(2, 2).state_dict())
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path, Config())
    assert "not a run's checkpoint: it has no config or rng" in refusal(excinfo, path)
