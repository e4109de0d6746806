from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parents[1]


def load():
    spec = importlib.util.spec_from_file_location("verifier_compare", ROOT / "benchmarks" / "verifier_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_labelled_pairs_and_summary():
    bench = load()
    data = bench.pairs()
    assert len(data) >= 300 and len(set(data)) == len(data)
    assert {p.style for p in data} == {"gsm8k", "math"} and {p.label for p in data} == {True, False}
    right = [p.label for p in data]
    report = {"machine": "test", "date": "today", "load": "", "repeats": 1, "timeout": 1.0,
              "verifiers": {"perfect": {"verdicts": right, "pairs_per_s": 10.0, "changed": 0},
                            "always": {"verdicts": [True] * len(data), "pairs_per_s": 20.0, "changed": 1}}}
    summary = bench.summarize(data, report, "python benchmarks/verifier_compare.py")
    assert "| perfect | 1.000 |" in summary
    share = sum(right) / len(data)
    assert f"| always | {share:.3f} |" in summary
