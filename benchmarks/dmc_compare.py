"""R2VPO vs clipped PPO on DeepMind Control, through ``examples/dmc_walker.py``.

    python benchmarks/dmc_compare.py                       # 3 tasks x 2 losses x 3 seeds, 1M frames
    python benchmarks/dmc_compare.py --frames 200000       # a shorter matrix
    python benchmarks/dmc_compare.py --reuse 0 2           # also R2VPO with --reuse 2
    python benchmarks/dmc_compare.py --sweep --frames 100000 --seeds 0
    python benchmarks/dmc_compare.py --sweep --lambdas 2.5 --targets 0.02   # only these settings
    python benchmarks/dmc_compare.py --throughput          # collection and loop vs the raw simulator
    python benchmarks/dmc_compare.py --workers 1 2         # collection frames/s per worker count, 5 repeats
    python benchmarks/dmc_compare.py --starts 64           # final policies from 64 fresh starts each
    python benchmarks/dmc_compare.py --report-only         # rebuild the tables from the files

Every (task, loss, seed) run is the example script with its own ``--out``
directory under ``--out``; a run that was interrupted continues with
``--resume``, and a finished one is skipped, so the matrix can be completed over
several sittings. The report is built from the result files present and written
to ``<out>/summary.md`` and ``<out>/curves.png`` (``--sweep``: ``sweep.md`` and
``sweep.png``, for every task swept so far); ``--throughput`` and ``--workers``
measure anew each time and write ``throughput.{md,json}`` and ``workers.{md,json}``.
``--starts N`` runs the final checkpoint of every finished run (matrix and sweep)
from the same N starting states per task, none of which training or its evaluations
saw, keeps the returns in each run's ``final_starts.csv`` and writes ``starts.md``
and ``starts.png``. Both losses share the example's networks, data path and
hyperparameters; only the loss differs.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from torchrl_r2vpo.envs import make_env, parse_env_name
from torchrl_r2vpo.recipes.config import ControlConfig
from torchrl_r2vpo.recipes.sweep import first_reach, points, run_curve, run_example

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dmc_walker.py"
TASKS = ["walker-walk", "cheetah-run", "cartpole-swingup_sparse"]
THROUGHPUT_TASKS = ["walker-walk", "HalfCheetah-v5"]  # DeepMind Control and gymnasium MuJoCo
FIXED_LAMBDAS = [0.5, 1.0, 2.5, 5.0, 10.0]
ADAPTIVE_TARGETS = [0.005, 0.01, 0.02, 0.05]
# the starting states of --starts: environment i of a task is seeded STARTS_SEED + i, far from
# the training (seed, seed + 1, ...) and evaluation (torchrl_r2vpo.recipes.control.eval_seed) environments' seeds
STARTS_SEED = 1_000_000


def run(run_dir: Path, frames: int, args: list[str]) -> None:
    run_example(EXAMPLE, run_dir, "frames", frames, ["--no-video", *args])


def eval_points(curve: list[dict[str, float]]) -> tuple[np.ndarray, np.ndarray]:
    return points(curve, "frames", "eval_return")


def trailing_mean(y: np.ndarray, window: int = 3) -> np.ndarray:
    return np.array([y[max(0, i + 1 - window):i + 1].mean() for i in range(len(y))])


def stack(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation curves of several seeds, cut to the shortest: ``(frames, returns per run)``."""
    length = min(len(c[0]) for c in curves)
    return curves[0][0][:length], np.stack([c[1][:length] for c in curves])


