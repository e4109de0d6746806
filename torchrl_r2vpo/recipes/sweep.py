"""Sweeps over an example's settings and seeds: each run a resumable subprocess with its own
``--out`` directory, and its learning curve read back as numbers.

Examples:
    >>> import numpy as np
    >>> first_reach(np.array([1e5, 2e5, 3e5]), np.array([100.0, 450.0, 700.0]), level=400)
    200000.0
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from torchrl_r2vpo.recipes.run_state import read_curve

__all__ = ["first_reach", "points", "run_curve", "run_example"]


def run_curve(run_dir: Path) -> list[dict[str, float]]:
    """The rows of ``run_dir/curve.csv`` as floats (empty cells are NaN); ``[]`` if absent."""
    return [{k: np.nan if v == "" else v for k, v in row.items()}
            for row in read_curve(run_dir / "curve.csv")]


def run_example(example: Path, run_dir: Path, budget_key: str, budget: int, args: list[str]) -> None:
    """Runs (or continues, ``--resume``) an example script unless its curve already reaches
    ``budget``; its output is appended to ``run_dir/stdout.log``.

    ``budget_key`` is the curve column and the example's flag (``frames``, ``rollouts``).

    Raises:
        subprocess.CalledProcessError: the run failed.
    """
    curve = run_curve(run_dir)
    if curve and curve[-1][budget_key] >= budget:
        return
    cmd = [sys.executable, str(example), f"--{budget_key}", str(budget), "--out", str(run_dir),
           "--resume", *args]
    print("$", " ".join(cmd[1:]), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.log", "a") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)


def points(curve: list[dict[str, float]], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) pairs of a curve where y was measured."""
    pairs = [(r[x], r[y]) for r in curve if not np.isnan(r.get(y, np.nan))]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def first_reach(x: np.ndarray, y: np.ndarray, level: float) -> float:
    """The first x at which y >= level; NaN if never."""
    above = np.nonzero(y >= level)[0]
    return float(x[above[0]]) if len(above) else np.nan
