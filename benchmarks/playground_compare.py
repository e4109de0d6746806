"""R2VPO vs clipped PPO on MuJoCo Playground on the GPU, through ``examples/dmc_walker.py``.

    python benchmarks/playground_compare.py --out benchmarks/results/playground  # 3 tasks x 2 losses, ~7 min
    python benchmarks/playground_compare.py --tasks CartpoleSwingupSparse --seeds 0 1 --frames 20000000
    python benchmarks/playground_compare.py --device cpu --num-envs 16 --frames 1024 --random-steps 20 \\
        --frames-per-batch 512 --minibatch-size 128 --epochs 2                  # a CPU smoke run

For each task the Playground environment is built and compiled once, its
random-action env-steps/s is measured, and then every (loss, seed) run trains
through ``examples/dmc_walker.py`` in a process of its own, which builds the task
again and loads its compiled step from JAX's persistent compilation cache (under
the runs' directory), with Playground's tuned Brax PPO defaults (the
``PLAYGROUND`` preset of ``torchrl_r2vpo.recipes.config``, shared by both
losses); only the loss differs. Each run stops at ``--frames`` or after ``--time-limit``
seconds of training, and the whole benchmark skips the runs that no longer fit
in ``--budget`` seconds. After every run ``results.json``, ``summary.md`` and
``curves.png`` are rewritten under ``--out``, so a killed benchmark leaves the
runs it finished; ``--report-only`` rebuilds them from ``results.json``.
Arguments this script does not know go to the example (``--frames-per-batch``,
``--epochs``, ...).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU's memory to torch
os.environ.setdefault("MUJOCO_GL", "disable")  # nothing is rendered

import torch

from torchrl_r2vpo.envs import make_env  # noqa: E402
from torchrl_r2vpo.recipes.run_state import read_curve, stop_on_sigterm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dmc_walker.py"

TASKS = ["CartpoleSwingupSparse", "WalkerWalk", "CheetahRun"]
# Playground's own Brax PPO with the same configuration, measured on an H100 (2026-11)
BRAX_REFERENCE = {
    "CartpoleSwingupSparse": {"env_steps_per_s": 1.1e6, "eval_return": 760, "frames": 20e6,
                              "compile_s": 33},
}
STOCK_ENV_REFERENCE = {"WalkerWalk": 148e3, "CartpoleSwingupSparse": 359e3}  # TorchRL wrapper


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def env_rate(env, steps: int, device: torch.device) -> tuple[float, float]:
    """Seconds of the first (compiling) steps, then random-action env-steps/s."""
    start = time.perf_counter()
    env.rollout(2, break_when_any_done=False)
    sync(device)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    td = env.rollout(steps, break_when_any_done=False)
    sync(device)
    return compile_s, td.numel() / (time.perf_counter() - start)


def share_compilation_cache(path: Path) -> None:
    """JAX's persistent compilation cache in ``path`` (unless ``JAX_COMPILATION_CACHE_DIR``
    names one), for this process and the runs it starts: a task's step compiles once."""
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(path))
    if importlib.util.find_spec("jax") is not None:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


class RunFailed(RuntimeError):
    """A run of the example exited with an error; the message is its last line of stderr."""


