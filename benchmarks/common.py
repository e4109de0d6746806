"""What the benchmark scripts share: running an example resumably and reading its curve."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np


def read_curve(run_dir: Path) -> list[dict[str, float]]:
    """The rows of ``run_dir/curve.csv`` as floats (empty cells are NaN); [] if absent."""
    path = run_dir / "curve.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return [{k: float(v) if v != "" else np.nan for k, v in row.items()}
                for row in csv.DictReader(f)]


def run_example(example: Path, run_dir: Path, budget_key: str, budget: int, args: list[str]) -> None:
    """Runs (or continues, ``--resume``) an example unless its curve already reaches ``budget``.

    ``budget_key`` is the curve column and the example's flag (``frames``, ``rollouts``).
    """
    curve = read_curve(run_dir)
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
