"""The examples' settings: one dataclass per example, read from the command line and checked here.

Each field is a flag (``num_envs`` is ``--num-envs``; a boolean ``video`` is ``--video`` /
``--no-video``), its docstring is the flag's help, a ``Literal`` type gives its choices and an
:class:`Bound` in its ``Annotated`` type gives its range. :func:`parse` reads the flags with
`tyro <https://brentyi.github.io/tyro/>`_, applies the settings' preset under the flags given
(``ControlConfig.preset``), then :func:`validate` checks every value: a numeric field without a
:class:`Bound` is a programming error. A bad value ends the program as argparse does, with one
line that names the flag::

    dmc_walker.py: error: --max-grad-norm must be > 0, got -1.0

Examples:
    >>> cfg = parse(ControlConfig, ["--loss", "ppo", "--no-video"])
    >>> cfg.loss, cfg.video, cfg.frames
    ('ppo', False, 500000)
    >>> parse(ControlConfig, ["--env", "playground:WalkerWalk", "--epochs", "3"]).num_envs
    2048
    >>> validate(LLMConfig(group_size=1))
    Traceback (most recent call last):
        ...
    torchrl_r2vpo.recipes.config.ConfigError: --group-size must be >= 2, got 1
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, get_args, get_origin, get_type_hints, Literal, TypeVar

import torch
import tyro

from torchrl_r2vpo.envs.playground import PLAYGROUND_PREFIX
from torchrl_r2vpo.math_task import ADDITION_MODEL_PATH, DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODEL_PATH
from torchrl_r2vpo.objectives.llm import LLM_LOSSES

__all__ = ["Bound", "ConfigError", "ControlConfig", "LLMConfig", "PLAYGROUND", "flag", "parse",
           "validate"]

C = TypeVar("C")


class ConfigError(ValueError):
    """A setting out of its range, or settings that do not fit together; the message names
    the flags."""


@dataclass(frozen=True)
class Bound:
    """The range of a numeric setting: ``low <= value <= high`` (``low < value`` if ``strict``).

    A float must also be finite. Attach it to the field's type:
    ``lr: Annotated[float, Bound(0, strict=True)] = 3e-4``.
    """

    low: float | None = None
    high: float | None = None
    strict: bool = False

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value`` (``"must be > 0, got -1.0"``), or ``None``."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be finite, got {value}"
        if self.high is not None:
            if not self.low <= value <= self.high:
                return f"must be in [{self.low:g}, {self.high:g}], got {value}"
        elif self.strict and not value > self.low:
            return f"must be > {self.low:g}, got {value}"
        elif not self.strict and not value >= self.low:
            return f"must be >= {self.low:g}, got {value}"
        return None


Count = Annotated[int, Bound(1)]  # how many of something: at least one
NonNegativeInt = Annotated[int, Bound(0)]
Coefficient = Annotated[float, Bound(0)]  # finite, >= 0
Positive = Annotated[float, Bound(0, strict=True)]  # finite, > 0
Fraction = Annotated[float, Bound(0, 1)]
Logger = Literal["csv", "tensorboard", "wandb"]
LLMLoss = Literal[tuple(sorted(LLM_LOSSES))]


def flag(name: str) -> str:
    """The command-line flag of a field: ``flag("num_envs") == "--num-envs"``."""
    return "--" + name.replace("_", "-")


# Playground's tuned Brax PPO configuration for its DeepMind Control tasks: 2048 environments,
# unrolls of 30 steps, 32 minibatches of 1024 unrolls, 16 epochs, lr 1e-3, discount 0.995,
# reward scaling 10, entropy 1e-2. One batch here is what one Brax PPO training step collects
# (2048 environments x 480 steps), cut into 32 minibatches of 30720 transitions.
PLAYGROUND = dict(num_envs=2048, num_workers=1, frames=60_000_000, frames_per_batch=983_040,
                  minibatch_size=30_720, epochs=16, lr=1e-3, gamma=0.995, reward_scale=10.0,
                  entropy_coeff=1e-2, eval_every=6_000_000, checkpoint_every=6_000_000,
                  video=False)


@dataclass
class ControlConfig:
    """R2VPO (or clipped PPO) on DeepMind Control, gymnasium or MuJoCo Playground."""

    env: str = "walker-walk"
    """dm_control domain-task (walker-walk, ...), a gymnasium id, or playground:<TaskName>"""
    loss: Literal["r2vpo", "ppo"] = "r2vpo"
    """R2VPOLoss, or TorchRL's ClipPPOLoss on the same networks and data"""
    frames: Count = 500_000
    """environment frames to train for; --lr anneals to 0 there, and a --resume with another
    --frames anneals it from its value at the checkpoint to 0 at the new --frames (a run
    whose learning rate reached 0 cannot be extended)"""
    seed: NonNegativeInt = 0
    """seed of the networks, the environments and the evaluations"""
    device: str = "cpu"
    """where the networks and updates run: cpu, or cuda for playground: environments"""
    compile: bool = False
    """torch.compile the update step (loss, backward, clipping; CUDA graphs on cuda) and the
    policy of the CPU collectors"""
    num_envs: Count = 16
    """environments stepped together, per worker"""
    num_workers: Count = 2
    """collector workers when > 1 (not for Playground: one batch, in process)"""
    collector: Literal["process", "ray"] = "process"
    """where the --num-workers collectors run: local processes or Ray actors"""
    frames_per_batch: Count = 4096
    """frames collected per iteration, a multiple of --num-envs x --num-workers x
    --frame-skip"""
    frame_skip: Count = 1
    """simulator steps per action (action repeat), rewards summed; --frames, --frames-per-batch,
    --eval-every and --checkpoint-every count simulator steps, --minibatch-size transitions"""
    minibatch_size: Count = 256
    """transitions per optimiser step"""
    epochs: Count = 10
    """passes over the stored batches per iteration"""
    lr: Positive = 3e-4
    """Adam's learning rate, annealed linearly to 0 over --frames (see --frames for --resume)"""
    gamma: Fraction = 0.99
    """discount factor"""
    gae_lambda: Fraction = 0.95
    """GAE's lambda"""
    reward_scale: Positive = 1.0
    """rewards are multiplied by this for the critic and GAE (the returns reported are not)"""
    normalize_reward: bool = False
    """rewards (after --reward-scale) are divided by the running standard deviation of their
    discounted return and clipped to +-10, for the critic and GAE (gymnasium's NormalizeReward,
    as in CleanRL's PPO; the returns reported are not)"""
    entropy_coeff: Coefficient = 0.0
    """coefficient of the entropy bonus"""
    initial_scale: Positive = 1.0
    """the actor's Gaussian scale (before the tanh) at initialisation: the exploration noise"""
    state_independent_scale: bool = False
    """the actor's scale is one learnt parameter per action dimension (CleanRL's and TorchRL's
    PPO), not a second output of its network"""
    rpo_alpha: Coefficient = 0.0
    """RPO: uniform noise U(-a, a) on the actor's mean (before the tanh) in the optimiser steps,
    not in collection or evaluation (0: none)"""
    critic_coeff: Coefficient = 0.5
    """coefficient of the critic's L2 loss"""
    max_grad_norm: Positive = 0.5
    """gradient norm clip, for the actor and the critic separately"""
    clip_epsilon: Positive = 0.2
    """ppo: the clipping range; r2vpo: the range of its clip-fraction diagnostic"""
    lagrange_multiplier: Coefficient = 1.0
    """r2vpo: lambda (its initial value when --dual adaptive); 1.0 held at 500k and 1M frames
    on walker-walk and cheetah-run, where 0.5 fell behind on walker-walk at 1M"""
    ratio_var_target: Coefficient = 0.02
    """r2vpo: delta, the variance target of --dual adaptive"""
    dual: Literal["fixed", "adaptive"] = "fixed"
    """r2vpo: fixed lambda, or dual ascent on Var(r) - delta"""
    dual_lr: Coefficient = 1.0
    """r2vpo: dual step size per optimiser step (--dual adaptive)"""
    reuse: NonNegativeInt = 0
    """also train on the previous K batches (stale data)"""
    ratio: Literal["proximal", "behaviour"] = "proximal"
    """r2vpo: the constrained ratio is pi_theta / pi_prox, pi_prox the policy at the start of
    the update, with stale data weighted by pi_prox / pi_behaviour (decoupled), or
    pi_theta / pi_behaviour (the papers' literal reading); the same without --reuse"""
    max_behaviour_weight: Coefficient = 2.0
    """r2vpo, --ratio proximal: truncation of the stale-data weight pi_prox / pi_behaviour
    (0: none, else >= 1)"""
    weighted_variance: bool = True
    """r2vpo --ratio proximal: weigh each sample's term of Var(r) by its stale-data weight"""
    eval_every: Count = 50_000
    """frames between deterministic evaluations"""
    eval_episodes: Count = 4
    """deterministic evaluation episodes, side by side (Playground: the --num-envs batch)"""
    final_eval_episodes: Count = 16
    """deterministic episodes of the final evaluation (after the last batch, or at the
    --time-limit), side by side; their mean and median are printed, each return kept in
    --out/final_eval.csv (Playground: the --num-envs batch)"""
    checkpoint_every: Count = 50_000
    """frames between checkpoints (also written at the end and on Ctrl-C or SIGTERM)"""
    time_limit: Coefficient = 0.0
    """stop after this many seconds of training in this process (0: no limit)"""
    logger: Logger = "csv"
    """TorchRL logger of the scalars, under --out/logs"""
    out: str = "runs/dmc_walker"
    """directory for the curve, plot, final evaluation, checkpoint, logs and GIF"""
    resume: bool = False
    """continue from --out/checkpoint.pt"""
    overwrite: bool = False
    """replace the run in --out (without it a fresh run refuses to)"""
    video: bool = True
    """save a GIF of the policy"""

    # settings a resumed run may change; every other one must match the checkpoint's
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({
        "frames", "device", "compile", "collector", "eval_every", "eval_episodes",
        "final_eval_episodes", "checkpoint_every", "time_limit", "logger", "out", "resume",
        "overwrite", "video"})

    @property
    def playground(self) -> bool:
        """Whether ``env`` is a MuJoCo Playground task (``playground:<TaskName>``)."""
        return self.env.startswith(PLAYGROUND_PREFIX)

    def preset(self) -> dict:
        """The defaults that replace the class's for these settings: :data:`PLAYGROUND` (and
        ``device="cuda"`` where there is one) for a Playground task, for both losses."""
        if not self.playground:
            return {}
        return {**PLAYGROUND, "device": "cuda" if torch.cuda.is_available() else "cpu"}

    def check(self) -> None:
        """Raises :class:`ConfigError` if the settings do not fit together."""
        if self.device != "cpu" and not self.playground:
            raise ConfigError(f"--device {self.device} is for playground: environments; "
                              "dm_control and gymnasium simulate on the CPU, and the example "
                              "trains them there.")
        # the collector's batches are whole steps of every environment
        per_batch = self.num_envs * self.num_workers * self.frame_skip
        if self.frames_per_batch % per_batch:
            raise ConfigError(f"--frames-per-batch {self.frames_per_batch} must be a multiple "
                              f"of --num-envs x --num-workers x --frame-skip = {per_batch}.")
        transitions = self.frames_per_batch // self.frame_skip
        if self.minibatch_size > transitions:
            raise ConfigError(f"--minibatch-size must be in [1, {transitions}], the transitions "
                              f"of --frames-per-batch {self.frames_per_batch} / --frame-skip "
                              f"{self.frame_skip}, got {self.minibatch_size}.")
        if self.frame_skip > 1 and self.playground:
            raise ConfigError("--frame-skip is for dm_control and gymnasium environments; "
                              "Playground tasks set their own control step.")
        check_behaviour_weight(self.max_behaviour_weight)
        if self.collector == "ray" and (self.num_workers < 2 or self.playground):
            raise ConfigError("--collector ray runs --num-workers >= 2 workers as Ray actors; "
                              "one worker, and Playground's batch, collect in this process.")