def train(argv: list[str], run_dir: Path) -> dict:
    """Runs ``examples/dmc_walker.py`` with ``argv`` in a process of its own, its stderr in
    ``run_dir/stderr.log``. A Ctrl-C or SIGTERM of this process is passed on to the run, which
    saves the checkpoint of its last complete batch: the outcome is then interrupted.

    Raises:
        RunFailed: the run failed.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = None
    try:
        with open(run_dir / "stderr.log", "w") as stderr:
            # a session of its own: this process's group's signals reach it only from here
            proc = subprocess.Popen([sys.executable, str(EXAMPLE), *argv], stderr=stderr,
                                    start_new_session=True)
            status = proc.wait()
    except KeyboardInterrupt:
        if proc is None:
            raise
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        return {"interrupted": True}
    if status != 0:
        lines = [line for line in (run_dir / "stderr.log").read_text().splitlines() if line.strip()]
        raise RunFailed(lines[-1] if lines else f"exit status {status}")
    return {"interrupted": False}


def run_summary(run_dir: Path) -> dict:
    """What one run's ``curve.csv`` says: frames, returns, the loop's env-steps/s and the
    share of each batch's time that GAE and the optimiser steps take."""
    curve = read_curve(run_dir / "curve.csv")
    if not curve:
        return {"frames": 0, "rows": []}
    frames = [r["frames"] for r in curve]
    sizes = [b - a for a, b in zip([0.0] + frames, frames)]
    # the first batch warms up (and compiles, under --compile): no speed from it
    fps = [r["fps"] for r in curve[1:]]
    # a batch took size / fps seconds, update_s of them in GAE and the optimiser steps
    update_share = [r["update_s"] * r["fps"] / size for r, size in zip(curve[1:], sizes[1:])
                    if r.get("update_s", "") != ""]
    evals = [(r["frames"], r["eval_return"]) for r in curve if r["eval_return"] != ""]
    return {
        "frames": int(curve[-1]["frames"]),
        "train_s": curve[-1]["time_s"],
        "loop_env_steps_per_s": statistics.median(fps) if fps else None,
        "update_share": statistics.median(update_share) if update_share else None,
        "final_eval_return": evals[-1][1] if evals else None,
        "eval_frames": int(evals[-1][0]) if evals else None,
        "rows": [{k: r[k] for k in ("frames", "time_s", "fps", "update_s", "train_return",
                                    "eval_return") if k in r} for r in curve],
    }


