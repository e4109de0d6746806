"""Run state: stop a run and continue it.

A checkpoint is written atomically; it holds every random generator's state; a Ctrl-C
or SIGTERM never falls between a step's curve row, logs and snapshot; on ``--resume``
the learning curve is cut back to the checkpoint's step and the run's settings are
checked against the checkpoint's, except those a resumed run may change.

What a resume restores is what the examples put in the checkpoint: the loss (networks,
normaliser, lambda), optimiser, dual scheduler, stored batches, generators, learning-rate
schedule (:class:`LinearDecay`) and elapsed time (``time_s`` of the curve counts on), and
for the LLM example its environment's problem order and the lagged sampler's weights: a
resumed LLM run (transformers backend) continues exactly as the uninterrupted one. A
simulator's state is not saved (TorchRL's collectors do not save it): a resumed control
run's environments start new episodes, seeded by the policy version, so resuming a
checkpoint is repeatable but differs from the uninterrupted run from that step on.

A checkpoint cannot lie: it is sealed with the SHA-256 of its bytes, holds only tensors,
numbers, strings and dicts, lists and tuples of them (loaded with ``weights_only=True``,
so a pickled object never runs code), and its tensors are finite, checked when it is saved
and when it is loaded; what fails a check raises a :class:`CheckpointError` naming the file.

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
import hashlib
import io
import os
import pickle
import random
import shutil
import signal
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torchrl.record.loggers import get_logger, Logger

__all__ = ["CheckpointError", "LinearDecay", "Schedule", "append_row", "check_resumable", "curve_row",
           "interrupts_deferred", "load_checkpoint", "log_row", "make_logger", "open_run_dir",
           "read_checkpoint", "read_curve", "rng_state", "save_checkpoint", "seed_everything",
           "set_rng_state", "snapshot", "stop_on_sigterm", "truncate_curve"]

RUN_FILES = ("checkpoint.pt", "curve.csv", "final_eval.csv", "logs")


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


class CheckpointError(ValueError):
    """A checkpoint refused by :func:`save_checkpoint` or :func:`read_checkpoint`; the one-line
    message names the file, the problem and, where one is at fault, the entry."""


# The format: the zip archive that ``torch.save`` writes, with SEAL and the hex SHA-256 of
# every byte before that digest as the archive's comment, its last bytes: one file that
# ``torch.load`` still reads, whose digest is written and replaced with it.
SEAL = b"torchrl_r2vpo checkpoint sha256:"
DIGEST_SIZE = 64  # hex characters
ZIP_START = b"PK\x03\x04"  # a zip archive's first bytes (a local file header)
ZIP_END = b"PK\x05\x06"  # its end record: 22 bytes, the last two the comment's length
# the types of numpy's generator state, in the checkpoints saved before they were sealed
LEGACY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.zeros(1).__reduce__()[0]]
SCALARS = (str, int, float, bool, type(None), bytes, complex)
PLAIN = (*SCALARS, torch.Tensor, torch.nn.Parameter, torch.Size, torch.dtype, torch.device)


def save_checkpoint(path: Path, state: dict) -> None:
    """Writes ``state`` to ``path`` atomically, sealed with the SHA-256 of its bytes: an
    interruption or a crash leaves the previous checkpoint, never a torn one.

    Refuses, with a :class:`CheckpointError` naming the entries (as
    ``['optimizer']['state'][0]['exp_avg']``) and writing nothing, a state with a non-finite
    tensor or with a value :func:`read_checkpoint` would refuse: anything but tensors, numbers,
    strings, ``None`` and dicts, lists and tuples of them.
    """
    path = Path(path)
    non_finite, unloadable = refusals(state, check_types=True)
    if unloadable:
        raise CheckpointError(f"{path}: not saved: {listed(unloadable, 'of a type not loaded')}:"
                              " a checkpoint holds tensors, numbers, strings, containers of them")
    if non_finite:
        raise CheckpointError(f"{path}: not saved: {listed(non_finite, 'not finite')}")
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "w+b") as f:
            torch.save(state, f)
            seal(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the previous checkpoint
        tmp.replace(path)  # atomic: the file and its digest are replaced together
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename on disk too, where directories sync
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_checkpoint(path: Path, map_location=None) -> dict:
    """The state saved at ``path`` by :func:`save_checkpoint`, once it passes every check: its
    bytes match its SHA-256; it holds only tensors, numbers, strings and containers of them
    (``torch.load(weights_only=True)``: an object that would run code is refused, never run);
    its tensors are finite.

    Raises a :class:`CheckpointError` naming the file and the problem: empty, not a checkpoint,
    truncated, damaged (a checksum mismatch), refused objects, or the non-finite entries. A
    checkpoint saved before checkpoints were sealed (no checksum) is loaded with a warning: its
    contents are checked, not its bytes; the next save seals it.
    """
    path = Path(path)
    with open(path, "rb") as f:
        sealed = verify_seal(f, path)
        f.seek(0)
        try:
            with warnings.catch_warnings(), \
                    torch.serialization.safe_globals([] if sealed else LEGACY_GLOBALS):
                warnings.simplefilter("ignore")  # torch's, about the pickle protocol
                state = torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            if "weights only" not in str(err).lower():
                raise CheckpointError(f"{path}: damaged, not loaded: {first_line(err)}") from None
            f.seek(0)
            raise CheckpointError(f"{path}: refused, not loaded: it holds {unsafe_globals(f, err)},"
                                  " not only tensors, numbers, strings and containers") from None
        except Exception as err:
            raise CheckpointError(f"{path}: not loaded: {type(err).__name__}: "
                                  f"{first_line(err)}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint: it holds a {type(state).__name__}, "
                              "not a dict")
    non_finite, _ = refusals(state, check_types=False)
    if non_finite:
        raise CheckpointError(f"{path}: not loaded: {listed(non_finite, 'not finite')}")
    return state


def seal(f) -> None:
    """Seals the zip archive ``torch.save`` wrote to the binary file ``f`` (opened for reading
    and writing): its comment becomes ``SEAL`` and the hex SHA-256 of the bytes before it."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(size - 22, 0))
    end = f.read(22)
    if end[:4] != ZIP_END or end[20:] != b"\0\0":
        raise RuntimeError("torch.save did not write a zip archive without a comment")
    f.seek(size - 2)
    f.write(struct.pack("<H", len(SEAL) + DIGEST_SIZE))  # the comment's length
    f.write(SEAL)
    f.write(sha256(f, size + len(SEAL)).encode())


