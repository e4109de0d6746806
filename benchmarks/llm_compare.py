"""R2VPO (with stale-data reuse) against the GRPO family on generated math, equal rollout budget.

    python benchmarks/llm_compare.py                         # every loss x 3 seeds
    python benchmarks/llm_compare.py --study stale           # stale data: reuse K, policy lag k
    python benchmarks/llm_compare.py --rollouts 4096 --seeds 0
    python benchmarks/llm_compare.py --methods r2vpo grpo    # a subset
    python benchmarks/llm_compare.py --report-only           # rebuild the report from the files

Every (method, seed) run is ``examples/llm_math.py`` with its own ``--out`` directory under
``--out``; an interrupted run continues with ``--resume`` and a finished one is skipped. The
report (``<out>/summary.md``, ``<out>/curves.png``) is built from the runs present: held-out
accuracy (sampled at temperature 1) before and after, greedy accuracy and pass@8 after, mean ±
std, the rollouts each method needs to reach GRPO's final accuracy (on the seed-mean curves),
and the gate: on-policy GRPO gains 10 points of sampled accuracy within 10 minutes of training
in every seed. Extra arguments go to every run (``--task arithmetic`` for the older task).

``--study stale`` runs the stale-data methods instead: R2VPO (decoupled), decoupled GRPO
(AReaL) and M2PO with each batch reused K times, and under a policy lag of k updates, beside
on-policy GRPO and R2VPO; its report adds lambda over time and the ratio distributions by
staleness in each run's ``curve.png``.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
import re
from pathlib import Path

import numpy as np

from torchrl_r2vpo.recipes.run_state import read_curve
from torchrl_r2vpo.recipes.sweep import first_reach, points, run_curve, run_example

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
# the stale-data study: reuse K (each batch trained on K + 1 times) and lag k (each batch
# sampled by the policy of k updates ago, as an asynchronous pipeline would)
UNWEIGHTED = ["--no-weighted-variance"]
STALE_METHODS = {
    "grpo": ["--loss", "grpo", "--reuse", "0"],
    "r2vpo-onpolicy": ["--loss", "r2vpo", "--reuse", "0"],
    **{f"{name}-reuse{k}": ["--loss", name, "--reuse", str(k)]
       for name in ("r2vpo", "grpo-decoupled") for k in (1, 2, 4)},
    "m2po-reuse2": ["--loss", "m2po", "--reuse", "2"],
    "grpo-reuse2": ["--loss", "grpo", "--reuse", "2"],  # the clip on pi_theta / pi_behaviour
    # R2VPO's choices, each against r2vpo-reuse2: the literal ratio, the penalty unweighted
    # (Var(r) over tokens, each counted once) at reuse 1, 2, 4 and lag 2, 8; and, unweighted,
    # the dual after every minibatch, no truncation of the behaviour weight, a fixed lambda,
    # and the penalty centred on 1 instead of the batch mean at reuse 1 and 2
    "r2vpo-behaviour-reuse2": ["--loss", "r2vpo", "--reuse", "2", "--ratio", "behaviour"],
    **{f"r2vpo-reuse{k}-unweighted": ["--loss", "r2vpo", "--reuse", str(k), *UNWEIGHTED]
       for k in (1, 2, 4)},
    **{f"r2vpo-lag{k}-unweighted": ["--loss", "r2vpo", "--reuse", "0", "--lag", str(k), *UNWEIGHTED]
       for k in (2, 8)},
    **{f"r2vpo-reuse2-{name}": ["--loss", "r2vpo", "--reuse", "2", *flags, *UNWEIGHTED]
       for name, flags in (("dual-minibatch", ["--dual-every", "minibatch"]),
                           ("untruncated", ["--max-behaviour-weight", "0"]),
                           ("fixed1", ["--dual", "fixed"]))},
    **{f"r2vpo-reuse{k}-center1": ["--loss", "r2vpo", "--reuse", str(k), "--variance-center", "one",
                                   *UNWEIGHTED]
       for k in (1, 2)},
    **{f"{name}-lag{k}": ["--loss", name, "--reuse", "0", "--lag", str(k)]
       for name in ("r2vpo", "grpo-decoupled", "m2po") for k in (2, 8)},
}
# the rows of the stale-data study's figure
STALE_ROWS = {
    "reuse K": ["grpo", "r2vpo-onpolicy", "grpo-reuse2", "m2po-reuse2",
                *(f"{name}-reuse{k}" for name in ("r2vpo", "grpo-decoupled") for k in (1, 2, 4))],
    "policy lag k": ["grpo", "r2vpo-onpolicy", *(f"{name}-lag{k}" for name in
                                                 ("r2vpo", "grpo-decoupled", "m2po") for k in (2, 8))],
    "R2VPO's penalty weighted (default) or not": [
        *(f"r2vpo-{stale}{kind}" for stale in ("reuse1", "reuse2", "reuse4", "lag2", "lag8")
          for kind in ("", "-unweighted"))],
    "R2VPO's other choices (unweighted)": [
        "r2vpo-reuse2-unweighted", "r2vpo-behaviour-reuse2", "r2vpo-reuse2-dual-minibatch",
        "r2vpo-reuse2-untruncated", "r2vpo-reuse2-fixed1", "r2vpo-reuse2-center1",
        "r2vpo-reuse1-unweighted", "r2vpo-reuse1-center1"],
}
STUDIES = {"losses": (METHODS, "llm-losses", None),
           "stale": (STALE_METHODS, "llm-stale-data", STALE_ROWS)}
REWARD_WINDOW = 1024  # rollouts over which the final training reward is averaged


GATE_SECONDS = 600  # the reference must gain GATE_POINTS within this much training time
GATE_POINTS = 0.10
_BEFORE = re.compile(r"accuracy before training: ([\d.]+) \(\d+ problems, sampled; greedy ([\d.]+), "
                     r"pass@8 ([\d.]+)\)")
_AFTER = re.compile(r"accuracy after training: ([\d.]+) \(before: [\d.]+; greedy ([\d.]+), "
                    r"pass@8 ([\d.]+)\)")


def printed_accuracy(run_dir: Path) -> dict[str, float]:
    """The sampled and greedy accuracy and pass@8 a run printed before and after training
    (``before_sampled``, ..., ``after_pass8``), from its ``stdout.log``; what it lacks is NaN."""
    text = (run_dir / "stdout.log").read_text() if (run_dir / "stdout.log").exists() else ""
    found = {}
    for when, pattern, matches in (("before", _BEFORE, _BEFORE.findall(text)[:1]),
                                   ("after", _AFTER, _AFTER.findall(text)[-1:])):
        values = [float(v) for v in matches[0]] if matches else [np.nan] * 3
        found.update(zip((f"{when}_sampled", f"{when}_greedy", f"{when}_pass8"), values))
    return found


def _fmt(values, spec: str = ".3f") -> str:
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return "-"
    return f"{np.nanmean(values):{spec}} ± {np.nanstd(values):{spec}}"


def summarize(out: Path, methods: list[str], rollouts: int, reference: str = "grpo",
              rows: dict[str, list[str]] | None = None) -> str:
    """Final accuracy per method, rollouts to the reference's final accuracy, the size of the
    updates, and the gate (the reference's gain within ``GATE_SECONDS``), from the runs
    present; ``curves.png`` has one row of panels per entry of ``rows`` (title: methods),
    by default one for all ``methods``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, rewards, times, printed = {}, {}, {}, {}
    for method in methods:
        runs = [(d, run_curve(d)) for d in sorted((out / method).glob("seed*"))]
        runs = [(d, r) for d, r in runs if r and r[-1]["rollouts"] >= rollouts]
        if runs:
            accuracy = [points(r, "rollouts", "test_accuracy") for _, r in runs]
            length = min(len(a[0]) for a in accuracy)
            curves[method] = (accuracy[0][0][:length], np.stack([a[1][:length] for a in accuracy]))
            rewards[method] = np.array([np.mean([row["train_reward"] for row in r
                                                 if row["rollouts"] > rollouts - REWARD_WINDOW])
                                        for _, r in runs])
            times[method] = np.array([r[-1]["time_s"] for _, r in runs])
            printed[method] = [(d, r, printed_accuracy(d)) for d, r in runs]
    target = curves[reference][1].mean(0)[-1] if reference in curves else np.nan
    lines = [f"Held-out accuracy (sampled at temperature 1, fixed seed) before and after {rollouts} "
             f"rollouts, greedy accuracy and pass@8 after, training reward over the last "
             f"{REWARD_WINDOW} rollouts, training seconds; mean ± std over seeds. Rollouts to reach "
             f"{reference}'s final mean accuracy ({target:.3f}) on the seed-mean curve.", "",
             f"| method | before | final accuracy | final greedy | final pass@8 | training reward "
             f"| seconds | seeds | rollouts to {reference}'s final |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        if method not in curves:
            lines.append(f"| {method} | - | - | - | - | - | - | 0 | - |")
            continue
        x, ys = curves[method]
        needed = first_reach(x, ys.mean(0), target) if not np.isnan(target) else np.nan
        reach = "not reached" if np.isnan(needed) else f"{needed:.0f} ({needed / rollouts:.0%})"
        acc = [p for _, _, p in printed[method]]
        lines.append(f"| {method} | {_fmt([a['before_sampled'] for a in acc])} | {_fmt(ys[:, -1])} "
                     f"| {_fmt([a['after_greedy'] for a in acc])} | {_fmt([a['after_pass8'] for a in acc])} "
                     f"| {_fmt(rewards[method])} | {_fmt(times[method], '.0f')} | {len(ys)} | {reach} |")
    rows = {title: [m for m in row if m in curves] for title, row in (rows or {"": methods}).items()}
    rows = {title: row for title, row in rows.items() if row} or {"": []}
    fig, axes = plt.subplots(len(rows), 3, figsize=(18, 4.5 * len(rows)), squeeze=False)
    for (title, row), (by_rollouts, by_time, by_lambda) in zip(rows.items(), axes):
        for method in row:
            x, ys = curves[method]
            width = 2 if method.startswith("r2vpo") else 1
            line, = by_rollouts.plot(x, ys.mean(0), label=f"{method} (n={len(ys)})", lw=width)
            for _, run, _ in printed[method]:
                t, y = points(run, "time_s", "test_accuracy")
                by_time.plot(t, y, color=line.get_color(), lw=width, alpha=0.7)
                t, lam = points(run, "rollouts", "lagrange_multiplier")
                if len(lam):
                    by_lambda.plot(t, lam, color=line.get_color(), lw=1, alpha=0.7)
        by_rollouts.set(xlabel="rollouts (sampled completions)", ylabel="held-out accuracy (sampled)",
                        title=title)
        by_time.set(xlabel="training seconds (each run on one core)",
                    ylabel="held-out accuracy (sampled)")
        by_lambda.set(xlabel="rollouts", ylabel="R2VPO's lambda (each seed)", yscale="symlog",
                      ylim=(0, None))
        for ax in (by_rollouts, by_time, by_lambda):
            ax.grid(alpha=0.3)
        if row:
            by_rollouts.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    if reference in printed:
        lines += ["", f"Gate: {reference}'s held-out accuracy (sampled) at its last evaluation within "
                  f"{GATE_SECONDS} s of training against before, per seed (needs +{GATE_POINTS:.2f}, "
                  "greedy not lower).", "",
                  "| run | before | within the time | gain | greedy before -> after | passes |",
                  "|---|---|---|---|---|---|"]
        for run_dir, run, acc in printed[reference]:
            t, y = points(run, "time_s", "test_accuracy")
            within = y[t <= GATE_SECONDS][-1] if (t <= GATE_SECONDS).any() else np.nan
            gain = within - acc["before_sampled"]
            passes = gain >= GATE_POINTS and acc["after_greedy"] >= acc["before_greedy"]
            lines.append(f"| {run_dir.name} | {acc['before_sampled']:.3f} | {within:.3f} | {gain:+.3f} "
                         f"| {acc['before_greedy']:.3f} -> {acc['after_greedy']:.3f} "
                         f"| {'yes' if passes else 'no'} |")
    lines += ["", "Update size: the gradient norm before clipping (per iteration, median over "
              "seeds of each run's median and max; iterations over 50 summed over seeds) and "
              "R2VPO's lambda (median over iterations and seeds).", "",
              "| method | grad norm median | grad norm max | iterations > 50 | lambda median |",
              "|---|---|---|---|---|"]
    for method in (m for m in methods if m in curves):
        norms = [g for _, run, _ in printed[method]
                 if len(g := points(run, "rollouts", "grad_norm")[1])]
        lams = np.concatenate([points(run, "rollouts", "lagrange_multiplier")[1]
                               for _, run, _ in printed[method]])
        lam = f"{np.median(lams):.2f}" if len(lams) else "-"
        size = (f"{np.median([np.median(g) for g in norms]):.1f} "
                f"| {np.median([g.max() for g in norms]):.3g} "
                f"| {sum(int((g > 50).sum()) for g in norms)}") if norms else "- | - | -"
        lines.append(f"| {method} | {size} | {lam} |")
    for method in methods:  # the update's statistics by data age, in the stale-data study
        if method.startswith("r2vpo-") and method != "r2vpo-onpolicy" and method in printed:
            lines += ["", *staleness_summary(method, printed[method][0][0])]
    return "\n".join(lines)


def staleness_summary(method: str, run_dir: Path) -> list[str]:
    """A table of one run's ``staleness.csv``: per data age, the median over iterations of the
    update's ratio statistics and of the behaviour weights (see torchrl_r2vpo.data.staleness;
    medians, because a rare exploding ratio dominates a mean of ``ratio_var``)."""
    path = run_dir / "staleness.csv"
    if not path.exists():
        return []
    rows = read_curve(path)
    fields = ("tokens", "ratio_var", "ESS", "clip_fraction", "weight_mean", "weight_max", "weight_ESS")
    lines = [f"{method}, {run_dir.name}: by data age (updates since sampling), medians over "
             "iterations of the step r = pi_new / pi_prox and the weight w = pi_prox / pi_behaviour.",
             "", "| age | iterations | " + " | ".join(fields) + " |", "|---" * (len(fields) + 2) + "|"]
    for age in sorted({int(r["age"]) for r in rows}):
        at = [r for r in rows if int(r["age"]) == age]
        values = [np.median([r[f] for r in at]) for f in fields]
        lines.append(f"| {age} | {len(at)} | {values[0]:.0f} | "
                     + " | ".join(f"{v:.4f}" for v in values[1:]) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other arguments go to every run of examples/llm_math.py (see its --help).")
    parser.add_argument("--study", choices=list(STUDIES), default="losses",
                        help="losses: every loss, on policy and with reuse 2; stale: reuse K and "
                             "policy lag k for the stale-data methods")
    parser.add_argument("--methods", nargs="+", help="a subset of the study's methods "
                        f"(losses: {', '.join(METHODS)}; stale: {', '.join(STALE_METHODS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rollouts", type=int, default=32768)
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/llm-losses or "
                        "llm-stale-data")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time (each a process; useful on a GPU or a many-core machine)")
    parser.add_argument("--report-only", action="store_true")
    args, extra = parser.parse_known_args()  # extra arguments go to the example
    methods, folder, rows = STUDIES[args.study]
    args.methods = args.methods or list(methods)
    unknown = sorted(set(args.methods) - set(methods))
    if unknown:
        parser.error(f"unknown --methods for --study {args.study}: {', '.join(unknown)}")
    args.out = args.out or ROOT / "benchmarks" / "results" / folder
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(args.out / method / f"seed{seed}", [*methods[method], "--seed", str(seed), *extra])
            for seed in args.seeds for method in args.methods]  # seed-major: balanced when partial
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            for done in [pool.submit(run_example, EXAMPLE, run_dir, "rollouts", args.rollouts, flags)
                         for run_dir, flags in runs]:
                done.result()
    report = summarize(args.out, args.methods, args.rollouts, rows=rows)
    (args.out / "summary.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
