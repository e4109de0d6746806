from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from torchrl_r2vpo.recipes.config import ControlConfig, parse, PLAYGROUND
from torchrl_r2vpo.recipes.sweep import first_reach

ROOT = Path(__file__).parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_curve(run_dir: Path, evals: list[float], step=1000, **extra):
    run_dir.mkdir(parents=True)
    with open(run_dir / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["frames", "eval_return", "train_return", "ratio_var",
                                    "lagrange_multiplier", "kl_approx", "entropy"])
        writer.writeheader()
        for i, value in enumerate(evals, start=1):
            writer.writerow({"frames": i * step, "eval_return": value, "train_return": value - 5,
                             "ratio_var": 0.01 * i, "lagrange_multiplier": extra.get("lam", 2.5),
                             "kl_approx": 0.001 * i * extra.get("kl_scale", 1), "entropy": -i})


def test_report_from_partial_results(tmp_path):
    dmc = load("dmc_compare")
    write_curve(tmp_path / "walker-walk" / "r2vpo" / "seed0", [10, 50, 90])
    write_curve(tmp_path / "walker-walk" / "r2vpo" / "seed1", [20, 70, 110], kl_scale=3)
    write_curve(tmp_path / "walker-walk" / "ppo" / "seed0", [10, 30, 60])
    write_curve(tmp_path / "walker-walk" / "ppo" / "seed1", [10, 20])  # unfinished: left out
    report = dmc.summarize(tmp_path, ["walker-walk", "cheetah-run"], ["r2vpo", "ppo"], 3000)
    final, smooth = report.split("Smoother measures")
    smooth, steps = smooth.split("Update size")
    rows = {line.split("|")[1].strip(): line for line in final.splitlines() if line.startswith("| ")}
    assert "100.0 ± 10.0 (n=2)" in rows["walker-walk"]
    assert "60.0 ± 0.0 (n=1)" in rows["walker-walk"]
    # trailing means of 3 evaluations: r2vpo's [15, 37.5, 58.3] first reaches ppo's final
    # (10 + 30 + 60) / 3 at 2000 frames
    assert rows["walker-walk"].rstrip(" |").endswith("2000 (67%)")
    # last 3 evaluations: 50 and 66.7; training return in the last 10% of frames: 85 and 105
    assert "| walker-walk | 58.3 ± 8.3 | 95.0 ± 10.0 | 33.3 ± 0.0 | 55.0 ± 0.0 |" in smooth
    # KL per batch 0.001 * [1, 2, 3] (x3 in r2vpo's seed 1): medians 0.002 and 0.006,
    # 95th percentiles 0.0029 and 0.0087; entropy -3 at the end
    assert ("| walker-walk | 0.0040 ± 0.0020 | 0.0058 ± 0.0029 | -3.00 ± 0.00 "
            "| 0.0020 ± 0.0000 | 0.0029 ± 0.0000 | -3.00 ± 0.00 |") in steps
    assert rows["cheetah-run"].count("-") >= 3  # no runs yet
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_report_gives_each_r2vpo_column_its_frames_to_ppos_final(tmp_path, monkeypatch):
    dmc = load("dmc_compare")
    write_curve(tmp_path / "walker-walk" / "r2vpo" / "seed0", [10, 20, 30])
    write_curve(tmp_path / "walker-walk" / "r2vpo-reuse2" / "seed0", [40, 80, 100])
    write_curve(tmp_path / "walker-walk" / "ppo" / "seed0", [10, 30, 60])
    report = dmc.summarize(tmp_path, ["walker-walk"], ["r2vpo", "r2vpo-reuse2", "ppo"], 3000)
    header, row = [line for line in report.splitlines() if line.startswith("| ")][:2]
    assert header.endswith("| r2vpo: frames to PPO's final | r2vpo-reuse2: frames to PPO's final |")
    # ppo's trailing final (10 + 30 + 60) / 3 = 33.3: never reached by r2vpo (20 at most),
    # reached by the reuse column's first evaluation (40)
    assert row.endswith("| not reached | 1000 (33%) |")
    # the driver runs R2VPO once per --reuse K, PPO once, each with its own flags
    calls = []
    monkeypatch.setattr(dmc, "run", lambda run_dir, frames, args: calls.append(
        (run_dir.relative_to(tmp_path).as_posix(), args)))
    monkeypatch.setattr(sys, "argv", ["dmc_compare.py", "--tasks", "walker-walk", "--seeds", "0",
                                      "--reuse", "0", "2", "--out", str(tmp_path)])
    dmc.main()
    assert calls == [
        ("walker-walk/r2vpo/seed0", ["--env", "walker-walk", "--loss", "r2vpo", "--reuse", "0",
                                     "--seed", "0"]),
        ("walker-walk/r2vpo-reuse2/seed0", ["--env", "walker-walk", "--loss", "r2vpo", "--reuse",
                                            "2", "--seed", "0"]),
        ("walker-walk/ppo/seed0", ["--env", "walker-walk", "--loss", "ppo", "--reuse", "0",
                                   "--seed", "0"])]