def verify_seal(f, path: Path) -> bool:
    """Whether the checkpoint in the binary file ``f`` is sealed (``False``: saved before
    checkpoints were, which it warns of); raises a :class:`CheckpointError` if it is empty,
    not a ``torch.save`` archive, truncated, or sealed with another digest than its bytes'."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    tail = len(SEAL) + DIGEST_SIZE
    if size > tail:
        f.seek(size - tail)
        footer = f.read(tail)
        if footer.startswith(SEAL):
            if sha256(f, size - DIGEST_SIZE).encode() != footer[len(SEAL):]:
                raise CheckpointError(f"{path}: damaged: its bytes do not match the SHA-256 it "
                                      "was saved with")
            return True
    f.seek(0)
    if f.read(4) != ZIP_START:
        raise CheckpointError(f"{path}: not a checkpoint (not an archive written by torch.save)")
    f.seek(max(size - 22, 0))
    end = f.read(22)
    if end[:4] == ZIP_END and end[20:] == b"\0\0":  # whole, as torch.save wrote it
        warnings.warn(f"{path}: saved without a checksum (by an earlier version), loaded "
                      "without checking its bytes; the next save adds one", stacklevel=3)
        return False
    raise CheckpointError(f"{path}: truncated or damaged: it does not end with its checksum")


def sha256(f, size: int) -> str:
    """The hex SHA-256 of the first ``size`` bytes of the binary file ``f``."""
    f.seek(0)
    digest = hashlib.sha256()
    while size > 0 and (chunk := f.read(min(size, 1 << 20))):
        digest.update(chunk)
        size -= len(chunk)
    return digest.hexdigest()


def entries(state) -> Iterator[tuple[tuple, object]]:
    """The values in nested dicts, lists and tuples, each with its key path, depth first."""
    stack = [((), state)]
    while stack:
        path, value = stack.pop()
        if type(value) in (dict, OrderedDict):
            stack.extend(((*path, k), v) for k, v in reversed(value.items()))
        elif type(value) in (list, tuple):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(value))))
        else:
            yield path, value


def refusals(state, check_types: bool) -> tuple[list[str], list[str]]:
    """The entries of ``state`` with a non-finite tensor, and (``check_types``) those a
    weights-only ``torch.load`` refuses, each as its key path and what it holds."""
    non_finite, unloadable = [], []
    for path, value in entries(state):
        kind = type(value)
        if kind in SCALARS:  # the most, and fast: isinstance(value, torch.Tensor) is not
            continue
        if check_types and kind not in PLAIN and not loads_weights_only(value):
            unloadable.append(f"{key_path(path)} ({kind.__module__}.{kind.__qualname__})")
        elif (isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())
              and not value.is_meta and not torch.isfinite(value).all()):
            non_finite.append(f"{key_path(path)} ({'nan' if value.isnan().any() else 'inf'})")
    return non_finite, unloadable


def loads_weights_only(value) -> bool:
    """Whether ``torch.load(weights_only=True)`` loads ``value`` back (without running it)."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(value, buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


