"""What the examples share to stop a run and continue it exactly.

A checkpoint is written atomically; it holds every random generator's state; a Ctrl-C
or SIGTERM never falls between a step's curve row, logs and snapshot; on ``--resume``
the learning curve is cut back to the checkpoint's step and the run's settings are
checked against the checkpoint's, except those a resumed run may change.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import random
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import torch


RUN_FILES = ("checkpoint.pt", "curve.csv", "logs")


def open_run_dir(out: Path, resume: bool, overwrite: bool) -> tuple[Path, Path]:
    """Creates ``out`` and returns its checkpoint and curve paths.

    A fresh run (no ``resume``) refuses to start over an earlier run's files unless
    ``overwrite``, which deletes them first: results are never replaced by accident.
    """
    if resume and overwrite:
        raise ValueError("pass --resume (continue the run in --out) or --overwrite (replace it), "
                         "not both.")
    out.mkdir(parents=True, exist_ok=True)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not resume:
        if not overwrite:
            raise FileExistsError(f"{out} already holds a run ({', '.join(found)}): pass --resume "
                                  "to continue it, or --overwrite to replace it.")
        for name in found:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    return out / "checkpoint.pt", out / "curve.csv"


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interruption never leaves a torn checkpoint


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_on_sigterm() -> None:
    """Makes SIGTERM (sent by ``kill``, ``timeout``, job schedulers) stop a run as Ctrl-C
    does, with the checkpoint of its last complete step. Call it from the main thread."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@contextlib.contextmanager
def interrupts_deferred():
    """Holds Ctrl-C (SIGINT) and SIGTERM back until the block ends, then delivers them to
    the handlers that were in place: what the block records for one step is recorded whole."""
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    if threading.current_thread() is not threading.main_thread() or None in handlers.values():
        yield  # only the main thread sets handlers; None is one set outside Python
        return
    received = []
    for sig in handlers:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    for signum in dict.fromkeys(received):
        signal.raise_signal(signum)


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
