"""What the examples share to stop a run and continue it exactly.

A checkpoint is written atomically; it holds every random generator's state; a Ctrl-C
never falls between a step's curve row and its snapshot; on ``--resume`` the learning
curve is cut back to the checkpoint's step and the run's settings are checked against
the checkpoint's, except those a resumed run may change.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interruption never leaves a torn checkpoint


@contextlib.contextmanager
def interrupts_deferred():
    """Holds a Ctrl-C (SIGINT) back until the block ends, then delivers it to the handler
    that was in place: what the block records for one step is recorded whole."""
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or handler is None:
        yield  # only the main thread sets handlers; None is one set outside Python
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
    if received:
        signal.raise_signal(signal.SIGINT)


def rng_state() -> dict:
    """The state of torch's CPU and CUDA generators, numpy's and Python's."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())  # generator states are CPU tensors
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def check_resumable(saved_config: dict, cfg, may_change: set[str]) -> None:
    """Raises a ``ValueError`` naming the first setting that differs from the checkpoint's
    and is not in ``may_change`` (settings the checkpoint predates are not checked)."""
    current = dataclasses.asdict(cfg)
    for key, value in saved_config.items():
        if key not in may_change and key in current and current[key] != value:
            raise ValueError(f"--resume: the checkpoint has {key}={value!r}, not {current[key]!r}")


def truncate_curve(path: Path, step_key: str, last_step: int, fields: list[str]) -> list[dict]:
    """Keeps (atomically) and returns the rows of the curve up to ``last_step``, the
    checkpoint's: the resumed run continues the curve from there."""
    if not path.exists():
        return []
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if int(float(r[step_key])) <= last_step]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return rows


def append_row(path: Path, fields: list[str], row: dict) -> None:
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fields)
        if f.tell() == 0:
            writer.writeheader()
        writer.writerow(row)
