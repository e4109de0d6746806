"""R2VPO (with stale-data reuse) against the GRPO family on generated math, equal rollout budget.

    python benchmarks/llm_compare.py                         # every method x 3 seeds
    python benchmarks/llm_compare.py --rollouts 4096 --seeds 0
    python benchmarks/llm_compare.py --methods r2vpo grpo    # a subset
    python benchmarks/llm_compare.py --report-only           # rebuild the report from the files

Every (method, seed) run is ``examples/llm_math.py`` with its own ``--out`` directory under
``--out``; an interrupted run continues with ``--resume`` and a finished one is skipped. The
report (``<out>/summary.md``, ``<out>/curves.png``) is built from the runs present: final
held-out accuracy (greedy) mean ± std, and the rollouts each method needs to reach GRPO's
final accuracy (on the seed-mean curves). Extra arguments go to every run.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import first_reach, points, read_curve, run_example

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llm_math.py"
# name -> the example's flags; everything else (model, data, budget, optimiser) is shared
METHODS = {
    "r2vpo": ["--loss", "r2vpo", "--reuse", "2"],
    "r2vpo-onpolicy": ["--loss", "r2vpo", "--reuse", "0"],
    "grpo": ["--loss", "grpo", "--reuse", "0"],
    "grpo-reuse": ["--loss", "grpo", "--reuse", "2"],
    "grpo-ch": ["--loss", "grpo-ch", "--reuse", "0"],
    "gppo": ["--loss", "gppo", "--reuse", "0"],
    "topr": ["--loss", "topr", "--reuse", "0"],
    "spo": ["--loss", "spo", "--reuse", "0"],
    "cispo": ["--loss", "cispo", "--reuse", "0"],
}
REWARD_WINDOW = 1024  # rollouts over which the final training reward is averaged


def summarize(out: Path, methods: list[str], rollouts: int, reference: str = "grpo") -> str:
    """Final accuracy per method and rollouts-to-reference's-final, from the runs present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, rewards = {}, {}
    for method in methods:
        runs = [read_curve(d) for d in sorted((out / method).glob("seed*"))]
        runs = [r for r in runs if r and r[-1]["rollouts"] >= rollouts]
        if runs:
            accuracy = [points(r, "rollouts", "test_accuracy") for r in runs]
            length = min(len(a[0]) for a in accuracy)
            curves[method] = (accuracy[0][0][:length], np.stack([a[1][:length] for a in accuracy]))
            rewards[method] = np.array([np.mean([row["train_reward"] for row in r
                                                 if row["rollouts"] > rollouts - REWARD_WINDOW])
                                        for r in runs])
    target = curves[reference][1].mean(0)[-1] if reference in curves else np.nan
    lines = [f"Held-out accuracy (greedy) after {rollouts} rollouts and training reward (sampled) "
             f"over its last {REWARD_WINDOW} rollouts, mean ± std over seeds; rollouts to reach "
             f"{reference}'s final mean accuracy ({target:.3f}) on the seed-mean curve.", "",
             f"| method | final accuracy | training reward | seeds | rollouts to {reference}'s final |",
             "|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        if method not in curves:
            lines.append(f"| {method} | - | - | 0 | - |")
            continue
        x, ys = curves[method]
        mean = ys.mean(0)
        needed = first_reach(x, mean, target) if not np.isnan(target) else np.nan
        reach = "not reached" if np.isnan(needed) else f"{needed:.0f} ({needed / rollouts:.0%})"
        lines.append(f"| {method} | {ys[:, -1].mean():.3f} ± {ys[:, -1].std():.3f} "
                     f"| {rewards[method].mean():.3f} ± {rewards[method].std():.3f} | {len(ys)} | {reach} |")
        ax.plot(x, mean, label=f"{method} (n={len(ys)})", lw=2 if method.startswith("r2vpo") else 1)
    ax.set(xlabel="rollouts (sampled completions)", ylabel="held-out accuracy (greedy)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other arguments go to every run of examples/llm_math.py (see its --help).")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rollouts", type=int, default=6144)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llm")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time (each a process; useful on a GPU or a many-core machine)")
    parser.add_argument("--report-only", action="store_true")
    args, extra = parser.parse_known_args()  # extra arguments go to the example
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(args.out / method / f"seed{seed}", [*METHODS[method], "--seed", str(seed), *extra])
            for seed in args.seeds for method in args.methods]  # seed-major: balanced when partial
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            for done in [pool.submit(run_example, EXAMPLE, run_dir, "rollouts", args.rollouts, flags)
                         for run_dir, flags in runs]:
                done.result()
    report = summarize(args.out, args.methods, args.rollouts)
    (args.out / "summary.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
