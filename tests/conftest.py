from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# an example run with its recipe's make_loss wrapped: the loss's `key` entry is NaN at the
# listed calls of the loss and at every call from `first` on
FAULTY_LOSS = """
import importlib, runpy, sys
example, recipe, key, calls, first, *args = sys.argv[1:]
recipe = importlib.import_module(f"torchrl_r2vpo.recipes.{recipe}")
make_loss, count = recipe.make_loss, [0]

def make_faulty_loss(*a, **kw):
    loss, scheduler = make_loss(*a, **kw)
    forward = loss.forward

    def faulty(batch):
        count[0] += 1
        out = forward(batch)
        if count[0] in calls or count[0] >= first:
            out.set(key, out.get(key) * float("nan"))
        return out

    loss.forward = faulty
    return loss, scheduler

calls, first = [int(c) for c in calls.split(",")], int(first)
recipe.make_loss = make_faulty_loss
sys.argv = [example, *args]
runpy.run_path(example, run_name="__main__")
"""


@pytest.fixture
def run_with_faulty_loss():
    """``run(example, recipe, key, calls, first, args)``: runs ``example`` (a path) with
    ``args``, the loss of ``torchrl_r2vpo.recipes.<recipe>.make_loss`` returning NaN for
    ``key`` at its ``calls`` and from call ``first`` on."""

    def run(example: Path, recipe: str, key: str, calls: list[int], first: int,
            args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", FAULTY_LOSS, str(example), recipe, key,
                               ",".join(map(str, calls)), str(first), *args],
                              capture_output=True, text=True, timeout=240)

    return run
