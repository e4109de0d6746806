"""Worker processes that run the verifier's slow comparisons in parallel, each under a timeout.

A :class:`VerifierPool` starts up to ``max_workers`` Python interpreters running
:mod:`torchrl_r2vpo.math_task._symbolic` as a script, on first use. They are plain subprocesses,
not ``multiprocessing`` children: nothing of the caller's ``__main__`` is imported again, so a
script needs no ``if __name__ == "__main__":`` guard, and a worker imports sympy only (not torch),
so it starts in about half a second. Each worker compares one pair at a time under its own
``SIGALRM`` timer (it runs on its own main thread, whatever thread the caller is on); a worker
that has not answered ``timeout + 1`` seconds after it got a pair (a stuck C call, or no
``SIGALRM`` on the platform) is killed and replaced. So a batch with ``k`` slow pairs costs about
``ceil(k / max_workers)`` timeouts, and never hangs. Idle workers wait for the next batch and exit
when the pool is closed, at interpreter exit, or when the parent process dies (their stdin
closes). The pool can be shared by threads.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence

from torchrl_r2vpo.math_task import _symbolic

__all__ = ["VerifierPool", "WorkerStartError"]

VERIFIERS = tuple(_symbolic.COMPARERS)
_GRACE_S = 1.0  # how long after its own timeout a worker is given to answer before it is killed
_START_TIMEOUT_S = 60.0  # how long a worker may take to import sympy and warm up
_MAX_START_FAILURES = 3  # workers that fail to start in a row before the pool gives up
# runs the worker module by path (not the package, which imports torch) with no cwd on sys.path
_BOOT = ("import runpy, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
         "runpy.run_path(sys.argv[1], run_name='__main__')")


class WorkerStartError(RuntimeError):
    """The pool's worker processes cannot start (no usable ``sys.executable``, a missing
    package, or each worker dying before it is ready)."""


def _default_workers() -> int:
    return min(16, max(4, os.cpu_count() or 1))


class _Worker:
    """One worker process and the thread that forwards its answers to ``self.inbox``."""

    def __init__(self, verifier: str, inbox: queue.SimpleQueue):
        self.inbox = inbox
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, _symbolic.__file__, verifier],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
        )
        threading.Thread(target=self._read, name="verifier-worker-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                try:
                    self.inbox.put((self, json.loads(line)))
                except ValueError:
                    continue
        finally:
            self.proc.stdout.close()
            self.inbox.put((self, None))  # the worker has exited

    def send(self, job: int, a: str, b: str, timeout: float) -> bool:
        try:
            self.proc.stdin.write((json.dumps([job, a, b, timeout]) + "\n").encode("ascii"))
            return True
        except (OSError, ValueError):  # it has died
            return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, kill: bool = False) -> None:
        """Closes its stdin so that it exits, or kills it; reaps it."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            if kill:
                self.proc.kill()
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        except OSError:
            pass


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