def test_final_starts_report_reads_each_runs_returns(tmp_path):
    dmc = load("dmc_compare")

    def write_starts(run_dir, returns):
        with open(run_dir / "final_starts.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["env_seed", "return"])
            writer.writerows((dmc.STARTS_SEED + i, r) for i, r in enumerate(returns))

    task = tmp_path / "walker-walk"
    for run, returns in [("r2vpo/seed0", [600, 40, 620, 640]),
                         ("r2vpo/seed1", [600, 600, 50, 650]), ("ppo/seed0", [500, 520, 480, 300])]:
        write_curve(task / run, [1, 2, 3])
        write_starts(task / run, returns)
    write_curve(task / "ppo" / "seed1", [1, 2, 3])
    write_starts(task / "ppo" / "seed1", [500] * 8)  # other starts, and no checkpoint: left out
    write_curve(tmp_path / "sweep" / "walker-walk" / "fixed-1.0" / "seed0", [1, 2])  # unfinished
    rows = [line for line in dmc.starts(tmp_path, ["walker-walk"], 3000, 4).splitlines()
            if line.startswith("| walker-walk")]
    # r2vpo: means 475 and 475; of the 8 pooled, median 600, 10th percentile 40 + 0.7 x 10,
    # 2 below half the best (650); ppo: 10th percentile 300 + 0.3 x 180, 1 of 4 below 325
    assert rows == ["| walker-walk | ppo | 1 | 450.0 ± 0.0 | 490.0 | 354.0 | 25% |",
                    "| walker-walk | r2vpo | 2 | 475.0 ± 0.0 | 600.0 | 47.0 | 25% |"]
    assert (tmp_path / "starts.png").stat().st_size > 0


def test_sweep_report_lists_the_settings_present(tmp_path, monkeypatch):
    dmc = load("dmc_compare")
    sweep = tmp_path / "sweep" / "walker-walk"
    write_curve(sweep / "fixed-1.0" / "seed0", [10, 20, 30], lam=1.0)
    write_curve(sweep / "fixed-1.0" / "seed1", [10, 20, 50], lam=1.0)
    write_curve(sweep / "adaptive-0.02" / "seed0", [5, 15, 40], lam=0.25, kl_scale=2)
    write_curve(sweep / "fixed-2.5" / "seed0", [1])  # unfinished: left out
    rows = [line for line in dmc.summarize_sweep(tmp_path, "walker-walk", 3000).splitlines()
            if line.startswith("| fixed") or line.startswith("| adaptive")]
    # ratio_var 0.01 * [1, 2, 3] averages 0.02; KL 0.001 * [1, 2, 3] has median 0.002
    assert rows == ["| fixed lambda | 1.0 | 40.0 (n=2) | 23.3 | 0.0200 | 0.0020 | 1 |",
                    "| adaptive delta | 0.02 | 40.0 (n=1) | 20.0 | 0.0200 | 0.0040 | 0.25 |"]
    # sweep.md keeps every task swept, whichever task the command names
    write_curve(tmp_path / "sweep" / "cheetah-run" / "fixed-1.0" / "seed0", [1, 2, 3], lam=1.0)
    monkeypatch.setattr(sys, "argv", ["dmc_compare.py", "--sweep", "--report-only", "--tasks",
                                      "cheetah-run", "--frames", "3000", "--out", str(tmp_path)])
    dmc.main()
    report = (tmp_path / "sweep.md").read_text()
    assert "Sensitivity on cheetah-run" in report and "Sensitivity on walker-walk" in report
    assert (tmp_path / "sweep.png").stat().st_size > 0


@pytest.mark.parametrize("evals, level, expected", [([1, 5, 9], 5, 2000.0), ([1, 2], 5, None)])
def test_first_reach(evals, level, expected):
    import numpy as np

    frames = np.array([1000.0 * (i + 1) for i in range(len(evals))])
    got = first_reach(frames, np.array(evals, dtype=float), level)
    assert (np.isnan(got) and expected is None) or got == expected


def write_llm_curve(run_dir: Path, accuracies: list[float], step=128, seconds=100.0,
                    printed: tuple[float, ...] | None = None, grad_norm=lambda i: i):
    run_dir.mkdir(parents=True)
    with open(run_dir / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["rollouts", "time_s", "train_reward", "test_accuracy",
                                    "grad_norm"])
        writer.writeheader()
        for i, value in enumerate(accuracies, start=1):
            writer.writerow({"rollouts": i * step, "time_s": i * seconds, "train_reward": i / 10,
                             "test_accuracy": "" if value is None else value,
                             "grad_norm": grad_norm(i)})
    if printed is not None:  # what the example prints: sampled, greedy, pass@8 before and after
        b, bg, bp, a, ag, ap = printed
        (run_dir / "stdout.log").write_text(
            f"held-out accuracy before training: {b} (16 problems, sampled; greedy {bg}, pass@8 {bp})\n"
            "...\nheld-out accuracy before training: 0.9 (16 problems, sampled; greedy 0.9, pass@8 0.9)\n"
            f"held-out accuracy after training: {a} (before: {b}; greedy {ag}, pass@8 {ap}); curve\n")


def test_llm_report_from_partial_results(tmp_path, monkeypatch):
    llm = load("llm_compare")
    monkeypatch.setattr(llm, "REWARD_WINDOW", 256)  # the rows at 512 and 640 rollouts
    # seed 0 gains 0.4 by 300 s (the gate's last evaluation within 600 s); seed 1 only 0.05
    write_llm_curve(tmp_path / "grpo" / "seed0", [0.1, None, 0.3, None, 0.5], seconds=100,
                    printed=(0.1, 0.2, 0.5, 0.5, 0.6, 0.9))
    write_llm_curve(tmp_path / "grpo" / "seed1", [0.1, None, 0.3, None, 0.3], seconds=200,
                    printed=(0.25, 0.4, 0.7, 0.3, 0.3, 0.8))
    write_llm_curve(tmp_path / "r2vpo" / "seed0", [0.2, None, 0.4, None, 0.6],
                    grad_norm=lambda i: 100.0 * i if i > 3 else 1.0)
    write_llm_curve(tmp_path / "r2vpo" / "seed1", [0.2, None, 0.4])  # unfinished: left out
    report = llm.summarize(tmp_path, ["r2vpo", "grpo", "spo"], 640)
    table, gate = report.split("Gate:")
    gate, sizes = gate.split("Update size:")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["grpo"].startswith("| grpo | 0.175 ± 0.075 | 0.400 ± 0.100 | 0.450 ± 0.150 "
                                   "| 0.850 ± 0.050 | 0.450 ± 0.000 | 750 ± 250 | 2 |")
    assert "| 0.600 ± 0.000 | - | - | 0.450 ± 0.000 | 500 ± 0 | 1 |" in rows["r2vpo"]
    # grpo's final mean is 0.4; r2vpo's curve [0.2, 0.4, 0.6] first reaches it at 384 rollouts
    assert rows["r2vpo"].rstrip(" |").endswith("384 (60%)")
    assert rows["spo"].count("-") >= 2
    gates = {line.split("|")[1].strip(): line for line in gate.splitlines() if line.startswith("| seed")}
    assert gates["seed0"].endswith("| 0.100 | 0.500 | +0.400 | 0.200 -> 0.600 | yes |")
    assert gates["seed1"].endswith("| 0.250 | 0.300 | +0.050 | 0.400 -> 0.300 | no |")
    # gradient norms per iteration: grpo 1..5 in each seed; r2vpo 1, 1, 1, 400, 500
    assert "| grpo | 3.0 | 5 | 0 | - |" in sizes and "| r2vpo | 1.0 | 500 | 2 | - |" in sizes
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_llm_stale_report_has_a_staleness_table_of_medians_and_a_row_per_figure_group(tmp_path):
    from torchrl_r2vpo.recipes.llm import STALENESS_CSV_FIELDS

    llm = load("llm_compare")
    for method in ("grpo", "r2vpo-reuse1"):
        write_llm_curve(tmp_path / method / "seed0", [0.1, None, 0.3], printed=(0.1,) * 6)
    with open(tmp_path / "r2vpo-reuse1" / "seed0" / "staleness.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, STALENESS_CSV_FIELDS)
        writer.writeheader()
        for it, var in enumerate((0.01, 0.02, 5000.0)):  # one exploding iteration
            for age in (0, 1):
                writer.writerow(dict.fromkeys(STALENESS_CSV_FIELDS, 1.0) | dict(
                    rollouts=128 * (it + 1), age=age, tokens=100 + it, ratio_var=var * (age + 1)))
    report = llm.summarize(tmp_path, ["grpo", "r2vpo-reuse1"], 384,
                           rows={"a": ["grpo"], "b": ["r2vpo-reuse1", "r2vpo-reuse4"]})
    table = report.split("r2vpo-reuse1, seed0: by data age")[1]
    assert "| 0 | 3 | 101 | 0.0200 | 1.0000 |" in table and "| 1 | 3 | 101 | 0.0400 |" in table
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_playground_report_compares_at_equal_steps(tmp_path):
    pg = load("playground_compare")

    def run(loss, returns, evals):
        rows = [{"frames": 1000.0 * (i + 1), "time_s": i + 1.0, "fps": 1000.0, "train_return": r,
                 "eval_return": evals.get(i, "")} for i, r in enumerate(returns)]
        return {"loss": loss, "seed": 0, "frames": int(rows[-1]["frames"]),
                "loop_env_steps_per_s": 550_000.0, "final_eval_return": evals.get(len(rows) - 1),
                "eval_frames": int(rows[-1]["frames"]) if len(rows) - 1 in evals else None,
                "rows": rows}

    results = {"meta": {"device_name": "GPU", "num_envs": 2048, "date": "today"},
               "tasks": {"CartpoleSwingupSparse": {
                   "build_s": 5.0, "compile_s": 30.0, "env_steps_per_s": 1e6,
                   "runs": [run("r2vpo", [1, 5, 9], {2: 8.0}), run("ppo", [1, 3], {1: 2.0})]}}}
    text = pg.report(results, tmp_path)
    assert "| CartpoleSwingupSparse | 35 | 1,000,000 | r2vpo | 0 | 3,000 | 8.0 | 550,000 | - | 50% |" in text
    # equal steps: ppo stopped at 2000, so r2vpo is read at 2000 too; only ppo evaluated there
    assert "| CartpoleSwingupSparse | 0 | 2,000 | 5.0 | 3.0 | - | - |" in text
    assert (tmp_path / "curves.png").stat().st_size > 0


def fake_playground_driver(monkeypatch, tmp_path, *args, interrupt_at=None, broken_task=None):
    """playground_compare with stand-ins for the environments and the runs of
    examples/dmc_walker.py (whose command lines the example's parser reads): every run writes three 1000-frame batches at 1000 env-steps/s with 0.25 s of updates, a
    compiled one raises, the run ``interrupt_at`` stops after its first batch as a signal
    would, and ``broken_task`` cannot be built. Returns the module and the runs' calls."""
    pg = load("playground_compare")
    calls = []

    class Env:
        def close(self):
            pass

    def fake_make_env(name, **kwargs):
        if name == f"playground:{broken_task}":
            raise RuntimeError("no such GPU")
        return Env()

    def fake_train(argv, run_dir):
        cfg = parse(ControlConfig, argv)
        assert Path(cfg.out) == run_dir and cfg.playground and cfg.epochs == PLAYGROUND["epochs"]
        calls.append((cfg.env, cfg.loss, cfg.compile, cfg.time_limit))
        if cfg.compile:
            raise pg.RunFailed("RuntimeError: no CUDA graphs here")
        interrupted = (cfg.env, cfg.loss) == interrupt_at
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "curve.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["frames", "time_s", "fps", "update_s", "train_return",
                                        "eval_return"])
            writer.writeheader()
            for i, eval_return in enumerate(["", "", 7.0][:1 if interrupted else 3], start=1):
                writer.writerow({"frames": 1000 * i, "time_s": i, "fps": 1000.0, "update_s": 0.25,
                                 "train_return": i, "eval_return": eval_return})
        return {"interrupted": interrupted, "frames": 1000 if interrupted else 3000}

    monkeypatch.setattr(pg, "make_env", fake_make_env)
    monkeypatch.setattr(pg, "env_rate", lambda env, steps, device: (1.0, 5000.0))
    monkeypatch.setattr(pg, "stop_on_sigterm", lambda: None)  # not in the test process
    monkeypatch.setattr(pg, "share_compilation_cache", lambda path: None)  # nor its environment
    monkeypatch.setattr(pg, "train", fake_train)
    monkeypatch.setattr(sys, "argv", ["playground_compare.py", "--device", "cpu", "--out",
                                      str(tmp_path), "--budget", "400", "--time-limit", "100",
                                      *args])
    pg.main()
    return pg, calls