def unsafe_globals(f, err: Exception) -> str:
    """The names of what a weights-only load of ``f`` refused (``posix.system``)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception:
        names = []
    if names:
        return ", ".join(names)
    return next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line),
                "an object that is not allowed")


def key_path(path: tuple) -> str:
    return "".join(f"[{key!r}]" for key in path) or "the state"


def first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "")


def listed(items: list[str], problem: str) -> str:
    """``"['a'] (nan) is not finite"``, ``"['a'], ['b'], ['c'] and 2 more are not finite"``."""
    shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
    return f"{shown} {'is' if len(items) == 1 else 'are'} {problem}"


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
    """The state of torch's CPU and CUDA generators, numpy's (its key as a tensor: a checkpoint
    holds no numpy arrays) and Python's."""
    name, key, *rest = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(key.astype(np.int64)), *rest),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())  # generator states are CPU tensors
    name, key, *rest = state["numpy"]  # key: a tensor, or an array in an unsealed checkpoint
    np.random.set_state((name, np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key,
                                          dtype=np.uint32), *rest))
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

    The checkpoint is checked by :func:`read_checkpoint`, and the settings against its with
    :func:`check_resumable`, except ``cfg.RESUMABLE``, those a resumed run may change.
    """
    if not cfg.resume:
        return None
    if not path.exists():
        print(f"--resume: no checkpoint in {path.parent}, starting from scratch")
        return None
    ckpt = read_checkpoint(path, map_location)
    missing = [key for key in ("config", "rng") if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a run's checkpoint: it has no {' or '.join(missing)}")
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


@dataclasses.dataclass
class LinearDecay:
    """A value annealed linearly from ``value`` at step ``start`` to 0 at step ``end`` (and 0
    after): a learning rate annealed over a run's budget.

    A checkpoint holds it (:meth:`state_dict`) and a resumed run continues it with
    :meth:`resumed`: the same schedule for the same budget, and for another ``end`` its value
    at the checkpoint's step annealed to 0 at the new ``end``: a longer budget extends the
    schedule where it was, without a jump.

    Examples:
        >>> lr = LinearDecay(value=3e-4, start=0, end=1000)
        >>> lr(0), lr(500), lr(1000)
        (0.0003, 0.00015, 0.0)
        >>> longer = LinearDecay(**lr.state_dict()).resumed(step=500, end=2000)
        >>> longer(500), longer(1250), longer(2000)
        (0.00015, 7.5e-05, 0.0)
    """

    value: float
    start: int
    end: int

    def __call__(self, step: int) -> float:
        return max(0.0, self.value * (1 - (step - self.start) / (self.end - self.start)))

    def resumed(self, step: int, end: int, flag: str = "--frames") -> LinearDecay:
        """The schedule of a run resumed at ``step`` with the budget ``end`` (``flag``).

        Raises:
            ValueError: naming ``flag``, for a longer budget after the schedule reached 0
                (the resumed run would not learn).
        """
        if end == self.end or step >= end:  # the same schedule, or nothing left to train
            return self
        value = self(step)
        if value <= 0:
            raise ValueError(f"--resume with {flag} {end}: the checkpoint's learning rate was "
                             f"annealed to 0 at {self.end} (its {flag}), and a resumed run "
                             "continues that schedule: it would not learn; start a new run")
        return LinearDecay(value, step, end)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)


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
