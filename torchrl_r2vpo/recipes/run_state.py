"""Run state: stop a run and continue it exactly.

A checkpoint is written atomically; it holds every random generator's state; a Ctrl-C
or SIGTERM never falls between a step's curve row, logs and snapshot; on ``--resume``
the learning curve is cut back to the checkpoint's step and the run's settings are
checked against the checkpoint's, except those a resumed run may change.

A training loop uses it as the examples do::

    ckpt_path, curve_path = open_run_dir(out, cfg.resume, cfg.overwrite)
    seed_everything(cfg.seed)
    ckpt = load_checkpoint(ckpt_path, cfg)  # None for a fresh run
    ...  # load the states of ``ckpt``
    truncate_curve(curve_path, "frames", step, fields)
    logger = make_logger(cfg, out, name, ckpt["logger"] if ckpt else None)
    due = Schedule(cfg.checkpoint_every, step, cfg.frames)
    try:
        for ...:
            ...
            with interrupts_deferred():  # the row, its logs and the state, together
                log_row(logger, curve_path, fields, row, "frames")
                last_state = snapshot(cfg, step=step, ...)
                if due(step):
                    save_checkpoint(ckpt_path, last_state)
    except KeyboardInterrupt:
        save_checkpoint(ckpt_path, last_state)
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import random
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from torchrl.record.loggers import get_logger, Logger

__all__ = ["Schedule", "append_row", "check_resumable", "curve_row", "interrupts_deferred",
           "load_checkpoint", "log_row", "make_logger", "open_run_dir", "read_curve", "rng_state",
           "save_checkpoint", "seed_everything", "set_rng_state", "snapshot", "stop_on_sigterm",
           "truncate_curve"]

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


def read_curve(path: Path) -> list[dict]:
    """The rows of a curve written by :func:`append_row`, numbers as floats and empty cells
    as ``""``; ``[]`` if there is none."""
    if not path.exists():
        return []
    with open(path) as f:
        return [{k: float(v) if v != "" else "" for k, v in r.items()} for r in csv.DictReader(f)]


def curve_row(fields: list[str], metrics: dict[str, float], **values) -> dict:
    """A curve row: ``values``, then the ``metrics`` that are curve ``fields``; ``""`` for
    the fields that have neither."""
    row = dict.fromkeys(fields, "")
    row.update(values)
    row.update({key: value for key, value in metrics.items() if key in fields})
    return row


def log_row(logger: Logger, path: Path, fields: list[str], row: dict, step_key: str,
            extra: dict[str, float] | None = None) -> None:
    """Logs the row's values (and ``extra`` ones) at step ``row[step_key]``, then appends the
    row to the curve at ``path``; empty cells are not logged."""
    for key, value in {**row, **(extra or {})}.items():
        if key != step_key and value != "":
            logger.log_scalar(key, value, step=row[step_key])
    append_row(path, fields, row)


def seed_everything(seed: int) -> None:
    """Seeds Python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def snapshot(cfg, **state) -> dict:
    """A deep copy of the training ``state`` (state dicts, counters), with the settings
    (``config``) and every generator's state (``rng``): a checkpoint's content."""
    return copy.deepcopy(dict(config=dataclasses.asdict(cfg), **state, rng=rng_state()))


def load_checkpoint(path: Path, cfg, map_location=None) -> dict | None:
    """The checkpoint to resume from, with the generators set to its state, or ``None`` for
    a fresh run (``cfg.resume`` unset, or no checkpoint at ``path``, which it says).

    The settings are checked against the checkpoint's with :func:`check_resumable`, except
    ``cfg.RESUMABLE``, those a resumed run may change.
    """
    if not cfg.resume:
        return None
    if not path.exists():
        print(f"--resume: no checkpoint in {path.parent}, starting from scratch")
        return None
    ckpt = torch.load(path, weights_only=False, map_location=map_location)
    check_resumable(ckpt["config"], cfg, cfg.RESUMABLE)
    set_rng_state(ckpt["rng"])
    return ckpt


def make_logger(cfg, out: Path, experiment_name: str, state_dict: dict | None = None) -> Logger:
    """TorchRL's ``cfg.logger`` logger (csv, tensorboard, wandb) writing to ``out/logs``,
    continuing from ``state_dict`` (a resumed run's); a missing package ends the program with
    the command that installs it."""
    try:
        return get_logger(cfg.logger, logger_name=str(out / "logs"), experiment_name=experiment_name,
                          state_dict=state_dict,
                          wandb_kwargs={"config": dataclasses.asdict(cfg), "project": "torchrl_r2vpo"})
    except ImportError as err:
        raise SystemExit(f"--logger {cfg.logger} needs its package: pip install {cfg.logger} "
                         f"({err})") from err


class Schedule:
    """Says when a growing step count (frames, rollouts) is due for an evaluation or a
    checkpoint: when it crosses a multiple of ``every``, reaches ``total``, or is forced.

    Examples:
        >>> due = Schedule(every=100, step=0, total=250)
        >>> [step for step in (60, 120, 180, 240, 250) if due(step)]
        [120, 240, 250]
    """

    def __init__(self, every: int, step: int, total: int):
        self.every, self.total, self.last = every, total, step // every

    def __call__(self, step: int, force: bool = False) -> bool:
        if step // self.every > self.last or step >= self.total or force:
            self.last = step // self.every
            return True
        return False