def test_playground_driver_retries_a_failed_compiled_run_eagerly(tmp_path, monkeypatch):
    _, calls = fake_playground_driver(monkeypatch, tmp_path, "--tasks", "CartpoleSwingupSparse",
                                      "--compile")
    calls = [call[1:] for call in calls]
    # r2vpo failed compiled and was run again eagerly; ppo then trained eagerly from the start
    assert [(loss, compiled) for loss, compiled, _ in calls] == [
        ("r2vpo", True), ("r2vpo", False), ("ppo", False)]
    assert all(limit == 100 for _, _, limit in calls)
    results = json.loads((tmp_path / "results.json").read_text())
    assert "no CUDA graphs here" in results["meta"]["compile_error"]
    runs = results["tasks"]["CartpoleSwingupSparse"]["runs"]
    assert [(run["loss"], run["compiled"]) for run in runs] == [("r2vpo", False), ("ppo", False)]
    assert runs[0]["update_share"] == pytest.approx(0.25)
    assert runs[0]["final_eval_return"] == 7.0
    summary = (tmp_path / "summary.md").read_text()
    assert "--compile failed (RuntimeError: no CUDA graphs here)" in summary
    assert "| r2vpo | 0 | 3,000 | 7.0 | 1,000 | 25% | 0% |" in summary


