"""examples/llm_math.py end to end, in process: every loss, learning, interruption and resume."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from torchrl.modules.llm import TransformersWrapper

from torchrl_r2vpo import LLM_LOSSES
from torchrl_r2vpo.modules.math_lm import build_math_lm, build_math_tokenizer

EXAMPLE = Path(__file__).parents[1] / "examples" / "llm_math.py"
sys.path.insert(0, str(EXAMPLE.parent))  # as when run as a script: its helpers sit beside it
SPEC = importlib.util.spec_from_file_location("llm_math", EXAMPLE)
llm_math = sys.modules["llm_math"] = importlib.util.module_from_spec(SPEC)  # dataclasses need it
SPEC.loader.exec_module(llm_math)


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # the example sets its own (--threads)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = build_math_tokenizer()
    build_math_lm(tokenizer, hidden_size=32, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def config(out: Path, model: str, **overrides) -> llm_math.Config:
    small = dict(model=model, out=str(out), num_problems=64, num_test=16, num_prompts=4,
                 group_size=4, max_new_tokens=6, minibatch_size=32, eval_every=32,
                 checkpoint_every=32, rollouts=64)
    return llm_math.Config(**{**small, **overrides})


def read_curve(out: Path) -> list[dict]:
    with open(out / "curve.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("loss", sorted(LLM_LOSSES))
def test_every_loss_trains_through_the_example(tmp_path, tiny_model, loss):
    result = llm_math.main(config(tmp_path, tiny_model, loss=loss, rollouts=32, reuse=1))
    rows = read_curve(tmp_path)
    assert [int(r["rollouts"]) for r in rows] == [16, 32] and result["rollouts"] == 32
    assert all(torch.isfinite(torch.tensor(float(r["loss_objective"]))) for r in rows)
    assert (rows[-1]["lagrange_multiplier"] != "") == (loss == "r2vpo")
    assert (tmp_path / "curve.png").stat().st_size > 0 and (tmp_path / "checkpoint.pt").exists()
    scalars = tmp_path / "logs" / f"{loss}-seed0" / "scalars"
    assert (scalars / "stale1" / "ratio_var.csv").exists()  # the reused batch, one update old


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, tiny_model):
    straight = llm_math.main(config(tmp_path / "a", tiny_model, reuse=1, kl_to_ref=0.1))
    llm_math.main(config(tmp_path / "b", tiny_model, reuse=1, kl_to_ref=0.1, rollouts=32))
    resumed = llm_math.main(config(tmp_path / "b", tiny_model, reuse=1, kl_to_ref=0.1, resume=True))
    a, b = read_curve(tmp_path / "a"), read_curve(tmp_path / "b")
    assert [int(r["rollouts"]) for r in b] == [16, 32, 48, 64]
    for key in ("train_reward", "lagrange_multiplier", "ratio_var", "kl_to_ref", "test_accuracy"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert resumed["final_accuracy"] == straight["final_accuracy"]


def test_ctrl_c_saves_the_last_complete_iteration(tmp_path, tiny_model, monkeypatch, capsys):
    calls = {"n": 0}
    collect = llm_math.collect_batch

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return collect(*args, **kwargs)

    monkeypatch.setattr(llm_math, "collect_batch", interrupted)
    result = llm_math.main(config(tmp_path, tiny_model, checkpoint_every=10_000))
    assert result == {"rollouts": 32, "interrupted": True}
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["rollouts"] == 32 and ckpt["version"] == 2
    monkeypatch.setattr(llm_math, "collect_batch", collect)
    llm_math.main(config(tmp_path, tiny_model, resume=True))
    lam = float(ckpt["loss"]["lagrange_multiplier"])
    assert f"resumed at 32 rollouts: lambda {lam:.9g}, 32 stored completions" in capsys.readouterr().out
    assert [int(r["rollouts"]) for r in read_curve(tmp_path)] == [16, 32, 48, 64]


def test_resume_refuses_a_changed_setting(tmp_path, tiny_model):
    llm_math.main(config(tmp_path, tiny_model, rollouts=16))
    # each would change the stored batches' layout, their content, the training itself,
    # or the held-out problems the accuracy before training was measured on
    for change, saved in ((dict(reuse=0), "reuse=2"), (dict(max_new_tokens=8), "max_new_tokens=6"),
                          (dict(kl_to_ref=0.1), "kl_to_ref=0.0"), (dict(lr=1e-3), "lr=0.0001"),
                          (dict(num_test=8), "num_test=16")):
        with pytest.raises(ValueError, match=saved):
            llm_math.main(config(tmp_path, tiny_model, resume=True, rollouts=32, **change))
    # what only schedules evaluation or names the budget may change
    result = llm_math.main(config(tmp_path, tiny_model, resume=True, rollouts=32, eval_every=1000))
    assert result["rollouts"] == 32


def test_lambda_max_and_entropy_coeff_reach_the_loss(tmp_path, tiny_model):

    def scheduler(**overrides):
        cfg = config(tmp_path, tiny_model, **overrides)
        tokenizer = build_math_tokenizer()
        _, dual = llm_math.make_loss(cfg, TransformersWrapper(
            build_math_lm(tokenizer, hidden_size=32), tokenizer=tokenizer, input_mode="tokens",
            generate=False, return_log_probs=True, pad_output=True))
        return dual

    assert scheduler().max_value is None
    loss, _ = llm_math.make_loss(config(tmp_path, tiny_model, loss="grpo", entropy_coeff=0.0), None)
    assert not loss.entropy_bonus
    assert llm_math.make_loss(config(tmp_path, tiny_model, loss="grpo"), None)[0].entropy_coeff == 0.01
    capped = scheduler(lambda_max=3.0)
    assert capped.max_value == 3.0
    capped.step(1e6)  # far above delta
    assert capped.multiplier.item() == 3.0


def test_a_missing_transformers_names_the_extra(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "transformers" else find_spec(name, *args))
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("bare", EXAMPLE))
    with pytest.raises(SystemExit, match=r"pip install 'torchrl_r2vpo\[llm\]'"):
        module.__spec__.loader.exec_module(module)


def test_settings_that_cannot_train_are_refused_by_name(tmp_path, tiny_model):
    for overrides, message in ((dict(group_size=1), "--group-size must be >= 2"),
                               (dict(rollouts=40), "multiple of --num-prompts x --group-size = 16"),
                               (dict(eval_every=0), "--eval-every must be >= 1"),
                               (dict(lambda_max=0.5), r"--lambda-max must be 0 \(no cap\) or >= "
                                                      "--lagrange-multiplier 1.0, got 0.5")):
        with pytest.raises(ValueError, match=message):
            config(tmp_path, tiny_model, **overrides)
    llm_math.main(config(tmp_path, tiny_model, rollouts=16))
    with pytest.raises(FileExistsError, match="--overwrite"):  # an earlier run is kept
        llm_math.main(config(tmp_path, tiny_model, rollouts=16))
    with pytest.raises(ValueError, match="not both"):
        llm_math.main(config(tmp_path, tiny_model, resume=True, overwrite=True))


def test_training_raises_the_reward_on_a_toy_task(tmp_path):
    # the shipped model on 8 problems asked again and again: RL can memorise their answers
    cfg = llm_math.Config(out=str(tmp_path), num_problems=8, num_test=16, num_prompts=8,
                          group_size=8, rollouts=512, reuse=0, eval_every=10_000,
                          checkpoint_every=10_000)
    llm_math.main(cfg)
    reward = [float(r["train_reward"]) for r in read_curve(tmp_path)]
    assert len(reward) == 8
    assert sum(reward[-2:]) / 2 > sum(reward[:2]) / 2 + 0.2, reward