def summarize(out: Path, tasks: list[str], losses: list[str], frames: int) -> str:
    """Final returns, frames-to-PPO's-final and the curves, from the runs present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reaching = [loss for loss in losses if loss != "ppo"] if "ppo" in losses else []
    lines = [f"Final evaluation return (deterministic policy) at {frames} frames, "
             "mean ± std over the seeds that reached it; the frames each needs to reach PPO's "
             "final return (on the seed-mean curves, trailing means of 3 evaluations).", "",
             "| task | " + " | ".join(losses) + "".join(f" | {loss}: frames to PPO's final"
                                                       for loss in reaching) + " |",
             "|---|" + "---|" * (len(losses) + len(reaching))]
    # one deterministic evaluation (4 episodes) is noisy: also the last 3 evaluations, and
    # the stochastic policy's training return over the last 10% of the frames
    smooth = [f"Smoother measures of the end of training at {frames} frames, mean ± std over "
              "seeds: the mean of the last 3 evaluations, and the training return (stochastic "
              "policy, episodes that ended in the last 10% of the frames).", "",
              "| task | " + " | ".join(f"{loss} last 3 evals | {loss} training return"
                                       for loss in losses) + " |",
              "|---|" + "---|---|" * len(losses)]
    # how far the updates move the policy, and how narrow it ends
    steps = [f"Update size at {frames} frames, mean ± std over seeds: the approximate KL from "
             "the behaviour policy to the policy being updated, averaged over each batch's "
             "optimiser steps (median and 95th percentile over the run's batches), and the "
             "policy entropy at the end.", "",
             "| task | " + " | ".join(f"{loss} median KL | {loss} 95th pct KL | {loss} entropy"
                                      for loss in losses) + " |",
             "|---|" + "---|---|---|" * len(losses)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cells, smooth_cells, step_cells, mean_curves = [], [], [], {}
        for loss in losses:
            runs = [run_curve(d) for d in sorted((out / task / loss).glob("seed*"))]
            runs = [r for r in runs if r and r[-1]["frames"] >= frames]
            curves = [eval_points(r) for r in runs]
            curves = [c for c in curves if len(c[0])]
            if not curves:
                cells.append("-")
                smooth_cells += ["-", "-"]
                step_cells += ["-", "-", "-"]
                continue
            last3 = np.array([c[1][-3:].mean() for c in curves])
            train = np.array([np.nanmean([r["train_return"] for r in run
                                          if r["frames"] > 0.9 * frames]) for run in runs])
            smooth_cells += [f"{last3.mean():.1f} ± {last3.std():.1f}",
                             f"{np.nanmean(train):.1f} ± {np.nanstd(train):.1f}"]
            kl = [[r["kl_approx"] for r in run] for run in runs]
            median_kl = np.array([np.nanmedian(k) for k in kl])
            high_kl = np.array([np.nanpercentile(k, 95) for k in kl])
            entropy = np.array([run[-1]["entropy"] for run in runs])
            step_cells += [f"{v.mean():.4f} ± {v.std():.4f}" for v in (median_kl, high_kl)]
            step_cells.append(f"{entropy.mean():.2f} ± {entropy.std():.2f}")
            x, ys = stack(curves)
            mean_curves[loss] = (x, ys.mean(0))
            cells.append(f"{ys[:, -1].mean():.1f} ± {ys[:, -1].std():.1f} (n={len(curves)})")
            ax.plot(x, ys.mean(0), label=f"{loss} (n={len(curves)})")
            ax.fill_between(x, ys.min(0), ys.max(0), alpha=0.2)
        reach = []
        for loss in reaching:
            if loss not in mean_curves or "ppo" not in mean_curves:
                reach.append("-")
                continue
            # on trailing means of 3 evaluations, so that one lucky evaluation does not count
            x, y = mean_curves[loss]
            needed = first_reach(x, trailing_mean(y), trailing_mean(mean_curves["ppo"][1])[-1])
            reach.append("not reached" if np.isnan(needed) else f"{needed:.0f} ({needed / frames:.0%})")
        lines.append(f"| {task} | " + " | ".join(cells + reach) + " |")
        smooth.append(f"| {task} | " + " | ".join(smooth_cells) + " |")
        steps.append(f"| {task} | " + " | ".join(step_cells) + " |")
        ax.set(title=task, xlabel="frames", ylabel="eval return")
        ax.grid(alpha=0.3)
        if mean_curves:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    return "\n".join([*lines, "", *smooth, "", *steps])


def summarize_sweep(out: Path, task: str, frames: int) -> str:
    lines = [f"Sensitivity on {task} at {frames} frames (final eval return, "
             "mean over the seeds present; mean ratio variance and median approximate KL "
             "per batch over training; the last 3 evaluations).", "",
             "| dual | value | final eval return | last 3 evals | mean ratio_var | median KL "
             "| final lambda |",
             "|---|---|---|---|---|---|---|"]
    for kind in ("fixed lambda", "adaptive delta"):
        prefix = kind.split()[0] + "-"
        settings = [d.name.removeprefix(prefix) for d in (out / "sweep" / task).glob(prefix + "*")]
        for value in sorted(settings, key=float):
            finals, last3, variances, kls, lams = [], [], [], [], []
            for run_dir in sorted((out / "sweep" / task / (prefix + value)).glob("seed*")):
                curve = run_curve(run_dir)
                x, y = eval_points(curve)
                if len(x) and x[-1] >= frames:
                    finals.append(y[-1])
                    last3.append(y[-3:].mean())
                    variances.append(np.nanmean([r["ratio_var"] for r in curve]))
                    kls.append(np.nanmedian([r.get("kl_approx", np.nan) for r in curve]))
                    lams.append(curve[-1]["lagrange_multiplier"])
            if finals:
                lines.append(f"| {kind} | {value} | {np.mean(finals):.1f} (n={len(finals)}) | "
                             f"{np.mean(last3):.1f} | {np.mean(variances):.4f} | "
                             f"{np.mean(kls):.4f} | {np.mean(lams):.3g} |")
    return "\n".join(lines)


def plot_sweep(out: Path, tasks: list[str], frames: int) -> None:
    """``sweep.png``: per swept task, the seed-mean evaluation curve of each setting (band:
    min to max over seeds) beside the matrix columns run on the same ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        groups = [d for d in sorted((out / task).glob("*")) if d.is_dir()]
        groups += sorted(d for d in (out / "sweep" / task).glob("*") if d.is_dir())
        for group in groups:
            curves = [eval_points(c) for c in map(run_curve, sorted(group.glob("seed*")))
                      if c and c[-1]["frames"] >= frames]
            curves = [c for c in curves if len(c[0])]
            if curves:
                x, ys = stack(curves)
                ax.plot(x, ys.mean(0), label=f"{group.name} (n={len(curves)})")
                ax.fill_between(x, ys.min(0), ys.max(0), alpha=0.15)
        ax.set(title=task, xlabel="frames", ylabel="eval return")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)


