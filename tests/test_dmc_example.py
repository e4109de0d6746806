from __future__ import annotations

import contextlib
import copy
import csv
import importlib.util
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Composite

from torchrl_r2vpo.envs import make_env
from torchrl_r2vpo.recipes import control, update
from torchrl_r2vpo.recipes.config import ControlConfig
from torchrl_r2vpo.recipes.run_state import interrupts_deferred, read_checkpoint, save_checkpoint

EXAMPLE = Path(__file__).parents[1] / "examples" / "dmc_walker.py"
SMALL = ["--frames-per-batch", "1024", "--num-envs", "4", "--num-workers", "1", "--epochs", "2",
         "--minibatch-size", "256", "--eval-episodes", "2", "--no-video"]
# the final evaluation from 2 starts, not the default 16 (about 10 s longer), but in small_run
FEW_FINAL_STARTS = ["--final-eval-episodes", "2"]
FINAL_LINE = re.compile(r"final evaluation return: mean (\S+), median (\S+) from (\d+) starts "
                        r"after (\d+) frames")


def run_example(*args, timeout=120, env=None, final_starts=FEW_FINAL_STARTS):
    return subprocess.run([sys.executable, str(EXAMPLE), *SMALL, *final_starts, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def read_curve(out: Path) -> list[dict]:
    with open(out / "curve.csv") as f:
        return list(csv.DictReader(f))


def read_final_eval(out: Path) -> list[dict]:
    with open(out / "final_eval.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """4096 frames in 4 batches of 4 environments x 256 steps (walker's episodes of 1000 steps
    end in the last one), evaluated at 2048 and finally from the default 16 starts: its
    --out, its process and its seconds."""
    out = tmp_path_factory.mktemp("run")
    start = time.perf_counter()
    result = run_example("--frames", "4096", "--eval-every", "2048", "--reuse", "1",
                         "--out", str(out), final_starts=[])
    return out, result, time.perf_counter() - start


@pytest.mark.timeout(180)
def test_example_trains_and_writes_its_outputs(small_run):
    tmp_path, result, seconds = small_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert seconds < 60
    rows = read_curve(tmp_path)
    assert [int(r["frames"]) for r in rows] == [1024, 2048, 3072, 4096]
    assert rows[1]["eval_return"] and rows[-1]["eval_return"]
    assert all(float(r["lagrange_multiplier"]) == 1.0 for r in rows)  # fixed dual by default
    assert float(rows[-1]["ratio_var"]) > 0
    assert 0 < float(rows[-1]["update_s"]) < float(rows[-1]["time_s"]) - float(rows[-2]["time_s"])
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert "final evaluation return" in result.stdout
    scalars = tmp_path / "logs" / "r2vpo-walker-walk-seed0" / "scalars"
    assert (scalars / "stale1" / "ratio_var.csv").exists()  # per-staleness metrics


@pytest.mark.timeout(180)
def test_the_final_evaluation_is_from_16_starts_and_prints_their_mean_and_median(small_run):
    out, result, _ = small_run
    assert result.returncode == 0, result.stderr[-3000:]
    starts = read_final_eval(out)
    assert [(int(r["frames"]), int(r["start"])) for r in starts] == [(4096, i) for i in range(16)]
    returns = [float(r["return"]) for r in starts]
    printed = FINAL_LINE.search(result.stdout)
    assert printed is not None, result.stdout
    mean, median, count, frames = printed.groups()
    assert (int(count), int(frames)) == (16, 4096)
    assert float(mean) == pytest.approx(statistics.fmean(returns), abs=0.051)
    assert float(median) == pytest.approx(statistics.median(returns), abs=0.051)
    # the curve ends with its mean
    rows = read_curve(out)
    assert float(rows[-1]["eval_return"]) == pytest.approx(statistics.fmean(returns), rel=1e-5)


@pytest.mark.timeout(180)
def test_the_progress_bar_shows_a_recent_return_throughout(small_run):
    out, result, _ = small_run
    assert result.returncode == 0, result.stderr[-3000:]
    shown = list(dict.fromkeys(re.findall(r"ret=([^,\]]+)", result.stderr)))  # in order, once
    # no episode ends in the first 3 batches: the reward per step, marked as such
    assert len(shown) >= 2 and "-" not in shown, shown
    assert all(value.endswith("/step") and 0 <= float(value[:-5]) <= 1 for value in shown[:-1])
    # the 4 episodes that end in the last batch: the mean of their returns
    last_batch = read_curve(out)[-1]
    assert float(shown[-1]) == pytest.approx(float(last_batch["train_return"]), abs=0.051)


@pytest.mark.timeout(180)
def test_ppo_baseline_and_a_gymnasium_env_run_through_the_example(tmp_path):
    result = run_example("--loss", "ppo", "--env", "Pendulum-v1", "--frames", "2048",
                         "--eval-every", "2048", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_curve(tmp_path)
    assert len(rows) == 2 and rows[-1]["lagrange_multiplier"] == ""  # ClipPPOLoss has none
    assert float(rows[-1]["clip_fraction"]) >= 0


STATISTICS = ["lagrange_multiplier", "ratio_var", "ESS", "kl_approx", "entropy",
              "loss_objective", "loss_critic"]


@pytest.mark.timeout(180)
def test_a_seed_reproduces_the_run_across_worker_processes(tmp_path):
    rows = []
    for out in (tmp_path / "a", tmp_path / "b"):
        result = run_example("--frames", "2048", "--num-workers", "2", "--eval-every", "2048",
                             "--out", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        rows.append([{k: r[k] for k in ["train_return", "eval_return", *STATISTICS]}
                     for r in read_curve(out)])
    assert rows[0] == rows[1]


# these run torch.compile in this process: its warnings about torch's and tensordict's own
# code (deprecations, graph breaks) are reported, not raised as the suite's filters would
compile_warnings_shown = pytest.mark.filterwarnings("default")


def walker_sized_loss():
    """The example's R2VPO loss (adaptive dual) for 24 observations and 6 actions, and a
    minibatch of 256 synthetic transitions for it."""
    action = Bounded(-1.0, 1.0, shape=(6,))  # what make_agent reads of an env
    spec = SimpleNamespace(full_action_spec_unbatched=Composite(action=action),
                           action_spec_unbatched=action)
    actor, critic, _ = control.make_agent(spec, 24, 6)
    loss, scheduler = control.make_loss(ControlConfig(dual="adaptive"), actor, critic)
    batch = TensorDict(observation=torch.randn(256, 24), batch_size=[256])
    with torch.no_grad():
        actor(batch)
    batch["advantage"], batch["value_target"] = torch.randn(256, 1), torch.randn(256, 1)
    return loss, scheduler, batch


@pytest.mark.timeout(240)
@compile_warnings_shown
def test_the_compiled_update_takes_the_eager_steps():
    torch.manual_seed(0)
    built = walker_sized_loss()
    runs = []
    # inductor draws its own random numbers unless told to use eager's (the entropy estimate)
    with torch._inductor.config.patch(fallback_random=True):
        for compiling in (False, True):
            loss, scheduler, batch = copy.deepcopy(built)
            step = update.make_update(loss, control.make_optimizer(loss, 1e-3, compiling), 0.5,
                                      compile=compiling)
            torch.manual_seed(1)
            outs = []
            for _ in range(3):  # the first call runs eager, then the compiled graph
                outs.append(step(batch))
                scheduler.step(outs[-1])  # lambda moves: the graph reads it as a buffer
            runs.append((outs, [p.detach().clone() for p in loss.parameters()]))
    (eager, eager_params), (compiled, compiled_params) = runs
    for e, c in zip(eager, compiled):
        for key in ("loss_objective", "loss_ratio_var", "loss_critic", "ratio_var", "grad_norm",
                    "lagrange_multiplier", "entropy"):
            torch.testing.assert_close(c[key], e[key], rtol=1e-4, atol=1e-6, msg=key)
    for e, c in zip(eager_params, compiled_params):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)


@pytest.mark.timeout(180)
@compile_warnings_shown
def test_compile_has_the_collector_compile_its_policy_with_the_eager_log_probs():
    env = make_env("cartpole-balance")
    actor, _, _ = control.make_agent(env, env.observation_spec["observation"].shape[-1],
                                     env.action_spec.shape[-1])
    env.close()
    for compiling in (False, True):
        cfg = ControlConfig(env="cartpole-balance", num_envs=4, num_workers=1,
                            frames_per_batch=64, compile=compiling)
        collector = control.make_collector(cfg, actor, 64, seed=0)
        try:
            data = next(iter(collector))
        finally:
            collector.shutdown()
        assert collector.compiled_policy is compiling
        # the behaviour log-probabilities are the eager actor's: an on-policy ratio of 1
        torch.testing.assert_close(control.action_log_probs(actor, data),
                                   data["action_log_prob"], rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(300)
def test_a_compiled_run_compiles_its_update_once(tmp_path):
    env = {**os.environ, "TORCH_LOGS": "recompiles"}
    compiled = run_example("--frames", "2048", "--dual", "adaptive", "--eval-every", "1000000",
                           "--compile", "--out", str(tmp_path), env=env, timeout=240)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    # one graph for the update step (the collector's policy may take a second one: its input
    # gains keys after the first step)
    assert re.search(r"Recompiling function \w+ in \S+update\.py", compiled.stderr) is None, \
        compiled.stderr[-3000:]
    rows = read_curve(tmp_path)
    assert len(rows) == 2 and all(math.isfinite(float(r[key])) for r in rows for key in STATISTICS)


@pytest.mark.timeout(360)
def test_interrupt_and_resume_continue_the_run(tmp_path):
    cmd = [sys.executable, str(EXAMPLE), *SMALL, "--frames", "1000000", "--dual", "adaptive",
           "--checkpoint-every", "1024", "--eval-every", "1000000", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "curve.csv").exists() or len(read_curve(tmp_path)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.5)
        # what a job scheduler or `timeout` sends; the script turns it into Ctrl-C's
        # KeyboardInterrupt (a suite started in the background could not send SIGINT: the
        # child would inherit it ignored)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:  # reap it: a process left running fails later tests' teardown
            proc.kill()
            proc.communicate()
    assert "checkpoint saved" in stdout and proc.returncode == 0, stderr[-3000:]
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    frames = saved["frames"]
    lam = saved["loss"]["lagrange_multiplier"].item()
    count = saved["loss"]["actor_network_params.module.0.module.0.count"].item()
    assert frames >= 2048 and count == frames and lam != 0.5

    result = run_example("--frames", str(frames + 1024), "--dual", "adaptive", "--resume",
                         "--eval-every", "1000000", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    restored = re.search(r"resumed at frame (\d+): lambda (\S+), observation count (\d+)",
                         result.stdout)
    assert restored is not None, result.stdout
    assert int(restored.group(1)) == frames
    assert float(restored.group(2)) == pytest.approx(lam, rel=1e-6)
    assert int(restored.group(3)) == count
    frames_seen = [int(r["frames"]) for r in read_curve(tmp_path)]
    assert frames_seen[-1] == frames + 1024 and frames_seen == sorted(frames_seen)
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    # the normaliser kept its statistics and added the new batch
    assert final["loss"]["actor_network_params.module.0.module.0.count"].item() == count + 1024
    # a resume that would change the shape of the stored batches is refused, by name
    bad = run_example("--frames", str(frames + 2048), "--dual", "adaptive", "--reuse", "1",
                      "--resume", "--out", str(tmp_path))
    assert bad.returncode != 0 and "reuse=0" in bad.stderr
    # so is one that would silently keep the checkpoint's loss coefficients
    bad = run_example("--frames", str(frames + 2048), "--dual", "adaptive", "--entropy-coeff",
                      "0.01", "--resume", "--out", str(tmp_path))
    assert bad.returncode != 0 and "entropy_coeff=0.0" in bad.stderr


@pytest.mark.timeout(240)
def test_non_finite_updates_are_skipped_then_stop_the_run_before_a_nan_is_saved(
        tmp_path, run_with_faulty_loss):
    # 8 optimiser steps a batch: the 2nd batch skips its first 2, the 3rd its first 3 and stops
    result = run_with_faulty_loss(
        EXAMPLE, "control", "loss_critic", [9, 10], 17,
        [*SMALL, "--frames", "4096", "--dual", "adaptive", "--checkpoint-every", "1024",
         "--eval-every", "1000000", "--out", str(tmp_path)])
    assert result.returncode == 1, result.stderr[-3000:]
    ckpt_path = tmp_path / "checkpoint.pt"
    assert result.stderr.strip().splitlines()[-1] == (
        "dmc_walker.py: error: 3 optimiser steps in a row had a non-finite loss or gradient norm: "
        "loss_critic nan, grad_norm nan; training stopped in the batch after frame 2048; "
        f"{ckpt_path} holds the run at that frame")
    assert "skipped an optimiser step (2 so far, 2 in a row; 3 in a row stop training): " \
           "non-finite loss_critic nan, grad_norm nan" in result.stderr
    rows = read_curve(tmp_path)
    assert [(r["frames"], r["skipped_steps"]) for r in rows] == [("1024", "0"), ("2048", "2")]
    assert float(rows[-1]["loss_critic"]) > 0  # the mean over the steps taken: finite
    ckpt = read_checkpoint(ckpt_path)  # checks every tensor finite
    assert ckpt["frames"] == 2048
    assert ckpt["scheduler"]["num_steps"] == 14  # the dual did not step on the skipped ones


@pytest.mark.timeout(240)
def test_reward_normalisation_statistics_are_checkpointed_and_resumed(tmp_path):
    first = run_example("--frames", "2048", "--normalize-reward", "--time-limit", "0.001",
                        "--eval-every", "1000000", "--out", str(tmp_path))  # one batch
    assert first.returncode == 0, first.stderr[-3000:]
    stats = read_checkpoint(tmp_path / "checkpoint.pt")["reward_norm"]
    assert stats["stats.count"].item() == 1024 and stats["stats.var"].item() > 0
    result = run_example("--frames", "2048", "--normalize-reward", "--resume",
                         "--eval-every", "1000000", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = read_checkpoint(tmp_path / "checkpoint.pt")["reward_norm"]
    assert resumed["stats.count"].item() == 2048  # the first batch's returns, and one more
    refused = run_example("--frames", "3072", "--resume", "--out", str(tmp_path))
    assert refused.returncode != 0 and "normalize_reward=True" in refused.stderr


@pytest.mark.timeout(300)
def test_a_longer_budget_continues_the_learning_rate_and_the_clock_on_resume(tmp_path):
    first = run_example("--frames", "2048", "--time-limit", "0.001", "--eval-every", "1000000",
                        "--out", str(tmp_path))  # stops after one batch
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["frames"] == 1024
    # a stop at --time-limit ends with the final evaluation
    assert [int(r["frames"]) for r in read_final_eval(tmp_path)] == [1024, 1024]
    assert 0 < ckpt["time_s"] == pytest.approx(float(read_curve(tmp_path)[0]["time_s"]), abs=0.01)
    ckpt["time_s"] = 1000.0  # as if the first process had trained for 1000 s
    save_checkpoint(tmp_path / "checkpoint.pt", ckpt)
    result = run_example("--frames", "3072", "--resume", "--eval-every", "1000000",
                         "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_curve(tmp_path)
    assert [int(r["frames"]) for r in rows] == [1024, 2048, 3072]
    # 3e-4 annealed to 0 at 2048 reached 1.5e-4 at 1024; from there it anneals to 0 at 3072
    assert [float(r["lr"]) for r in rows] == pytest.approx([3e-4, 1.5e-4, 7.5e-5], rel=1e-9)
    times = [float(r["time_s"]) for r in rows]
    assert times[0] < 1000 < times[1] < times[2]  # the clock counts on from the checkpoint's
    final = FINAL_LINE.search(result.stdout).groups()
    assert final[2:] == ("2", "3072") and len(read_final_eval(tmp_path)) == 2
    # a finished run resumed: nothing to train, the same final evaluation of its policy
    again = run_example("--frames", "3072", "--resume", "--out", str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to train" in again.stdout and FINAL_LINE.search(again.stdout).groups() == final
    # the schedule has reached 0: a longer budget would not learn, and is refused by name
    refused = run_example("--frames", "4096", "--resume", "--out", str(tmp_path))
    assert refused.returncode != 0
    assert "--resume with --frames 4096: the checkpoint's learning rate was annealed to 0 at " \
           "3072" in refused.stderr
    assert [int(r["frames"]) for r in read_curve(tmp_path)] == [1024, 2048, 3072]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("outer", [signal.default_int_handler, signal.SIG_IGN])
def test_a_stop_signal_during_the_bookkeeping_reaches_the_outer_handler_after_it(signum, outer):
    previous = signal.signal(signum, outer)  # default_int_handler: what stop_on_sigterm sets
    recorded = []
    try:
        with pytest.raises(KeyboardInterrupt) if outer is signal.default_int_handler \
                else contextlib.nullcontext():
            with interrupts_deferred():
                signal.raise_signal(signum)  # between a curve row and its state
                recorded += ["row", "state"]
        assert recorded == ["row", "state"]
        assert signal.getsignal(signum) is outer
    finally:
        signal.signal(signum, previous)


@pytest.mark.timeout(120)
def test_bad_settings_and_a_second_fresh_run_are_refused_by_name(tmp_path):
    # every flag's range is checked in process by tests/test_config.py; this is the script's
    result = run_example("--eval-every", "0", "--out", str(tmp_path / "bad"))
    assert result.returncode == 2 and "--eval-every must be >= 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "bad").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "curve.csv").write_text("frames\n1024\n")  # an earlier run's curve
    result = run_example("--frames", "1024", "--out", str(tmp_path / "run"))
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert (tmp_path / "run" / "curve.csv").read_text() == "frames\n1024\n"
    result = run_example("--frames", "1024", "--eval-every", "1024", "--overwrite",
                         "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [int(r["frames"]) for r in read_curve(tmp_path / "run")] == [1024]


def test_a_missing_ray_names_the_extra(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "ray" else find_spec(name, *args))
    cfg = ControlConfig(collector="ray")
    with pytest.raises(ImportError, match=re.escape("pip install 'torchrl_r2vpo[ray]'")):
        control.make_collector(cfg, actor=None, total_frames=cfg.frames_per_batch, seed=0)


def test_evaluation_in_a_single_environment():
    env = make_env("cartpole-balance", num_envs=1, seed=0)  # not batched
    actor, _, _ = control.make_agent(env, env.observation_spec["observation"].shape[-1],
                                     env.action_spec.shape[-1])
    assert 0 < control.evaluate(env, actor) <= 1000  # one 1000-step episode of rewards in [0, 1]


@pytest.mark.timeout(180)
def test_a_checkpoint_reloads_the_policy_its_final_evaluation_measured(tmp_path):
    result = run_example("--frames", "2048", "--eval-every", "100000", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    final = float(read_curve(tmp_path)[-1]["eval_return"])  # the run's only evaluation
    episode_returns, eval_seed = control.episode_returns, control.eval_seed
    env = make_env("walker-walk", num_envs=2)
    cfg, actor = control.load_actor(tmp_path / "checkpoint.pt", env)
    assert (cfg.env, cfg.frames, cfg.final_eval_episodes) == ("walker-walk", 2048, 2)
    env.set_seed(eval_seed(cfg, 2048))  # fresh environments, the run's evaluation starts
    returns = episode_returns(env, actor)
    assert returns.shape == (2,)
    assert returns.mean().item() == pytest.approx(final, rel=1e-5)
    saved = torch.tensor([float(r["return"]) for r in read_final_eval(tmp_path)])
    torch.testing.assert_close(returns, saved)
    # each evaluation has its own starts, whatever ran before it: a resumed run keeps them
    env.set_seed(eval_seed(cfg, 1024))
    earlier = episode_returns(env, actor)
    env.set_seed(eval_seed(cfg, 2048))
    torch.testing.assert_close(episode_returns(env, actor), returns)
    assert not torch.equal(earlier, returns)


@pytest.mark.timeout(180)
def test_frame_skip_counts_simulator_steps_and_evaluates_with_the_same_repeat(tmp_path):
    """--frame-skip 4: batches of 1024 simulator steps are 256 transitions; the final
    evaluation and a reloaded checkpoint step the environments with the same repeat, and
    the 64-start benchmark evaluation reads it from the checkpoint (with the run's actor: a
    state-independent scale and RPO's noise here)."""
    result = run_example("--env", "cartpole-swingup", "--frame-skip", "4", "--frames", "2048",
                         "--eval-every", "100000", "--minibatch-size", "128",
                         "--state-independent-scale", "--initial-scale", "2", "--rpo-alpha", "0.5",
                         "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_curve(tmp_path)
    assert [int(r["frames"]) for r in rows] == [1024, 2048]
    counts = [v for k, v in read_checkpoint(tmp_path / "checkpoint.pt")["loss"].items()
              if k.endswith("count")]  # the observation normaliser saw every transition once
    assert counts and all(int(count) == 2 * 256 for count in counts)
    env = make_env("cartpole-swingup", num_envs=2, frame_skip=4)
    cfg, actor = control.load_actor(tmp_path / "checkpoint.pt", env)
    assert cfg.frame_skip == 4 and cfg.state_independent_scale and cfg.rpo_alpha == 0.5
    env.set_seed(control.eval_seed(cfg, 2048))
    saved = torch.tensor([float(r["return"]) for r in read_final_eval(tmp_path)])
    torch.testing.assert_close(control.episode_returns(env, actor), saved)
    unskipped = make_env("cartpole-swingup", num_envs=2)
    unskipped.set_seed(control.eval_seed(cfg, 2048))
    assert not torch.equal(control.episode_returns(unskipped, actor), saved)
    spec = importlib.util.spec_from_file_location(
        "dmc_compare", EXAMPLE.parents[1] / "benchmarks" / "dmc_compare.py")
    dmc_compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dmc_compare)
    env = make_env("cartpole-swingup", num_envs=2, frame_skip=4, seed=dmc_compare.STARTS_SEED)
    starts = dmc_compare.final_starts(tmp_path, "cartpole-swingup", 2)
    torch.testing.assert_close(torch.as_tensor(starts, dtype=torch.float32),
                               control.episode_returns(env, actor))


@pytest.mark.parametrize("independent", [False, True])
def test_the_actor_explores_with_its_initial_scale(independent):
    env = make_env("cartpole-balance", num_envs=64, seed=0)
    actor, _, _ = control.make_agent(env, 5, 1, initial_scale=2.5,
                                     state_independent_scale=independent)
    scale = actor(env.reset())["scale"]
    assert scale.shape == (64, 1)
    if independent:  # one parameter, exp(log 2.5), whatever the state
        assert scale.unique().tolist() == [pytest.approx(2.5)]
        assert dict(actor.named_parameters()).keys() & {
            "module.0.module.2.state_independent_scale"}
    else:  # softplus(x + b) of the network's output x, small at initialisation
        assert scale.std() > 0 and scale.mean().item() == pytest.approx(2.5, rel=0.15)


def test_rpo_noise_perturbs_the_mean_only_inside_the_update():
    """UpdateMeanNoise: the actor's log-probabilities are those of the plain actor outside
    active() (collection, evaluation), and of a mean moved by at most alpha inside it, fresh
    noise on each call."""
    from torchrl_r2vpo.modules import UpdateMeanNoise

    env = make_env("cartpole-balance", num_envs=8, seed=0)
    torch.manual_seed(0)
    plain, _, _ = control.make_agent(env, 5, 1)
    torch.manual_seed(0)
    actor, _, _ = control.make_agent(env, 5, 1, rpo_alpha=0.5)
    noise = next(m for m in actor.modules() if isinstance(m, UpdateMeanNoise))
    td = plain(env.reset())
    torch.testing.assert_close(actor.get_dist(td).log_prob(td["action"]),
                               plain.get_dist(td).log_prob(td["action"]))
    with noise.active():
        first, second = actor(td.clone())["loc"], actor(td.clone())["loc"]
        assert not torch.equal(first, second)
        assert ((first - td["loc"]).abs() <= 0.5).all() and (first != td["loc"]).all()
    with pytest.raises(RuntimeError), noise.active():  # off again, whatever ends the block
        raise RuntimeError
    torch.testing.assert_close(actor(td.clone())["loc"], td["loc"])
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        UpdateMeanNoise(-1)


def test_compiled_step_is_static_and_its_optimiser_resumes_an_eager_one(monkeypatch):
    action = Bounded(-1.0, 1.0, shape=(2,))  # what make_agent reads of an env
    spec = SimpleNamespace(full_action_spec_unbatched=Composite(action=action),
                           action_spec_unbatched=action)
    loss, _ = control.make_loss(ControlConfig(), *control.make_agent(spec, 3, 2)[:2])
    compiled = {}
    monkeypatch.setattr(update, "compile_with_warmup",
                        lambda fn, **kwargs: compiled.update(kwargs) or fn)
    update.make_update(loss, control.make_optimizer(loss, 1e-3, compile=True), 0.5, compile=True)
    # one graph per network size, never a dynamic one; no CUDA graphs on the CPU
    assert compiled == {"warmup": 1, "mode": None, "dynamic": False}

    eager = control.make_optimizer(loss, 1e-3)
    sum(p.square().sum() for p in loss.parameters()).backward()
    eager.step()
    resumed = control.make_optimizer(loss, 1e-3, compile=True)
    lr = resumed.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.device == next(loss.parameters()).device
    control.load_optimizer_state(resumed, eager.state_dict())
    # the compiled run keeps its tensor learning rate (filled in place when annealed) ...
    group = resumed.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["capturable"] is False
    assert float(group["lr"]) == pytest.approx(1e-3)
    # ... and the eager run's moments and step count
    for param in loss.parameters():
        assert torch.equal(resumed.state[param]["exp_avg"], eager.state[param]["exp_avg"])
        assert float(resumed.state[param]["step"]) == 1
    back = control.make_optimizer(loss, 1e-3)
    control.load_optimizer_state(back, resumed.state_dict())
    assert back.param_groups[0]["lr"] == 1e-3  # and an eager resume gets its float back
    # fused on the CPU, also when resuming a checkpoint of an unfused optimiser
    assert back.param_groups[0]["fused"] is True
    unfused = torch.optim.Adam(loss.parameters(), lr=1e-3, eps=1e-5)
    control.load_optimizer_state(back, unfused.state_dict())
    assert back.param_groups[0]["fused"] is True and back.param_groups[0]["foreach"] is None
    tensor_lr = resumed.param_groups[0]["lr"]
    control.set_lr(resumed, 5e-4)  # annealing: in place where the learning rate is a tensor
    control.set_lr(back, 5e-4)
    assert resumed.param_groups[0]["lr"] is tensor_lr and float(tensor_lr) == pytest.approx(5e-4)
    assert back.param_groups[0]["lr"] == 5e-4