def test_playground_driver_keeps_going_past_a_broken_task_and_stops_at_a_signal(tmp_path, monkeypatch):
    _, calls = fake_playground_driver(
        monkeypatch, tmp_path, "--tasks", "CartpoleSwingupSparse", "WalkerWalk", "CheetahRun",
        broken_task="CartpoleSwingupSparse", interrupt_at=("playground:WalkerWalk", "ppo"))
    # the broken task is recorded and skipped; the signal during WalkerWalk's ppo run ends it all
    assert [call[:2] for call in calls] == [("playground:WalkerWalk", "r2vpo"),
                                            ("playground:WalkerWalk", "ppo")]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["interrupted"] and "CheetahRun" not in results["tasks"]
    assert "no such GPU" in results["tasks"]["CartpoleSwingupSparse"]["error"]
    r2vpo, ppo = results["tasks"]["WalkerWalk"]["runs"]
    assert ppo["interrupted"] and ppo["frames"] == 1000
    assert ppo["loop_env_steps_per_s"] is None  # its only batch was the warm-up one
    assert r2vpo["loop_env_steps_per_s"] == 1000.0 and "interrupted" not in r2vpo
    summary = (tmp_path / "summary.md").read_text()
    assert "CartpoleSwingupSparse could not be built or stepped: RuntimeError: no such GPU" in summary
    assert "WalkerWalk ppo seed 0 was stopped by a signal after 1,000 env steps" in summary