class VerifierPool:
    """Parallel, time-limited answer comparisons in worker processes.

    Args:
        max_workers: the most worker processes; they are started when a batch needs them.
            Default: the number of CPUs, at least 4 and at most 16 (a timed-out pair holds its
            worker for the whole timeout, whatever the CPU load).
        verifier: ``"builtin"`` (pairs of normalised answers for the whitelisted sympy stage of
            :func:`~torchrl_r2vpo.math_task.answers_match`) or ``"math-verify"`` (pairs of a
            completion and a reference for Hugging Face's ``math_verify``; needs
            ``pip install "torchrl_r2vpo[math-verify]"``).

    Most users never build one: :func:`~torchrl_r2vpo.math_task.score_batch` uses a shared
    pool per verifier. Build one to choose its size, and close it (or use ``with``) when done.

    Examples:
        >>> from torchrl_r2vpo.math_task import score_batch, VerifierPool
        >>> with VerifierPool(max_workers=2) as pool:
        ...     pool.compare([("x^2-1", "(x-1)(x+1)"), ("x+1", "x+2")], timeout=5.0)
        ...     score_batch([r"\\boxed{(x-1)(x+1)}", "#### 3"], ["x^2-1", "4"], pool=pool)
        [True, False]
        [1.0, 0.0]
    """

    def __init__(self, max_workers: int | None = None, *, verifier: str = "builtin"):
        if verifier not in VERIFIERS:
            raise ValueError(f"unknown verifier {verifier!r}; expected one of {VERIFIERS}")
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers or _default_workers()
        self.verifier = verifier
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._live = 0  # workers started and not yet stopped, idle or in use
        self._start_failures = 0
        self._closed = False
        self._pid = os.getpid()
        self._jobs = itertools.count()
        self._finalizer = weakref.finalize(self, _stop_all, self._idle)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stops the idle workers now and the busy ones when their pair is done; idempotent."""
        with self._cond:
            self._closed = True
            idle, self._idle[:] = list(self._idle), []
            self._live -= len(idle)
            self._cond.notify_all()
        _stop_all(idle)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def num_workers(self) -> int:
        """Worker processes started and not stopped (idle, busy or warming up)."""
        return self._live

    def compare(self, pairs: Sequence[tuple[str, str]], *, timeout: float = 1.0) -> list[bool]:
        """The verdict on each pair: True for equal, False for different, unparsable or timed out.

        Each pair gets ``timeout`` seconds of wall time in a worker, from when the worker
        receives it; the pairs run in parallel on up to ``max_workers`` workers.

        Raises:
            RuntimeError: the pool is closed.
            WorkerStartError: its workers cannot start (the message says why).
        """
        if timeout <= 0 or not pairs:
            return [False] * len(pairs)
        self._after_fork()
        results: list[bool] = [False] * len(pairs)
        todo = collections.deque(range(len(pairs)))
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        free: list[_Worker] = []  # held by this call, ready
        starting: dict[_Worker, float] = {}  # held by this call, warming up: ready deadline
        busy: dict[_Worker, tuple[int, int, float]] = {}  # held, comparing: (job, index, deadline)
        try:
            while todo or busy or starting:
                while todo and len(free) + len(starting) < len(todo):
                    worker, new = self._take(inbox, block=not (free or starting or busy))
                    if worker is None:
                        break
                    if new:
                        starting[worker] = time.monotonic() + _START_TIMEOUT_S
                    else:
                        free.append(worker)
                while free and todo:
                    worker, index = free.pop(), todo.popleft()
                    job = next(self._jobs)
                    if worker.send(job, *pairs[index], timeout):
                        busy[worker] = (job, index, time.monotonic() + timeout + _GRACE_S)
                    else:  # it died while idle: try the pair again on another worker
                        todo.appendleft(index)
                        self._discard(worker)
                if not todo:
                    for worker in free:
                        self._release(worker)
                    free.clear()
                if not (busy or starting):
                    continue
                deadline = min([d for *_, d in busy.values()] + list(starting.values()))
                try:
                    worker, message = inbox.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    now = time.monotonic()
                    for worker in [w for w, (*_, d) in busy.items() if d <= now]:
                        del busy[worker]  # its verdict stays False
                        self._discard(worker, kill=True)
                    for worker in [w for w, d in starting.items() if d <= now]:
                        del starting[worker]
                        self._discard(worker, kill=True, failed_start=True)
                    continue
                if worker in starting:
                    del starting[worker]
                    if message == ["ready"]:
                        self._started()
                        free.append(worker)
                    else:
                        self._discard(worker, kill=True, failed_start=True)
                elif worker in busy:
                    job, index, _ = busy.pop(worker)
                    if message is None:  # it died on this pair: the pair counts as no match
                        self._discard(worker)
                    elif message[0] == job:
                        results[index] = message[1] is True
                        free.append(worker)
                    else:
                        busy[worker] = (job, index, _)  # a stale line; keep waiting
        finally:
            for worker in [*busy, *starting]:
                self._discard(worker, kill=True)
            for worker in free:
                self._release(worker)
        return results

    def _after_fork(self) -> None:
        """In a forked child, forgets the parent's workers (they are not its own to use)."""
        if self._pid != os.getpid():
            with self._cond:
                self._pid, self._idle[:], self._live = os.getpid(), [], 0

    def _take(self, inbox: queue.SimpleQueue, block: bool) -> tuple[_Worker | None, bool]:
        """An idle worker, or a new one if fewer than ``max_workers`` are live; with ``block``,
        waits for one. Returns ``(worker, is_new)``; ``(None, False)`` when none is to be had."""
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the verifier pool is closed")
                if self._start_failures >= _MAX_START_FAILURES:
                    raise WorkerStartError(
                        f"verifier worker processes cannot start ({sys.executable} -c ... "
                        f"{_symbolic.__file__} {self.verifier}): see the errors they printed above")
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive():
                        worker.inbox = inbox
                        return worker, False
                    self._live -= 1
                if self._live < self.max_workers:
                    self._live += 1
                    break
                if not block:
                    return None, False
                self._cond.wait(0.1)
        try:
            return _Worker(self.verifier, inbox), True
        except OSError as err:
            with self._cond:
                self._live -= 1
                self._start_failures = _MAX_START_FAILURES
            raise WorkerStartError(f"cannot start a verifier worker process: {err}") from err

    def _started(self) -> None:
        with self._cond:
            self._start_failures = 0

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            if not self._closed:
                self._idle.append(worker)
                self._cond.notify()
                return
            self._live -= 1
        worker.stop()

    def _discard(self, worker: _Worker, *, kill: bool = False, failed_start: bool = False) -> None:
        with self._cond:
            self._live -= 1
            self._start_failures += failed_start
            self._cond.notify()
        worker.stop(kill=kill)


_DEFAULT_POOLS: dict[str, VerifierPool] = {}
_DEFAULT_LOCK = threading.Lock()


def default_pool(verifier: str = "builtin") -> VerifierPool:
    """The process-wide pool of a verifier, created on first use and closed at exit."""
    with _DEFAULT_LOCK:
        pool = _DEFAULT_POOLS.get(verifier)
        if pool is None or pool.closed:
            pool = _DEFAULT_POOLS[verifier] = VerifierPool(verifier=verifier)
        return pool


@atexit.register
def _close_default_pools() -> None:
    for pool in list(_DEFAULT_POOLS.values()):
        pool.close()