@dataclass
class LLMConfig:
    """RL fine-tuning of a language model on generated math problems."""

    task: Literal["reversed-addition", "arithmetic"] = "reversed-addition"
    """reversed-addition: sums answered least significant digit first, drawn fresh each
    iteration; arithmetic: a pool of generate_problems' questions and word problems"""
    model: str = ""
    """hub id or local path of a causal LM (default: the task's tiny model shipped with the
    package)"""
    backend: Literal["transformers", "vllm"] = "transformers"
    """what samples the completions (vLLM loads its own copy, synced after each update)"""
    device: str = "cpu"
    """where the model runs (rollouts are stored on the CPU)"""
    threads: Count = 1
    """CPU threads for torch (the tiny model is fastest on one)"""
    loss: LLMLoss = "r2vpo"
    """R2VPOLLMLoss, or a baseline with the same data path"""
    rollouts: Count = 32768
    """completions sampled over the run (the budget compared across losses); a --resume may
    change it (the learning rate is constant)"""
    seed: NonNegativeInt = 0
    """seed of the training problems, the sampling and the minibatches"""
    difficulty: str = ""
    """reversed-addition: digits per number (default 2); arithmetic: comma-separated generator
    levels, 1 one operation, 2 two, 3 word problems (default 1)"""
    num_problems: NonNegativeInt = 0
    """training problems, served without replacement and reshuffled after each pass (0: the
    task's default, 65536 fresh draws for reversed-addition, one per prompt of runs up to 524k
    rollouts, and 4096 for arithmetic)"""
    num_test: Count = 1024
    """held-out problems"""
    num_prompts: Count = 16
    """distinct prompts per iteration"""
    group_size: Annotated[int, Bound(2)] = 8
    """completions per prompt (advantages are rewards relative to the group's others)"""
    max_new_tokens: Count = DEFAULT_MAX_NEW_TOKENS
    """longest completion, in tokens"""
    reuse: NonNegativeInt = 2
    """also train on the K previous batches (stale data, tagged by policy version)"""
    lag: NonNegativeInt = 0
    """each batch is sampled by the policy of K updates ago, as in an asynchronous pipeline
    (stale data, tagged by policy version; the trainer keeps the last K weight snapshots)"""
    epochs: Count = 1
    """passes over the stored batches per iteration"""
    minibatch_size: Count = 32
    """completions per optimiser step (later steps of a batch are off-policy)"""
    lr: Positive = 1e-4
    """AdamW's learning rate"""
    max_grad_norm: Positive = 1.0
    """gradient norm clip"""
    lagrange_multiplier: Coefficient = 1.0
    """r2vpo: lambda (its initial value when --dual adaptive)"""
    ratio_var_target: Coefficient = 0.01
    """r2vpo: delta, the variance target of --dual adaptive"""
    dual: Literal["adaptive", "fixed"] = "adaptive"
    """r2vpo: lambda follows dual ascent on Var(r) - delta, or stays fixed"""
    dual_lr: Coefficient = 10.0
    """r2vpo: dual step size per --dual-every (--dual adaptive)"""
    dual_every: Literal["iteration", "minibatch"] = "iteration"
    """r2vpo: step the dual once per iteration on Var(r) pooled over its minibatches, or
    after every minibatch"""
    lambda_max: Coefficient = 2.5
    """r2vpo: cap of the adaptive lambda (0: none); 2.5 = 1 / (2 x 0.2): a token with |A| = 1
    may still move its ratio by 0.2 from the mean, GRPO's clip range"""
    ratio: Literal["proximal", "behaviour"] = "proximal"
    """r2vpo: the constrained ratio is pi_theta / pi_prox, pi_prox the policy at the start of
    the update, with stale data weighted by pi_prox / pi_behaviour (decoupled), or
    pi_theta / pi_behaviour (the papers' literal reading)"""
    variance_center: Literal["mean", "one"] = "mean"
    """r2vpo: the penalty is lambda (r - c)^2 with c the batch's mean ratio, or 1"""
    weighted_variance: bool = True
    """r2vpo --ratio proximal: weigh each token's term of Var(r) by its stale-data weight"""
    max_behaviour_weight: Coefficient = 2.0
    """the truncation of the stale-data weight pi_prox / pi_behaviour of r2vpo (--ratio
    proximal) and grpo-tis, the mask bound of grpo-decoupled (0: none, else >= 1)"""
    kl_to_ref: Coefficient = 0.0
    """coefficient of the k3 KL to the initial model (0: none), as GRPOLoss's kl_to_ref_coeff"""
    entropy_coeff: Coefficient = 0.01
    """entropy bonus, as TorchRL's GRPOLoss (0: none, as every --loss's published objective)"""
    eval_every: Count = 4096
    """rollouts between held-out evaluations"""
    checkpoint_every: Count = 4096
    """rollouts between checkpoints (also written at the end and on Ctrl-C or SIGTERM)"""
    logger: Logger = "csv"
    """TorchRL logger of the scalars, under --out/logs"""
    out: str = "runs/llm_math"
    """directory for the curve, plot, checkpoint and logs"""
    resume: bool = False
    """continue from --out/checkpoint.pt"""
    overwrite: bool = False
    """replace the run in --out (without it a fresh run refuses to)"""

    # settings a resumed run may change; every other one must match the checkpoint's (num_test
    # too: the curve's accuracies and the one before training are measured on the same problems)
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({
        "rollouts", "device", "threads", "backend", "eval_every", "checkpoint_every", "logger",
        "out", "resume", "overwrite"})

    @property
    def levels(self) -> tuple[int, ...]:
        """The generator levels (arithmetic) or digits (reversed-addition) of ``difficulty``:
        ``"1,2"`` is ``(1, 2)``, ``""`` the task's default."""
        default = "2" if self.task == "reversed-addition" else "1"
        return tuple(int(level) for level in (self.difficulty or default).split(","))

    @property
    def problems(self) -> int:
        """``num_problems``, or the task's default when it is 0."""
        return self.num_problems or (65_536 if self.task == "reversed-addition" else 4096)

    @property
    def model_path(self) -> str:
        """``model``, or the task's shipped checkpoint when it is empty."""
        return self.model or (ADDITION_MODEL_PATH if self.task == "reversed-addition"
                              else DEFAULT_MODEL_PATH)

    def check(self) -> None:
        """Raises :class:`ConfigError` if the settings do not fit together."""
        allowed = ("1", "2", "3") if self.task == "arithmetic" else tuple("123456")
        if self.difficulty and any(level not in allowed for level in self.difficulty.split(",")):
            kind = "levels" if self.task == "arithmetic" else "digit counts"
            raise ConfigError(f"--difficulty must be comma-separated {kind} among "
                              f"{', '.join(allowed)} for --task {self.task}, got {self.difficulty!r}.")
        check_behaviour_weight(self.max_behaviour_weight)
        if 0 < self.lambda_max < self.lagrange_multiplier:
            raise ConfigError(f"--lambda-max must be 0 (no cap) or >= --lagrange-multiplier "
                              f"{self.lagrange_multiplier}, got {self.lambda_max}.")
        batch = self.num_prompts * self.group_size
        if self.rollouts % batch:
            raise ConfigError(f"--rollouts {self.rollouts} must be a multiple of --num-prompts x "
                              f"--group-size = {batch} (the completions of one iteration).")


