"""examples/llm_math.py end to end as a script, and its pieces (torchrl_r2vpo.recipes.llm) in
process: every loss, learning, interruption and resume."""

from __future__ import annotations

import csv
import dataclasses
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torchrl.modules.llm import TransformersWrapper

from torchrl_r2vpo import LLM_LOSSES
from torchrl_r2vpo.collectors import collect_batch, TransformersBackend
from torchrl_r2vpo.data import group_advantages, PROXIMAL_LOG_PROBS_KEY, staleness_table
from torchrl_r2vpo.math_task import build_math_lm, build_math_tokenizer, load_math_lm
from torchrl_r2vpo.recipes import llm
from torchrl_r2vpo.recipes.config import flag, LLMConfig
from torchrl_r2vpo.recipes.run_state import (load_checkpoint, open_run_dir, read_checkpoint,
                                             save_checkpoint)
from torchrl_r2vpo.recipes.update import make_update, mean_metrics

EXAMPLE = Path(__file__).parents[1] / "examples" / "llm_math.py"
SMALL = dict(num_problems=64, num_test=16, num_prompts=4, group_size=4, max_new_tokens=6,
             minibatch_size=32, eval_every=32, checkpoint_every=32, rollouts=64)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = build_math_tokenizer()
    build_math_lm(tokenizer, hidden_size=32, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def settings(out: Path, model: str, **overrides) -> dict:
    return {**SMALL, "model": model, "out": str(out), **overrides}


def command(**settings) -> list[str]:
    """The example's command line for these settings (booleans as --flag / --no-flag)."""
    args = []
    for name, value in settings.items():
        if isinstance(value, bool):
            args.append(flag(name) if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag(name), str(value)]
    return [sys.executable, str(EXAMPLE), *args]


def run_example(**settings) -> subprocess.CompletedProcess:
    result = subprocess.run(command(**settings), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_curve(out: Path) -> list[dict]:
    with open(out / "curve.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def half_run(tmp_path_factory, tiny_model) -> tuple[Path, dict]:
    """An R2VPO run with reuse, policy lag and the KL penalty, stopped at half of SMALL's
    budget."""
    half = settings(tmp_path_factory.mktemp("half"), tiny_model, reuse=1, lag=1, kl_to_ref=0.1,
                    rollouts=32)
    run_example(**half)
    return Path(half["out"]), half


def test_a_run_writes_its_outputs(half_run):
    out, _ = half_run
    rows = read_curve(out)
    assert [int(r["rollouts"]) for r in rows] == [16, 32]
    assert all(r["lagrange_multiplier"] != "" and r["kl_to_ref"] != "" for r in rows)
    assert (out / "curve.png").stat().st_size > 0 and (out / "checkpoint.pt").exists()
    assert (out / "logs" / "r2vpo-seed0" / "scalars" / "stale1" / "ratio_var.csv").exists()
    # one row per iteration and data age: --lag 1 samples the second batch with version 0
    with open(out / "staleness.csv") as f:
        staleness = list(csv.DictReader(f))
    assert [(int(r["rollouts"]), int(r["age"]), int(r["tokens"]) > 0) for r in staleness] == [
        (16, 0, True), (32, 1, True)]
    # fresh data: pi_prox is the sampler (w = 1 up to the generation's arithmetic); stale: not
    assert abs(float(staleness[0]["weight_max"]) - 1) < 1e-3 < float(staleness[1]["weight_max"]) - 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["scheduler"]["num_steps"] == 2  # the dual steps once per iteration
    assert [v for v, _ in ckpt["sampler"]["snapshots"]] == [1, 2] and ckpt["sampler"]["version"] == 1


@pytest.mark.parametrize("loss", sorted(LLM_LOSSES))
def test_every_loss_trains_on_the_examples_data(tiny_model, tmp_path, loss):
    """One iteration of the example's loop, from its recipes."""
    cfg = LLMConfig(**settings(tmp_path, tiny_model, loss=loss, reuse=1))
    model, tokenizer = load_math_lm(cfg.model)
    env, test = llm.make_task(cfg, model, tokenizer)
    assert len(test) == cfg.num_test
    scorer = TransformersWrapper(model, tokenizer=tokenizer, input_mode="tokens", generate=False,
                                 return_log_probs=True, pad_output=True)
    loss_module, scheduler = llm.make_loss(cfg, scorer)
    assert (scheduler is not None) == (loss == "r2vpo")
    update = make_update(loss_module, torch.optim.AdamW(model.parameters(), lr=cfg.lr),
                         cfg.max_grad_norm, clip_groups=[model.parameters()])
    backend = TransformersBackend(model, tokenizer, max_new_tokens=cfg.max_new_tokens)
    batch = collect_batch(env, backend, policy_version=0)
    batch["advantage"] = group_advantages(batch["next", "reward"], cfg.group_size)
    batch[PROXIMAL_LOG_PROBS_KEY] = llm.sequence_log_probs(model, batch, chunk=5)
    metrics = mean_metrics([update(batch)])
    assert torch.isfinite(torch.tensor(metrics["loss_objective"])) and metrics["grad_norm"] > 0
    assert ("lagrange_multiplier" in metrics) == (loss == "r2vpo")
    sums, ratio, mask, age = llm.update_staleness(model, batch, version=1, chunk=5)
    assert list(staleness_table(sums)) == [1] and (age == 1).all()  # one update old
    assert staleness_table(sums)[1]["tokens"] == mask.sum()


def test_a_baseline_runs_through_the_example(tmp_path, tiny_model):
    result = run_example(**settings(tmp_path, tiny_model, loss="grpo", rollouts=32, reuse=1))
    rows = read_curve(tmp_path)
    assert [int(r["rollouts"]) for r in rows] == [16, 32] and rows[-1]["lagrange_multiplier"] == ""
    assert "held-out accuracy before training: " in result.stdout
    assert "held-out accuracy after training: " in result.stdout
    assert (tmp_path / "logs" / "grpo-seed0" / "scalars" / "stale1" / "ratio_var.csv").exists()


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, half_run):
    out, half = half_run
    straight = run_example(**{**half, "out": str(tmp_path / "a"), "rollouts": 64})
    shutil.copytree(out, tmp_path / "b")
    resumed = run_example(**{**half, "out": str(tmp_path / "b"), "rollouts": 64, "resume": True})
    a, b = read_curve(tmp_path / "a"), read_curve(tmp_path / "b")
    assert [int(r["rollouts"]) for r in b] == [16, 32, 48, 64]
    for key in ("train_reward", "lagrange_multiplier", "ratio_var", "kl_to_ref", "test_accuracy"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    # the lagged sampler's weights resume too
    assert (tmp_path / "a" / "staleness.csv").read_text() == (tmp_path / "b" / "staleness.csv").read_text()

    def last_line(result):
        return result.stdout.strip().splitlines()[-1]

    assert last_line(resumed) == last_line(straight).replace(str(tmp_path / "a"), str(tmp_path / "b"))


def test_resumed_time_counts_on_from_the_checkpoints(tmp_path, half_run):
    out, half = half_run
    shutil.copytree(out, tmp_path / "run")
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert 0 < ckpt["time_s"] == pytest.approx(float(read_curve(out)[-1]["time_s"]), abs=0.01)
    ckpt["time_s"] = 1000.0  # as if the first process had trained for 1000 s
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", ckpt)
    run_example(**{**half, "out": str(tmp_path / "run"), "rollouts": 48, "resume": True})
    times = [float(r["time_s"]) for r in read_curve(tmp_path / "run")]
    assert len(times) == 3 and times[0] < times[1] < 1000 < times[2]


@pytest.mark.timeout(300)
def test_non_finite_updates_are_skipped_then_stop_the_run_before_a_nan_is_saved(
        tmp_path, tiny_model, run_with_faulty_loss):
    # minibatches of 32 over the 16, 32, 48, 48, ... stored completions: optimiser steps 1, 2,
    # 3-4, 5-6, 7-8; the 2nd iteration skips its step, the 4th both, the 5th stops at step 7
    run = settings(tmp_path, tiny_model, rollouts=80)
    result = run_with_faulty_loss(EXAMPLE, "llm", "loss_objective", [2], 5, command(**run)[2:])
    assert result.returncode == 1, result.stderr[-3000:]
    ckpt_path = tmp_path / "checkpoint.pt"
    assert result.stderr.strip().splitlines()[-1] == (
        "llm_math.py: error: 3 optimiser steps in a row had a non-finite loss or gradient norm: "
        "loss_objective nan, grad_norm nan; training stopped in the iteration after 64 rollouts; "
        f"{ckpt_path} holds the run there")
    assert "skipped an optimiser step (1 so far, 1 in a row; 3 in a row stop training)" in result.stderr
    rows = read_curve(tmp_path)
    assert [(r["rollouts"], r["skipped_steps"]) for r in rows] == [
        ("16", "0"), ("32", "1"), ("48", "0"), ("64", "2")]
    assert rows[1]["loss_objective"] == rows[3]["loss_objective"] == ""  # no step taken
    ckpt = read_checkpoint(ckpt_path)  # checks every tensor finite
    assert ckpt["rollouts"] == 64
    assert ckpt["scheduler"]["num_steps"] == 2  # the dual stepped after iterations 1 and 3 only


@pytest.mark.timeout(300)
def test_a_stop_signal_saves_the_last_complete_iteration(tmp_path, tiny_model):
    run = settings(tmp_path, tiny_model, rollouts=16 * 10_000, checkpoint_every=100_000,
                   eval_every=100_000)
    proc = subprocess.Popen(command(**run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "curve.csv").exists() or len(read_curve(tmp_path)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # as a job scheduler or `timeout` would
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "checkpoint saved" in stdout and proc.returncode == 0, stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    rollouts = ckpt["rollouts"]
    assert rollouts == int(read_curve(tmp_path)[-1]["rollouts"]) and ckpt["version"] == rollouts // 16
    result = run_example(**{**run, "rollouts": rollouts + 32, "resume": True})
    lam = float(ckpt["loss"]["lagrange_multiplier"])
    stored = min(rollouts, 3 * 16)  # --reuse 2: the last three batches
    assert f"resumed at {rollouts} rollouts: lambda {lam:.9g}, {stored} stored completions" in result.stdout
    assert [int(r["rollouts"]) for r in read_curve(tmp_path)] == list(range(16, rollouts + 33, 16))


def test_resume_refuses_a_changed_setting(half_run):
    out, half = half_run
    saved = LLMConfig(**{**half, "resume": True})
    # each would change the stored batches' layout, their content, the training itself,
    # or the held-out problems the accuracy before training was measured on
    for change, message in ((dict(reuse=0), "reuse=1"), (dict(lag=0), "lag=1"),
                            (dict(max_new_tokens=8), "max_new_tokens=6"),
                            (dict(kl_to_ref=0.0), "kl_to_ref=0.1"), (dict(lr=1e-3), "lr=0.0001"),
                            (dict(num_test=8), "num_test=16")):
        with pytest.raises(ValueError, match=message):
            load_checkpoint(out / "checkpoint.pt", dataclasses.replace(saved, **change))
    # what only schedules evaluation or names the budget may change
    ckpt = load_checkpoint(out / "checkpoint.pt", dataclasses.replace(saved, rollouts=64, eval_every=1000))
    assert ckpt["rollouts"] == 32
    with pytest.raises(FileExistsError, match="--overwrite"):  # an earlier run is kept
        open_run_dir(out, resume=False, overwrite=False)


def test_lambda_max_and_entropy_coeff_reach_the_loss(tmp_path, tiny_model):

    def scheduler(**overrides):
        cfg = LLMConfig(**settings(tmp_path, tiny_model, **overrides))
        tokenizer = build_math_tokenizer()
        _, dual = llm.make_loss(cfg, TransformersWrapper(
            build_math_lm(tokenizer, hidden_size=32), tokenizer=tokenizer, input_mode="tokens",
            generate=False, return_log_probs=True, pad_output=True))
        return dual

    assert scheduler().max_value == 2.5 and scheduler(lambda_max=0.0).max_value is None
    loss, _ = llm.make_loss(LLMConfig(loss="grpo", entropy_coeff=0.0), None)
    assert not loss.entropy_bonus
    assert llm.make_loss(LLMConfig(loss="grpo"), None)[0].entropy_coeff == 0.01
    capped = scheduler(lambda_max=3.0)
    assert capped.max_value == 3.0
    capped.step(1e6)  # far above delta
    assert capped.multiplier.item() == 3.0


def test_a_missing_transformers_names_the_extra():
    hide = ("import importlib.util as u, runpy, sys; find = u.find_spec; "
            "u.find_spec = lambda name, *a: None if name == 'transformers' else find(name, *a); "
            "sys.argv = [sys.argv[1]]; runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide, str(EXAMPLE)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "pip install 'torchrl_r2vpo[llm]'" in result.stderr


def test_training_raises_the_reward_on_a_toy_task(tmp_path):
    # the shipped model on 8 problems asked again and again: RL can memorise their answers
    run_example(out=str(tmp_path), task="arithmetic", num_problems=8, num_test=16, num_prompts=8,
                group_size=8, rollouts=512, reuse=0, eval_every=10_000, checkpoint_every=10_000)
    reward = [float(r["train_reward"]) for r in read_curve(tmp_path)]
    assert len(reward) == 8
    assert sum(reward[-2:]) / 2 > sum(reward[:2]) / 2 + 0.2, reward


def test_a_lagged_policy_samples_with_the_weights_of_lag_updates_ago():
    model = torch.nn.Linear(1, 1, bias=False)
    lagged = llm.LaggedPolicy(model, lag=2)
    seen = []
    for version in range(1, 6):  # the trainer's weight is its version
        seen.append((lagged.version, lagged.model.weight.item()))
        model.weight.data.fill_(float(version))
        lagged.push(model, version)
    assert seen == [(0, seen[0][1]), (0, seen[0][1]), (0, seen[0][1]), (1, 1.0), (2, 2.0)]
    again = llm.LaggedPolicy(model, lag=2)
    again.load_state_dict(lagged.state_dict())
    assert again.version == 3 and again.model.weight.item() == 3.0
    current = llm.LaggedPolicy(model, lag=0)  # no lag: the model itself
    assert current.model is model