def test_worker_scaling_is_compared_within_each_repeat(tmp_path, monkeypatch):
    dmc = load("dmc_compare")
    collected = iter([1000.0, 1500.0, 800.0, 1600.0, 1200.0, 1800.0])  # 1, 2 workers in turn
    raw = iter([5000.0, 9000.0, 4000.0, 8000.0, 5000.0, 10000.0])
    monkeypatch.setattr(dmc, "collection_rate", lambda task, n: next(collected))
    monkeypatch.setattr(dmc, "raw_rate", lambda task, processes: next(raw))
    text = dmc.workers(tmp_path, "walker-walk", [1, 2], repeats=3)
    # ratios 1.5, 2.0, 1.5: a slow repeat of one count is not compared with a fast one of another
    assert "| 1 | 1000 | 1.00x (1.00, 1.00, 1.00) | 5000 | 1.00x (1.00, 1.00, 1.00) |" in text
    assert "| 2 | 1600 | 1.50x (1.50, 2.00, 1.50) | 9000 | 2.00x (1.80, 2.00, 2.00) |" in text
    assert json.loads((tmp_path / "workers.json").read_text())["frames_per_s"]["2"] == [
        1500.0, 1600.0, 1800.0]


def test_throughput_reports_collection_and_loop_against_the_raw_simulator(tmp_path, monkeypatch):
    dmc = load("dmc_compare")
    raw = iter([9000.0, 7000.0, 20000.0, 20000.0])  # per task: before and after the runs
    monkeypatch.setattr(dmc, "raw_rate", lambda task, processes: next(raw))
    monkeypatch.setattr(dmc, "collection_rate", lambda task, n: {"walker-walk": 4800.0}.get(task, 9000.0))
    fps = {"eager": 2400.0, "compiled": 2800.0}
    runs, curves = [], {}

    def fake_run(run_dir, frames, args):
        runs.append((run_dir.parent.name, run_dir.name))
        curves[run_dir] = [{"fps": 1.0, "update_s": 9.0}] + [{"fps": fps[run_dir.name], "update_s": 0.5}] * 3

    monkeypatch.setattr(dmc, "run", fake_run)
    monkeypatch.setattr(dmc, "run_curve", lambda run_dir: curves[run_dir])
    text = dmc.throughput(tmp_path, ["walker-walk", "HalfCheetah-v5"], 8192)
    # the first batch (start-up, compilation) is left out; the compiled loop on the first task only
    assert runs == [("walker-walk", "eager"), ("walker-walk", "compiled"), ("HalfCheetah-v5", "eager")]
    assert "| walker-walk | 8000 | 4800 | 60% | eager | 2400 | 30% | 0.50 s |" in text
    assert "|  |  |  |  | compiled | 2800 | 35% | 0.50 s |" in text
    assert "| HalfCheetah-v5 | 20000 | 9000 | 45% | eager | 2400 | 12% | 0.50 s |" in text
    saved = json.loads((tmp_path / "throughput.json").read_text())["runs"]
    assert [r["task"] for r in saved] == ["walker-walk", "HalfCheetah-v5"]


def test_sparse_exploration_reports_the_share_of_rewarded_first_episodes(tmp_path, monkeypatch):
    probe = load("sparse_exploration")
    # the dense swing-up pays something at every step: every episode counts
    monkeypatch.setattr(sys, "argv", ["sparse_exploration.py", "--task", "cartpole-swingup",
                                      "--seeds", "0", "--episodes", "2", "--settings", "8:1.0",
                                      "--out", str(tmp_path)])
    probe.main()
    result = json.loads((tmp_path / "exploration.json").read_text())["results"]
    assert [(r["frame_skip"], r["initial_scale"], r["share_rewarded"]) for r in result] == \
        [(8, 1.0, [1.0])]
    assert result[0]["mean_return"][0] > 0
    assert "| 8 | 1.0 | 1.00 (" in (tmp_path / "exploration.md").read_text()