def check_behaviour_weight(value: float) -> None:
    """``--max-behaviour-weight`` is 0 (no bound) or at least 1 (a bound under 1 would
    down-weight fresh data, whose weight is 1)."""
    if 0 < value < 1:
        raise ConfigError(f"--max-behaviour-weight must be 0 (no bound) or >= 1, got {value}.")


def validate(cfg) -> None:
    """Checks every setting of ``cfg`` against its field's :class:`Bound`, then the settings
    together (``cfg.check()``).

    Raises:
        ConfigError: naming the first flag out of range, or the flags that do not fit.
        TypeError: a numeric field has no :class:`Bound`.
    """
    hints = get_type_hints(type(cfg), include_extras=True)
    for field in dataclasses.fields(cfg):
        hint = hints[field.name]
        base = get_args(hint)[0] if get_origin(hint) is Annotated else hint
        if base not in (int, float):
            continue
        bounds = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Bound)]
        if not bounds:
            raise TypeError(f"{type(cfg).__name__}.{field.name} has no Bound: give its type "
                            "one, Annotated[...]")
        problem = bounds[0].problem(getattr(cfg, field.name))
        if problem is not None:
            raise ConfigError(f"{flag(field.name)} {problem}")
    if getattr(cfg, "resume", False) and getattr(cfg, "overwrite", False):
        raise ConfigError("pass --resume (continue the run in --out) or --overwrite (replace "
                          "it), not both.")
    cfg.check()


def parse(config_cls: type[C], args: Sequence[str] | None = None, *,
          description: str | None = None) -> C:
    """Reads ``config_cls`` from the command line (``args``, else ``sys.argv[1:]``).

    Where the settings have a preset (``config_cls.preset``, e.g. Playground's for a
    ``playground:`` environment), it replaces the class's defaults, and the flags given still
    win over it. ``--help`` prints every flag with its help and default and exits.

    Raises:
        SystemExit: with status 2 and an argparse-style error line on stderr for an unknown
            flag, a value of the wrong type or choice, or one :func:`validate` refuses.
    """
    args = sys.argv[1:] if args is None else list(args)
    prog = Path(sys.argv[0]).name
    cfg = tyro.cli(config_cls, args=args, prog=prog, description=description)
    preset = cfg.preset() if hasattr(cfg, "preset") else {}
    if preset:  # parsed again over the preset: the flags given win
        cfg = tyro.cli(config_cls, args=args, prog=prog, description=description,
                       default=dataclasses.replace(config_cls(), **preset))
    try:
        validate(cfg)
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg
