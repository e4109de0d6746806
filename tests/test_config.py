"""The examples' settings (torchrl_r2vpo.recipes.config): flags, defaults, the Playground preset,
and the validation of every value, parsed in process."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import pytest

from torchrl_r2vpo.math_task import ADDITION_MODEL_PATH, DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODEL_PATH
from torchrl_r2vpo.recipes.config import (ConfigError, ControlConfig, flag, LLMConfig, parse,
                                          PLAYGROUND, validate)

# the flags and defaults of the examples before their settings moved here: they stay
CONTROL_DEFAULTS = dict(
    env="walker-walk", loss="r2vpo", frames=500_000, seed=0, device="cpu", compile=False,
    num_envs=16, num_workers=2, collector="process", frames_per_batch=4096, frame_skip=1,
    minibatch_size=256,
    epochs=10, lr=3e-4, gamma=0.99, gae_lambda=0.95, reward_scale=1.0, normalize_reward=False,
    entropy_coeff=0.0,
    initial_scale=1.0, state_independent_scale=False, rpo_alpha=0.0, critic_coeff=0.5,
    max_grad_norm=0.5,
    clip_epsilon=0.2, lagrange_multiplier=1.0,
    ratio_var_target=0.02, dual="fixed", dual_lr=1.0, reuse=0, ratio="proximal",
    max_behaviour_weight=2.0, weighted_variance=True, eval_every=50_000,
    eval_episodes=4, final_eval_episodes=16, checkpoint_every=50_000, time_limit=0.0, logger="csv",
    out="runs/dmc_walker", resume=False, overwrite=False, video=True)
LLM_DEFAULTS = dict(
    task="reversed-addition", model="", backend="transformers", device="cpu", threads=1,
    loss="r2vpo", rollouts=32768, seed=0, difficulty="", num_problems=0, num_test=1024,
    num_prompts=16,
    group_size=8, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, reuse=2, lag=0, epochs=1,
    minibatch_size=32, lr=1e-4, max_grad_norm=1.0, lagrange_multiplier=1.0, ratio_var_target=0.01,
    dual="adaptive", dual_lr=10.0, dual_every="iteration", lambda_max=2.5, ratio="proximal",
    variance_center="mean", weighted_variance=True, max_behaviour_weight=2.0, kl_to_ref=0.0, entropy_coeff=0.01,
    eval_every=4096, checkpoint_every=4096, logger="csv", out="runs/llm_math", resume=False,
    overwrite=False)

# a value out of range for every numeric flag: (settings, field, value, what the error says)
BAD = [(ControlConfig, name, value, message) for name, value, message in [
    ("frames", "0", ">= 1"), ("seed", "-1", ">= 0"), ("num_envs", "0", ">= 1"),
    ("num_workers", "0", ">= 1"), ("frames_per_batch", "0", ">= 1"), ("frame_skip", "0", ">= 1"),
    ("minibatch_size", "0", ">= 1"), ("epochs", "0", ">= 1"), ("lr", "0", "> 0"),
    ("lr", "-3e-4", "> 0"), ("lr", "nan", "finite"), ("lr", "inf", "finite"),
    ("gamma", "1.5", "in [0, 1]"), ("gamma", "-0.1", "in [0, 1]"),
    ("gae_lambda", "1.01", "in [0, 1]"), ("reward_scale", "0", "> 0"),
    ("entropy_coeff", "-0.01", ">= 0"), ("entropy_coeff", "inf", "finite"),
    ("initial_scale", "0", "> 0"), ("rpo_alpha", "-0.5", ">= 0"), ("critic_coeff", "-1", ">= 0"), ("max_grad_norm", "-1", "> 0"),
    ("max_grad_norm", "0", "> 0"),
    ("clip_epsilon", "0", "> 0"), ("lagrange_multiplier", "-0.5", ">= 0"),
    ("lagrange_multiplier", "nan", "finite"), ("ratio_var_target", "-0.02", ">= 0"),
    ("dual_lr", "-1", ">= 0"), ("reuse", "-1", ">= 0"), ("max_behaviour_weight", "-1", ">= 0"),
    ("max_behaviour_weight", "nan", "finite"), ("eval_every", "0", ">= 1"),
    ("eval_episodes", "0", ">= 1"), ("final_eval_episodes", "0", ">= 1"),
    ("final_eval_episodes", "-16", ">= 1"), ("checkpoint_every", "0", ">= 1"),
    ("time_limit", "-1", ">= 0"), ("time_limit", "inf", "finite"),
]] + [(LLMConfig, name, value, message) for name, value, message in [
    ("threads", "0", ">= 1"), ("rollouts", "0", ">= 1"), ("seed", "-1", ">= 0"),
    ("num_problems", "-1", ">= 0"), ("num_test", "0", ">= 1"), ("num_prompts", "0", ">= 1"),
    ("group_size", "1", ">= 2"), ("max_new_tokens", "0", ">= 1"), ("reuse", "-1", ">= 0"),
    ("lag", "-1", ">= 0"), ("max_behaviour_weight", "-2", ">= 0"), ("epochs", "0", ">= 1"),
    ("minibatch_size", "0", ">= 1"), ("lr", "0", "> 0"),
    ("lr", "nan", "finite"), ("max_grad_norm", "-1", "> 0"),
    ("lagrange_multiplier", "-1", ">= 0"), ("ratio_var_target", "-0.01", ">= 0"),
    ("dual_lr", "-10", ">= 0"), ("dual_lr", "inf", "finite"), ("lambda_max", "-1", ">= 0"),
    ("kl_to_ref", "-0.1", ">= 0"), ("entropy_coeff", "-0.01", ">= 0"),
    ("entropy_coeff", "nan", "finite"), ("eval_every", "0", ">= 1"),
    ("checkpoint_every", "0", ">= 1"),
]]


def numeric_fields(config_cls) -> set[str]:
    hints = typing.get_type_hints(config_cls)  # without Annotated's extras: the bare types
    return {f.name for f in dataclasses.fields(config_cls) if hints[f.name] in (int, float)}


def refused(capsys, config_cls, args: list[str]) -> str:
    """The error of parsing ``args``, which must end the program with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        parse(config_cls, args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("config_cls", [ControlConfig, LLMConfig])
def test_every_numeric_flag_has_a_bad_value_below(config_cls):
    swept = {name for cls, name, _, _ in BAD if cls is config_cls}
    assert swept == numeric_fields(config_cls)


@pytest.mark.parametrize("config_cls, name, value, message", BAD,
                         ids=[f"{c.__name__}-{n}={v}" for c, n, v, _ in BAD])
def test_a_value_out_of_range_is_refused_by_name(capsys, config_cls, name, value, message):
    err = refused(capsys, config_cls, [flag(name), value])
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert f"error: {flag(name)} must be {message}, got " in err, err
    assert float(err.split(", got ")[-1]) == pytest.approx(float(value), nan_ok=True)


def test_the_error_is_one_argparse_like_line(capsys):
    err = refused(capsys, ControlConfig, ["--max-grad-norm", "-1"])
    assert err.endswith("error: --max-grad-norm must be > 0, got -1.0\n")


@pytest.mark.parametrize("config_cls, defaults", [(ControlConfig, CONTROL_DEFAULTS),
                                                  (LLMConfig, LLM_DEFAULTS)])
def test_the_defaults_and_flags_are_those_of_the_examples(config_cls, defaults):
    assert dataclasses.asdict(parse(config_cls, [])) == defaults
    for name, value in defaults.items():  # every flag, kebab-case; booleans both ways
        if isinstance(value, bool):
            args = [flag(name) if value else "--no-" + name.replace("_", "-")]
        else:
            args = [flag(name), str(value)]
        assert getattr(parse(config_cls, args), name) == value, args
    for name in (n for n, v in defaults.items() if isinstance(v, bool)):
        assert getattr(parse(config_cls, [flag(name)]), name) is True
        assert getattr(parse(config_cls, ["--no-" + name.replace("_", "-")]), name) is False


@pytest.mark.parametrize("config_cls", [ControlConfig, LLMConfig])
def test_help_lists_every_flag(capsys, config_cls):
    with pytest.raises(SystemExit) as exit_info:
        parse(config_cls, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(config_cls):
        assert f"{flag(field.name)} " in text or f"{flag(field.name)}," in text, field.name
        if field.type == "bool":
            assert "--no-" + field.name.replace("_", "-") in text


def test_playground_preset_is_shared_and_flags_given_win():
    dmc = parse(ControlConfig, [])
    assert (dmc.num_envs, dmc.lr, dmc.reward_scale, dmc.device) == (16, 3e-4, 1.0, "cpu")
    for loss in ("r2vpo", "ppo"):
        cfg = parse(ControlConfig, ["--env", "playground:WalkerWalk", "--loss", loss,
                                    "--epochs", "10", "--num-envs", "16"])
        assert (cfg.epochs, cfg.num_envs) == (10, 16)  # given, even where equal to the default
        for key, value in PLAYGROUND.items():
            if key not in ("epochs", "num_envs"):
                assert getattr(cfg, key) == value, key
    assert PLAYGROUND["frames_per_batch"] == 2048 * 30 * 16  # Brax: envs x unroll x 16 unrolls
    assert PLAYGROUND["frames_per_batch"] // PLAYGROUND["minibatch_size"] == 32
    # the preset's values are checked too, under the flags given
    assert parse(ControlConfig, ["--env", "playground:CheetahRun", "--no-video"]).frames == 60_000_000


@pytest.mark.parametrize("config_cls, args, message", [
    (ControlConfig, ["--device", "cuda"], "for playground: environments"),
    (ControlConfig, ["--num-envs", "24"],
     "multiple of --num-envs x --num-workers x --frame-skip = 48"),
    (ControlConfig, ["--frame-skip", "3"],
     "multiple of --num-envs x --num-workers x --frame-skip = 96"),
    (ControlConfig, ["--minibatch-size", "8192"], "--minibatch-size must be in [1, 4096]"),
    (ControlConfig, ["--frame-skip", "8", "--minibatch-size", "1024"],
     "--minibatch-size must be in [1, 512], the transitions of --frames-per-batch 4096 / "
     "--frame-skip 8"),
    (ControlConfig, ["--env", "playground:CartpoleSwingupSparse", "--frame-skip", "2"],
     "Playground tasks set their own control step"),
    (ControlConfig, ["--collector", "ray", "--num-workers", "1"], "--collector ray runs --num-workers >= 2"),
    (ControlConfig, ["--env", "playground:WalkerWalk", "--collector", "ray", "--num-workers", "2"],
     "Playground's batch, collect in this process"),
    (ControlConfig, ["--resume", "--overwrite"], "not both"),
    (ControlConfig, ["--max-behaviour-weight", "0.5"],
     "--max-behaviour-weight must be 0 (no bound) or >= 1, got 0.5"),
    (LLMConfig, ["--rollouts", "40"], "multiple of --num-prompts x --group-size = 128"),
    (LLMConfig, ["--max-behaviour-weight", "0.9"],
     "--max-behaviour-weight must be 0 (no bound) or >= 1, got 0.9"),
    (LLMConfig, ["--lambda-max", "0.5"],
     "--lambda-max must be 0 (no cap) or >= --lagrange-multiplier 1.0, got 0.5"),
    (LLMConfig, ["--task", "arithmetic", "--difficulty", "1,4"],
     "--difficulty must be comma-separated levels among 1, 2, 3 for --task arithmetic"),
    (LLMConfig, ["--difficulty", "easy"], "--difficulty must be comma-separated digit counts"),
    (LLMConfig, ["--difficulty", "7"], "--difficulty must be comma-separated digit counts"),
    (LLMConfig, ["--resume", "--overwrite"], "not both"),
])
def test_settings_that_do_not_fit_together_are_refused_by_name(capsys, config_cls, args, message):
    assert message in refused(capsys, config_cls, args)


@pytest.mark.parametrize("config_cls, args", [
    (ControlConfig, ["--loss", "sac"]), (ControlConfig, ["--dual", "auto"]),
    (ControlConfig, ["--collector", "threads"]), (ControlConfig, ["--logger", "mlflow"]),
    (ControlConfig, ["--ratio", "prox"]),
    (LLMConfig, ["--loss", "ppo"]), (LLMConfig, ["--backend", "sglang"]),
    (ControlConfig, ["--frames", "many"]), (LLMConfig, ["--lr", "fast"]),
])
def test_a_value_of_the_wrong_kind_or_choice_is_refused_by_name(capsys, config_cls, args):
    assert args[0] in refused(capsys, config_cls, args)


def test_an_unknown_flag_is_refused(capsys):
    assert "--frame" in refused(capsys, ControlConfig, ["--frame", "1000"])  # no abbreviations


def test_validate_checks_settings_built_in_code():
    validate(ControlConfig())
    validate(LLMConfig(task="arithmetic", difficulty="1,2,3"))
    assert LLMConfig(difficulty="1,2,3").levels == (1, 2, 3)
    assert LLMConfig().levels == (2,) and LLMConfig(task="arithmetic").levels == (1,)
    assert LLMConfig().model_path == ADDITION_MODEL_PATH
    assert LLMConfig(task="arithmetic").model_path == DEFAULT_MODEL_PATH
    assert LLMConfig(model="gpt2").model_path == "gpt2"
    assert (LLMConfig().problems, LLMConfig(task="arithmetic").problems) == (65_536, 4096)
    assert LLMConfig(num_problems=8).problems == 8
    with pytest.raises(ConfigError, match="--gamma must be in"):
        validate(ControlConfig(gamma=2.0))

    @dataclass
    class Unbounded:
        steps: int = 1

        def check(self):
            pass

    with pytest.raises(TypeError, match="Unbounded.steps has no Bound"):
        validate(Unbounded())