# --- final policies from many starts -----------------------------------------------------

def final_starts(run_dir: Path, task: str, episodes: int) -> np.ndarray | None:
    """The run's final deterministic policy's returns from ``episodes`` fresh starts, one
    episode each, kept in ``final_starts.csv``; None without that file or a checkpoint."""
    path = run_dir / "final_starts.csv"
    if path.exists():
        with open(path) as f:
            rows = list(csv.DictReader(f))
        if len(rows) == episodes and int(rows[0]["env_seed"]) == STARTS_SEED:
            return np.array([float(r["return"]) for r in rows])
    if not (run_dir / "checkpoint.pt").exists():
        return None
    os.environ.setdefault("MUJOCO_GL", "disable")  # no rendering: before MuJoCo is imported
    from torchrl_r2vpo.envs import make_env
    from torchrl_r2vpo.recipes.control import episode_returns, load_actor

    probe = make_env(task)  # the specs of the actor
    cfg, actor = load_actor(run_dir / "checkpoint.pt", probe)
    probe.close()
    env = make_env(task, num_envs=episodes, seed=STARTS_SEED, frame_skip=cfg.frame_skip)
    start = time.perf_counter()
    returns = episode_returns(env, actor).numpy()
    env.close()
    print(f"{run_dir}: mean {returns.mean():.1f} from {episodes} starts "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env_seed", "return"])
        writer.writerows((STARTS_SEED + i, float(r)) for i, r in enumerate(returns))
    tmp.replace(path)
    return returns


def starts(out: Path, tasks: list[str], frames: int, episodes: int) -> str:
    """Final policies of the matrix and the sweep from ``episodes`` shared fresh starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"Final deterministic policies at {frames} frames, each from the same {episodes} "
             f"starting states per task (environments seeded {STARTS_SEED} + i, one episode "
             "each): the mean return over the starts, mean ± std over seeds; then over all "
             "seeds' episodes together, the median, the 10th percentile and the share of "
             "starts that end below half the best return of any run on the task.", "",
             "| task | run | seeds | mean return | median | 10th percentile | starts below half "
             "the best |", "|---|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        groups = [(d.name, d) for d in sorted((out / task).glob("*")) if d.is_dir()]
        groups += [(f"r2vpo {d.name}", d) for d in sorted((out / "sweep" / task).glob("*"))]
        results = {}
        for label, group in groups:
            for run_dir in sorted(group.glob("seed*")):
                curve = run_curve(run_dir)
                if curve and curve[-1]["frames"] >= frames:
                    returns = final_starts(run_dir, task, episodes)
                    if returns is not None:
                        results.setdefault(label, []).append(returns)
        best = max((r.max() for runs in results.values() for r in runs), default=np.nan)
        for index, (label, runs) in enumerate(results.items()):
            means, pooled = np.array([r.mean() for r in runs]), np.concatenate(runs)
            lines.append(f"| {task} | {label} | {len(runs)} | {means.mean():.1f} ± "
                         f"{means.std():.1f} | {np.median(pooled):.1f} | "
                         f"{np.percentile(pooled, 10):.1f} | {np.mean(pooled < best / 2):.0%} |")
            for seed, returns in enumerate(runs):
                ax.plot(np.linspace(0, 1, len(returns)), np.sort(returns), color=f"C{index}",
                        label=label if seed == 0 else None)
        ax.set(title=task, xlabel="share of starts", ylabel="return (sorted per run)")
        ax.grid(alpha=0.3)
        if results:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "starts.png", dpi=100)
    plt.close(fig)
    return "\n".join(lines)


# --- throughput -------------------------------------------------------------------------

def _raw_steps(task: str, steps: int, queue) -> None:
    os.environ.setdefault("MUJOCO_GL", "disable")  # no renderer needed
    rng = np.random.default_rng(0)
    domain, name = parse_env_name(task)
    if name is None:  # gymnasium
        import gymnasium

        env = gymnasium.make(task)
        env.reset(seed=0)
        low, high = env.action_space.low, env.action_space.high
        start = time.perf_counter()
        for _ in range(steps):
            _, _, terminated, truncated, _ = env.step(rng.uniform(low, high))
            if terminated or truncated:
                env.reset()
    else:
        from dm_control import suite

        env = suite.load(domain, name, task_kwargs={"random": 0})
        spec = env.action_spec()
        env.reset()
        start = time.perf_counter()
        for _ in range(steps):
            if env.step(rng.uniform(spec.minimum, spec.maximum, spec.shape)).last():
                env.reset()
    queue.put(steps / (time.perf_counter() - start))


def raw_rate(task: str, processes: int, steps: int = 20_000) -> float:
    """Random-action simulator steps/s (dm_control or gymnasium, no TorchRL) summed over
    ``processes`` processes."""
    queue = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_raw_steps, args=(task, steps, queue))
             for _ in range(processes)]
    for p in procs:
        p.start()
    rates = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def collection_rate(task: str, num_workers: int, batches: int = 6, compile: bool = False) -> float:
    """frames/s of the example's collector alone (no updates), first batch excluded; with
    ``compile``, the collectors' policy compiled (the example's ``--compile``)."""
    import torch

    os.environ.setdefault("MUJOCO_GL", "disable")  # no renderer needed

    from torchrl_r2vpo.recipes.control import make_agent, make_collector

    cfg = ControlConfig(env=task, num_workers=num_workers, compile=compile)
    env = make_env(task)
    actor, _, _ = make_agent(env, env.observation_spec["observation"].shape[-1],
                             env.action_spec.shape[-1])
    torch.set_num_threads(1)  # as the example's main process on 2 cores
    collector = make_collector(cfg, actor, batches * cfg.frames_per_batch, seed=0)
    it = iter(collector)
    next(it)  # start-up and warm-up batch
    start = time.perf_counter()
    frames = sum(data.numel() for data in it)
    rate = frames / (time.perf_counter() - start)
    collector.shutdown()
    # now, not at interpreter exit: there TorchRL 0.14's weight-sync scheme, kept alive by a
    # reference cycle (gymnasium environments), deadlocks in its __del__
    del collector, it
    gc.collect()
    return rate


def workers(out: Path, task: str, counts: list[int], repeats: int = 1) -> str:
    """Collection frames/s per worker count, beside the raw simulator's rate in as many
    processes: how well the machine itself scales bounds what more workers can give. The
    counts are measured in turn, ``repeats`` times, and compared within each repeat."""
    rates = {n: [] for n in counts}
    raw = {n: [] for n in counts}
    for _ in range(repeats):
        for n in counts:
            rates[n].append(collection_rate(task, n))
            raw[n].append(raw_rate(task, processes=n))
    (out / "workers.json").write_text(json.dumps(
        {"task": task, "frames_per_s": rates, "raw_dm_control_steps_per_s": raw,
         "machine": platform.processor() or platform.machine()}, indent=2))
    base = counts[0]

    def ratios(values: dict, n: int) -> str:  # median, then each repeat's ratio
        each = [v / b for v, b in zip(values[n], values[base])]
        return f"{statistics.median(each):.2f}x ({', '.join(f'{r:.2f}' for r in each)})"

    return "\n".join([
        f"Collection only on {task} (16 environments per worker, 4096 frames per batch, "
        "5 batches after a warm-up one), and random-action dm_control in as many processes; "
        f"medians over {repeats} repeat(s), each measuring every count in turn, and each "
        "repeat's ratio:", "",
        "| workers | frames/s | vs 1 worker | raw dm_control steps/s | raw vs 1 process |",
        "|---|---|---|---|---|",
        *[f"| {n} | {statistics.median(rates[n]):.0f} | {ratios(rates, n)} "
          f"| {statistics.median(raw[n]):.0f} | {ratios(raw, n)} |" for n in counts]])


def throughput(out: Path, tasks: list[str], frames: int) -> str:
    """Per task, in one run: the raw simulator in 2 processes (before and after, averaged),
    the example's collector alone, and its training loop (collection and updates), eager
    and, on the first task, compiled (``--compile``: the update step and the collectors'
    policy)."""
    results = []
    for i, task in enumerate(tasks):
        raw_before = raw_rate(task, processes=2)
        collection = collection_rate(task, ControlConfig.num_workers)
        loops, updates = {}, {}
        for name, flags in (("eager", []), ("compiled", ["--compile"]))[: 2 if i == 0 else 1]:
            run_dir = out / "throughput" / task / name
            shutil.rmtree(run_dir, ignore_errors=True)
            run(run_dir, frames, ["--env", task, "--eval-every", str(10 * frames), *flags])
            # the first batch includes start-up and, compiled, the compilation
            loops[name] = statistics.median(r["fps"] for r in run_curve(run_dir)[1:])
            updates[name] = statistics.median(r["update_s"] for r in run_curve(run_dir)[1:])
        raw = statistics.mean([raw_before, raw_rate(task, processes=2)])
        results.append({"task": task, "raw_2proc_steps_per_s": raw, "collection_fps": collection,
                         "loop_fps": loops, "update_s_per_batch": updates})
    (out / "throughput.json").write_text(json.dumps(
        {"runs": results, "machine": platform.processor() or platform.machine()}, indent=2))
    rows = []
    for r in results:
        raw, collection = r["raw_2proc_steps_per_s"], r["collection_fps"]
        for name, loop in r["loop_fps"].items():
            cells = ([r["task"], f"{raw:.0f}", f"{collection:.0f}", f"{collection / raw:.0%}"]
                     if name == "eager" else ["", "", "", ""])
            rows.append("| " + " | ".join([*cells, name, f"{loop:.0f}", f"{loop / raw:.0%}",
                                           f"{r['update_s_per_batch'][name]:.2f} s"]) + " |")
    return "\n".join([
        "Throughput, 2 processes each: the raw simulator with random actions and no TorchRL "
        "(steps/s, before and after the runs, averaged); the example's collector alone "
        f"({ControlConfig.num_workers} workers of {ControlConfig.num_envs} environments, "
        "batches after the first); its training loop, collection and updates (10 epochs of "
        "minibatches), median over batches after the first, evaluation excluded; and the "
        "updates' seconds per batch (GAE and the optimiser steps):", "",
        "| task | raw simulator | collection (frames/s) | collection / raw | update | "
        "training loop (frames/s) | loop / raw | updates per batch |",
        "|---|---|---|---|---|---|---|---|", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other arguments go to every run of examples/dmc_walker.py (see its --help).")
    parser.add_argument("--tasks", nargs="+",
                        help=f"default: {' '.join(TASKS)} (--throughput: {' '.join(THROUGHPUT_TASKS)})")
    parser.add_argument("--losses", nargs="+", default=["r2vpo", "ppo"], choices=["r2vpo", "ppo"])
    parser.add_argument("--reuse", nargs="+", type=int, default=[0], metavar="K",
                        help="R2VPO also with --reuse K (K > 0: the column r2vpo-reuseK)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dmc-1m")
    parser.add_argument("--sweep", action="store_true",
                        help="fixed-lambda and adaptive-delta sensitivity on the first task")
    parser.add_argument("--lambdas", nargs="*", type=float, default=FIXED_LAMBDAS,
                        help="the fixed multipliers --sweep runs")
    parser.add_argument("--targets", nargs="*", type=float, default=ADAPTIVE_TARGETS,
                        help="the ratio-variance targets --sweep runs with the adaptive dual")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--workers", nargs="+", type=int,
                        help="collection frames/s of the example with these worker counts")
    parser.add_argument("--repeats", type=int, default=5,
                        help="--workers: times each count is measured, in turn")
    parser.add_argument("--starts", type=int, metavar="N",
                        help="evaluate each finished run's final policy from N fresh starts")
    parser.add_argument("--report-only", action="store_true")
    args, extra = parser.parse_known_args()  # extra arguments go to the example
    if not args.throughput:
        args.tasks = args.tasks or TASKS
    args.out.mkdir(parents=True, exist_ok=True)

    sections = []
    if args.starts:
        sections.append(starts(args.out, args.tasks, args.frames, args.starts))
    elif args.workers:
        sections.append(workers(args.out, args.tasks[0], args.workers, args.repeats))
    elif args.throughput:
        sections.append(throughput(args.out, args.tasks or THROUGHPUT_TASKS, args.frames))
    elif args.sweep:
        task = args.tasks[0]
        runs = [(f"fixed-{v}", ["--lagrange-multiplier", str(v)]) for v in args.lambdas]
        runs += [(f"adaptive-{v}", ["--dual", "adaptive", "--ratio-var-target", str(v)])
                 for v in args.targets]
        for seed in args.seeds:
            for name, flags in runs:
                if not args.report_only:
                    run(args.out / "sweep" / task / name / f"seed{seed}", args.frames,
                        ["--env", task, "--seed", str(seed), *flags, *extra])
        swept = sorted(d.name for d in (args.out / "sweep").glob("*") if d.is_dir())
        sections += [summarize_sweep(args.out, t, args.frames) for t in swept]  # all in sweep.md
        plot_sweep(args.out, swept, args.frames)
    else:
        # a column per loss, and per reuse K > 0 for R2VPO
        columns = {(f"{loss}-reuse{k}" if k else loss): ["--loss", loss, "--reuse", str(k)]
                   for loss in args.losses for k in (args.reuse if loss == "r2vpo" else [0])}
        for seed in args.seeds:  # seed-major: a partial matrix is balanced across tasks
            for task in args.tasks:
                for column, flags in columns.items():
                    if not args.report_only:
                        run(args.out / task / column / f"seed{seed}", args.frames,
                            ["--env", task, *flags, "--seed", str(seed), *extra])
        sections.append(summarize(args.out, args.tasks, list(columns), args.frames))
    report = "\n\n".join(sections)
    name = ("starts" if args.starts else "workers" if args.workers
            else "throughput" if args.throughput else "sweep" if args.sweep else "summary")
    (args.out / f"{name}.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