def return_at(rows: list[dict], frames: int) -> float | None:
    """The last training return (stochastic policy) logged at or before ``frames``."""
    values = [r["train_return"] for r in rows if r["frames"] <= frames and r["train_return"] != ""]
    return values[-1] if values else None


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def report(results: dict, out: Path) -> str:
    """Writes ``summary.md`` and ``curves.png`` from ``results``; returns the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    lines = [f"MuJoCo Playground, {meta['device_name']}, {meta['num_envs']} environments, "
             f"{meta['date']}. Training loop = collection + GAE + updates, median env-steps/s "
             "over batches after the first, evaluation excluded.", "",
             "| task | build + compile (s) | random actions (env-steps/s) | loss | seed | frames "
             "| eval return | training loop (env-steps/s) | GAE + updates (share of a batch) "
             "| loop / Brax PPO (H100) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    equal = ["", "Returns at equal steps (the smaller of the two runs' frames; training "
             "return of the stochastic policy, then the deterministic evaluation if both runs "
             "evaluated at those frames):", "",
             "| task | seed | frames | R2VPO train | PPO train | R2VPO eval | PPO eval |",
             "|---|---|---|---|---|---|---|"]
    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5 * max(1, len(tasks)), 3.6),
                             squeeze=False)
    for ax, task in zip(axes[0], tasks):
        entry = results["tasks"][task]
        brax = BRAX_REFERENCE.get(task, {}).get("env_steps_per_s")
        by_key = {}
        for run in entry["runs"]:
            by_key[run["loss"], run["seed"]] = run
            speed = run.get("loop_env_steps_per_s")
            lines.append(
                f"| {task} | {fmt(entry.get('build_s', 0) + entry.get('compile_s', 0), '.0f')} "
                f"| {fmt(entry.get('env_steps_per_s'), ',.0f')} "
                f"| {run['loss']}{' (compiled)' if run.get('compiled') else ''} | {run['seed']} "
                f"| {run.get('frames', 0):,} | {fmt(run.get('final_eval_return'))} "
                f"| {fmt(speed, ',.0f')} | {fmt(run.get('update_share'), '.0%')} "
                f"| {fmt(speed / brax if speed and brax else None, '.0%')} |")
            rows = run.get("rows", [])
            train = [(r["frames"], r["train_return"]) for r in rows if r["train_return"] != ""]
            evals = [(r["frames"], r["eval_return"]) for r in rows if r["eval_return"] != ""]
            color = "C0" if run["loss"] == "r2vpo" else "C1"
            if train:
                ax.plot(*zip(*train), ".-", color=color, label=f"{run['loss']} seed {run['seed']}")
            if evals:
                ax.plot(*zip(*evals), "o", color=color)
        for seed in sorted({seed for _, seed in by_key}):
            r2vpo, ppo = by_key.get(("r2vpo", seed)), by_key.get(("ppo", seed))
            if not (r2vpo and ppo and r2vpo.get("rows") and ppo.get("rows")):
                continue
            frames = min(r2vpo["frames"], ppo["frames"])
            same_eval = r2vpo.get("eval_frames") == ppo.get("eval_frames") == frames
            equal.append(
                f"| {task} | {seed} | {frames:,} | {fmt(return_at(r2vpo['rows'], frames))} "
                f"| {fmt(return_at(ppo['rows'], frames))} "
                f"| {fmt(r2vpo['final_eval_return'] if same_eval else None)} "
                f"| {fmt(ppo['final_eval_return'] if same_eval else None)} |")
        ax.set(title=task, xlabel="env steps", ylabel="episode return (o: evaluation)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    references = ["", "References (H100): Playground's Brax PPO on CartpoleSwingupSparse about "
                  "1.1M env-steps/s after a ~33 s compile, evaluation return ~760 after ~20M "
                  "steps; TorchRL's MujocoPlaygroundEnv with random actions, 4096 environments: "
                  "WalkerWalk ~148k, CartpoleSwingupSparse ~359k env-steps/s."]
    failed = [f"- {task} could not be built or stepped: {entry['error'].strip()}"
              for task, entry in results["tasks"].items() if "error" in entry]
    failed += [f"- {task} {run['loss']} seed {run['seed']} failed: {run['error'].strip()}"
               for task, entry in results["tasks"].items() for run in entry["runs"] if "error" in run]
    failed += [f"- {task} {run['loss']} seed {run['seed']} was stopped by a signal after "
               f"{run['frames']:,} env steps; nothing ran after it"
               for task, entry in results["tasks"].items() for run in entry["runs"]
               if run.get("interrupted")]
    if "compile_error" in meta:
        failed.append(f"- --compile failed ({meta['compile_error'].strip()}); the runs from then on trained "
                      "eagerly")
    text = "\n".join(lines + ([""] + failed if failed else []) + equal + references) + "\n"
    (out / "summary.md").write_text(text)
    return text


def save(results: dict, out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")
    report(results, out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other arguments go to every run of examples/dmc_walker.py (see its --help).")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--losses", nargs="+", default=["r2vpo", "ppo"], choices=["r2vpo", "ppo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--frames", type=int, default=6 * 983_040,
                        help="env steps per run (6 batches of the preset)")
    parser.add_argument("--time-limit", type=float, default=35.0,
                        help="seconds of training after which a run stops")
    parser.add_argument("--budget", type=float, default=380.0,
                        help="seconds for the whole benchmark; runs that no longer fit are skipped")
    parser.add_argument("--deadline", type=float, default=None,
                        help="the budget's end as a Unix time (from a launcher whose clock "
                             "started before this process's imports); overrides --budget")
    parser.add_argument("--num-envs", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--random-steps", type=int, default=200,
                        help="steps of the random-action throughput measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "playground")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="the runs' own directories (default: <out>/runs)")
    parser.add_argument("--report-only", action="store_true")
    args, extra = parser.parse_known_args()  # extra arguments go to the example
    args.out.mkdir(parents=True, exist_ok=True)
    runs_dir = args.runs_dir or args.out / "runs"
    if args.report_only:
        print(report(json.loads((args.out / "results.json").read_text()), args.out))
        return

    start = time.perf_counter()
    if args.deadline is not None:
        args.budget = args.deadline - time.time()
    stop_on_sigterm()  # a backstop timeout stops the run under way as Ctrl-C does
    device = torch.device(args.device)
    results = {"meta": {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})",
        "num_envs": args.num_envs, "frames": args.frames, "time_limit": args.time_limit,
        "example_args": list(extra), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__},
        "tasks": {}}
    share_compilation_cache(runs_dir / "jax_cache")
    try:
        benchmark(args, extra, device, results, runs_dir, start)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside a run: keep what is done
        results["meta"]["interrupted"] = True
        print("interrupted; the finished runs are saved", flush=True)
    results["meta"]["total_s"] = time.perf_counter() - start
    save(results, args.out)
    print(report(results, args.out))


def benchmark(args, extra: list[str], device: torch.device, results: dict, runs_dir: Path,
              start: float) -> None:
    """Runs every task's (loss, seed) runs within ``args.budget``, saving after each."""
    runs = [(loss, seed) for seed in args.seeds for loss in args.losses]
    overhead = 20.0  # seconds a run takes beyond its time limit (start, last batch, evaluation)
    for t, task in enumerate(args.tasks):
        if time.perf_counter() - start > args.budget - 60:
            print(f"skipping {task}: out of --budget", flush=True)
            continue
        t0 = time.perf_counter()
        entry = results["tasks"][task] = {"runs": []}
        env = None
        try:  # a task that cannot be built or stepped leaves the others to run
            env = make_env(f"playground:{task}", num_envs=args.num_envs, seed=0, device=device)
            entry["build_s"] = time.perf_counter() - t0
            entry["compile_s"], entry["env_steps_per_s"] = env_rate(env, args.random_steps, device)
        except Exception as err:
            traceback.print_exc()
            entry["error"] = f"{type(err).__name__}: {err}"
            save(results, args.out)
            continue
        finally:
            if env is not None:
                env.close()  # its device memory goes to the runs
        print(f"{task}: built in {entry['build_s']:.1f} s, compiled in {entry['compile_s']:.1f} s, "
              f"{entry['env_steps_per_s']:,.0f} env-steps/s with random actions", flush=True)
        save(results, args.out)
        for i, (loss, seed) in enumerate(runs):
            for attempt in range(2):  # a failed compiled run is tried once more, eagerly
                left = args.budget - (time.perf_counter() - start)
                later_tasks = len(args.tasks) - 1 - t
                # every run still to do gets the same time, the later tasks' builds aside
                share = (left - 60 * later_tasks) / (len(runs) - i + later_tasks * len(runs))
                limit = min(args.time_limit, share - overhead)
                if limit < 5:
                    print(f"skipping {task} {loss} seed {seed}: out of --budget", flush=True)
                    break
                run_dir = runs_dir / task / loss / f"seed{seed}"
                argv = ["--env", f"playground:{task}", "--loss", loss, "--seed", str(seed),
                        "--device", args.device, "--num-envs", str(args.num_envs),
                        "--frames", str(args.frames), "--eval-every", str(args.frames),
                        "--checkpoint-every", str(args.frames), "--time-limit", f"{limit:.0f}",
                        "--out", str(run_dir), "--overwrite", *extra]
                compiled = "--compile" in extra
                t0 = time.perf_counter()
                try:
                    outcome = train(argv, run_dir)
                except Exception as err:  # the other runs still run
                    traceback.print_exc()
                    error = str(err) if isinstance(err, RunFailed) else f"{type(err).__name__}: {err}"
                    if compiled and attempt == 0:
                        extra.remove("--compile")
                        results["meta"]["compile_error"] = error
                        print(f"{task} {loss} seed {seed} failed under --compile; this run and the "
                              "next train eagerly", flush=True)
                        continue
                    run = {"loss": loss, "seed": seed, "error": error, "frames": 0, "rows": []}
                else:
                    run = {"loss": loss, "seed": seed, "wall_s": time.perf_counter() - t0,
                           "time_limit": limit, "compiled": compiled, **run_summary(run_dir)}
                    batches = max(1, len(run["rows"]))
                    overhead = run["wall_s"] - run.get("train_s", 0) + run.get("train_s", 0) / batches
                entry["runs"].append(run)
                save(results, args.out)
                print(f"{task} {loss} seed {seed}: {run['frames']:,} env steps in "
                      f"{fmt(run.get('wall_s'), '.0f')} s, eval return "
                      f"{fmt(run.get('final_eval_return'))}, training loop "
                      f"{fmt(run.get('loop_env_steps_per_s'), ',.0f')} env-steps/s", flush=True)
                if "error" not in run and outcome.get("interrupted"):
                    run["interrupted"] = True  # its batches so far are in the summary
                    raise KeyboardInterrupt
                break


if __name__ == "__main__":
    main()
