"""R2VPO (or clipped PPO) on DeepMind Control, end to end with TorchRL parts.

    python examples/dmc_walker.py                         # walker-walk, R2VPO, fixed lambda
    python examples/dmc_walker.py --loss ppo              # ClipPPOLoss, same networks and data
    python examples/dmc_walker.py --env cheetah-run --frames 1000000 --dual adaptive
    python examples/dmc_walker.py --env HalfCheetah-v5    # any gymnasium id works too
    python examples/dmc_walker.py --reuse 2               # also train on the 2 previous batches
    python examples/dmc_walker.py --resume                # continue an interrupted run in --out
    python examples/dmc_walker.py --compile               # torch.compile the update step
    python examples/dmc_walker.py --env playground:WalkerWalk --device cuda   # MuJoCo Playground
    python examples/dmc_walker.py --num-workers 2 --collector ray             # Ray workers

A ``playground:<TaskName>`` environment is one batch of ``--num-envs``
MuJoCo Playground environments simulated in JAX on ``--device``; collection,
GAE and updates all stay on that device, and the defaults become those of
Playground's tuned Brax PPO configuration (``PLAYGROUND``), for both losses;
flags given on the command line still win.

Writes to ``--out``: ``curve.csv`` (one row per collected batch), ``curve.png``,
``checkpoint.pt`` (every ``--checkpoint-every`` frames and on Ctrl-C or SIGTERM), the
logger's files, and ``policy.gif`` where MuJoCo can render offscreen.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import functools
import importlib.util
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl._utils import compile_with_warmup
from torchrl.collectors import Collector, MultiSyncCollector
from torchrl.data import LazyTensorStorage, SamplerWithoutReplacement, TensorDictReplayBuffer
from torchrl.envs import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE
from torchrl.record.loggers import get_logger
from tqdm import tqdm

from torchrl_r2vpo import DualVariableScheduler, R2VPOLoss
from torchrl_r2vpo.collectors import staleness_stats
from torchrl_r2vpo.envs import make_env, record_rollout_gif, select_mujoco_gl
from torchrl_r2vpo.modules import RunningObservationNorm

from run_state import (append_row, check_resumable, interrupts_deferred, open_run_dir, rng_state,
                       save_checkpoint, set_rng_state, stop_on_sigterm, truncate_curve)


@dataclass
class Config:
    env: str = "walker-walk"  # dm_control "domain-task", or a gymnasium id
    loss: str = "r2vpo"  # r2vpo | ppo
    frames: int = 500_000
    seed: int = 0
    device: str = "cpu"  # cpu | cuda: where the networks, updates and Playground tensors live
    compile: bool = False  # torch.compile the update step (with CUDA graphs on cuda)
    num_envs: int = 16  # environments stepped together, per worker
    num_workers: int = 2  # collector workers when > 1 (not for Playground: one batch, in process)
    collector: str = "process"  # process | ray: where the workers run (TorchRL Collector backend)
    frames_per_batch: int = 4096
    minibatch_size: int = 256
    epochs: int = 10
    lr: float = 3e-4  # annealed linearly to 0 over --frames
    gamma: float = 0.99
    gae_lambda: float = 0.95
    reward_scale: float = 1.0  # rewards are multiplied by this for the critic and GAE only
    entropy_coeff: float = 0.0
    critic_coeff: float = 0.5
    max_grad_norm: float = 0.5
    clip_epsilon: float = 0.2  # ppo
    lagrange_multiplier: float = 0.5  # r2vpo: lambda (initial value when adaptive)
    ratio_var_target: float = 0.02  # r2vpo: delta
    dual: str = "fixed"  # r2vpo: fixed | adaptive
    dual_lr: float = 1.0  # r2vpo: dual step size per optimiser step
    reuse: int = 0  # also train on the previous K collected batches
    eval_every: int = 50_000
    eval_episodes: int = 4  # run side by side
    checkpoint_every: int = 50_000
    time_limit: float = 0.0  # seconds of training after which the run stops (0: none)
    logger: str = "csv"  # csv | tensorboard | wandb
    out: str = "runs/dmc_walker"
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace the run already in --out
    video: bool = True

    def __post_init__(self):
        playground = self.env.startswith("playground:")
        for name in ("frames", "num_envs", "num_workers", "eval_episodes", "frames_per_batch",
                     "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.device != "cpu" and not playground:
            raise ValueError(f"--device {self.device} is for playground: environments; dm_control and "
                             "gymnasium simulate on the CPU, and this example trains them there.")
        per_batch = self.num_envs * self.num_workers  # the collector's batches are whole steps
        if self.frames_per_batch % per_batch:
            raise ValueError(f"--frames-per-batch {self.frames_per_batch} must be a multiple of "
                             f"--num-envs x --num-workers = {per_batch}.")
        if not 0 < self.minibatch_size <= self.frames_per_batch or self.epochs < 1:
            raise ValueError("--minibatch-size must be in [1, --frames-per-batch] and --epochs >= 1.")
        if self.collector == "ray" and (self.num_workers < 2 or playground):
            raise ValueError("--collector ray runs --num-workers >= 2 workers as Ray actors; one "
                             "worker, and Playground's batch, collect in this process.")


# settings a resumed run may change; every other one must match the checkpoint's
RESUMABLE_CHANGES = {"frames", "device", "compile", "collector", "eval_every", "eval_episodes",
                     "checkpoint_every", "time_limit", "logger", "out", "resume", "overwrite",
                     "video"}


# Playground's tuned Brax PPO configuration for its DeepMind Control tasks: 2048 environments,
# unrolls of 30 steps, 32 minibatches of 1024 unrolls, 16 epochs, lr 1e-3, discount 0.995,
# reward scaling 10, entropy 1e-2. One batch here is what one Brax PPO training step collects
# (2048 environments x 480 steps), cut into 32 minibatches of 30720 transitions.
PLAYGROUND = dict(num_envs=2048, num_workers=1, frames=60_000_000, frames_per_batch=983_040,
                  minibatch_size=30_720, epochs=16, lr=1e-3, gamma=0.995, reward_scale=10.0,
                  entropy_coeff=1e-2, eval_every=6_000_000, checkpoint_every=6_000_000,
                  video=False)

# resources of one Ray collector actor: it steps CPU simulators
RAY_WORKER = {"num_cpus": 1, "num_gpus": 0}

CHOICES = {"loss": ("r2vpo", "ppo"), "dual": ("fixed", "adaptive"),
           "collector": ("process", "ray"), "logger": ("csv", "tensorboard", "wandb")}


HELP = {"env": "dm_control domain-task (walker-walk, cheetah-run, ...), a gymnasium id, "
               "or playground:<TaskName> (playground:WalkerWalk, ...)",
        "frames": "environment frames to train for", "num_envs": "environments per worker",
        "num_workers": "collector workers", "lagrange_multiplier": "r2vpo: lambda",
        "collector": "where the --num-workers collectors run: local processes or Ray actors",
        "compile": "torch.compile the update step (loss, backward, clipping, Adam); on cuda "
                   "with CUDA graphs (mode reduce-overhead)",
        "reward_scale": "rewards are multiplied by this for the critic and GAE",
        "time_limit": "stop after this many seconds of training (0: no limit)",
        "ratio_var_target": "r2vpo: delta, the variance target of --dual adaptive",
        "dual_lr": "r2vpo: dual step size per optimiser step (--dual adaptive)",
        "reuse": "also train on the previous K batches (stale data)",
        "eval_episodes": "deterministic evaluation episodes, run side by side (Playground: "
                         "the --num-envs training batch)",
        "out": "directory for the curve, plot, checkpoint, logs and GIF",
        "resume": "continue from --out/checkpoint.pt", "video": "save a GIF of the policy",
        "overwrite": "replace the run in --out (without it a fresh run refuses to)"}


def make_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """One flag per ``Config`` field; ``defaults=False`` leaves out the flags not given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        text = HELP.get(field.name, "(default: %(default)s)")
        default = field.default if defaults else argparse.SUPPRESS
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=text)
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[field.type],
                                default=default, choices=CHOICES.get(field.name), help=text)
    return parser


def parse_args(argv=None) -> Config:
    args = vars(make_parser().parse_args(argv))
    if args["env"].startswith("playground:"):  # the preset, under the flags given
        given = vars(make_parser(defaults=False).parse_args(argv))
        preset = {**PLAYGROUND, "device": "cuda" if torch.cuda.is_available() else "cpu"}
        args.update({k: v for k, v in preset.items() if k not in given})
    return Config(**args)


def make_agent(env, obs_dim: int, act_dim: int):
    """Tanh-Gaussian actor and value critic, sharing one observation normaliser."""
    obs_norm = RunningObservationNorm(obs_dim)
    hidden = dict(num_cells=[64, 64], activation_class=nn.Tanh)
    actor_net = nn.Sequential(obs_norm, MLP(obs_dim, 2 * act_dim, **hidden),
                              NormalParamExtractor(scale_lb=1e-4))
    actor = ProbabilisticActor(
        TensorDictModule(actor_net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=env.full_action_spec_unbatched,
        distribution_class=TanhNormal,
        distribution_kwargs={"low": env.action_spec_unbatched.space.low,
                             "high": env.action_spec_unbatched.space.high},
        return_log_prob=True,
        default_interaction_type=ExplorationType.RANDOM,
    )
    critic = ValueOperator(nn.Sequential(obs_norm, MLP(obs_dim, 1, **hidden)),
                           in_keys=["observation"])
    return actor, critic, obs_norm


def make_loss(cfg: Config, actor, critic):
    common = dict(entropy_coeff=cfg.entropy_coeff, critic_coeff=cfg.critic_coeff,
                  loss_critic_type="l2", normalize_advantage=True)
    if cfg.loss == "ppo":
        return ClipPPOLoss(actor, critic, clip_epsilon=cfg.clip_epsilon, **common), None
    loss = R2VPOLoss(actor, critic, lagrange_multiplier=cfg.lagrange_multiplier,
                     ratio_var_target=cfg.ratio_var_target,
                     diagnostic_clip_epsilon=cfg.clip_epsilon, **common)
    scheduler = DualVariableScheduler(loss, lr=cfg.dual_lr if cfg.dual == "adaptive" else 0.0)
    return loss, scheduler


def make_optimizer(loss, lr: float, compile: bool = False) -> torch.optim.Adam:
    """Adam over the loss's parameters.

    Under ``compile`` the learning rate is a tensor on the parameters' device, so that
    annealing it recompiles nothing; on CUDA the optimiser then keeps its step count there
    (``capturable``), which foreach Adam needs with a tensor learning rate and CUDA graphs need
    to capture the step.
    """
    device = next(loss.parameters()).device
    capturable = compile and device.type == "cuda"
    return torch.optim.Adam(loss.parameters(), lr=torch.tensor(lr, device=device) if compile else lr,
                            eps=1e-5, capturable=capturable)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Loads a checkpoint's optimiser state but keeps this optimiser's kind of step (its
    learning rate, a tensor or not, and ``capturable``): the checkpoint's run may have
    compiled or not. The learning rate is annealed from the frame count anyway."""
    state = {**state, "param_groups": [
        {**saved, "lr": group["lr"], "capturable": group["capturable"]}
        for saved, group in zip(state["param_groups"], optimizer.param_groups)]}
    optimizer.load_state_dict(state)


def make_update(loss, optimizer, max_grad_norm: float, compile: bool = False):
    """One optimiser step on a minibatch (loss, backward, per-network gradient clipping,
    ``optimizer.step``), returning the loss's outputs.

    ``compile`` puts the step through ``torch.compile`` after one eager call (TensorDict's
    first-use caches fill there), with CUDA graphs (``mode="reduce-overhead"``) on CUDA; the
    optimiser must then come from :func:`make_optimizer` with ``compile=True``.
    """
    clip_groups = [list(params.values(True, True))
                   for params in (loss.actor_network_params, loss.critic_network_params)]

    def update(batch: TensorDict) -> TensorDict:
        out_td = loss(batch)
        total = sum(v for k, v in out_td.items() if k.startswith("loss_"))
        total.backward()
        for params in clip_groups:
            nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out_td.detach()

    if not compile:
        return update
    cuda = next(loss.parameters()).device.type == "cuda"
    # static shapes: a minibatch always has the same size, and another network size (a later
    # run in this process) gets a graph of its own, not a dynamic one (on CUDA, torch 2.11
    # failed to build the guards of such a dynamic graph)
    compiled = compile_with_warmup(update, warmup=1, mode="reduce-overhead" if cuda else None,
                                   dynamic=False)

    def compiled_update(batch: TensorDict) -> TensorDict:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(batch).clone()  # a CUDA graph's outputs are overwritten at its next replay

    return compiled_update


def make_collector(cfg: Config, actor, total_frames: int, seed: int, env=None):
    """Steps ``env`` in this process on ``cfg.device`` if given, else builds the environments.

    Built environments are seeded ``seed, seed + 1, ...`` across workers when they are
    made, before the collector's first reset; ``set_seed`` then also seeds each worker
    process's torch and numpy generators: a run is reproducible from its seed.
    """
    env_fns = [functools.partial(make_env, cfg.env, num_envs=cfg.num_envs,
                                 seed=seed + worker * cfg.num_envs)
               for worker in range(cfg.num_workers)]
    batches = math.ceil(total_frames / cfg.frames_per_batch)  # whole batches only
    frames = dict(frames_per_batch=cfg.frames_per_batch,
                  total_frames=batches * cfg.frames_per_batch)
    kwargs = dict(auto_register_policy_transforms=False, **frames)
    if env is not None:  # one batched environment on the device: no copies, no processes
        collector = Collector(env, actor, device=cfg.device, track_traj_ids=False, **kwargs)
    elif cfg.num_workers > 1 and cfg.collector == "ray":  # Ray actors, on any machine of the cluster
        if importlib.util.find_spec("ray") is None:
            raise ImportError("--collector ray needs ray: pip install 'torchrl_r2vpo[ray]'.")
        collector = Collector(env_fns, actor, backend="ray", sync=True, **frames,
                              backend_options=dict(
                                  remote_configs=RAY_WORKER,
                                  collector_kwargs={"auto_register_policy_transforms": False}))
        collector.update_policy_weights_()  # connects the actors to this policy's weights
    elif cfg.num_workers > 1:  # each worker process steps its own batch of environments
        collector = MultiSyncCollector(env_fns, actor, **kwargs)
    else:
        collector = Collector(env_fns[0](), actor, **kwargs)
    collector.set_seed(seed)
    return collector


def episode_returns(env, actor) -> torch.Tensor:
    """Returns of the deterministic (mode) policy, one episode per environment: ``[num_envs]``."""
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        rollout = env.rollout(100_000, actor, break_when_any_done=False,
                              break_when_all_done=True)
    if rollout.ndim == 1:  # a single environment is not batched
        rollout = rollout.unsqueeze(0)
    done = rollout["next", "done"].squeeze(-1)  # [episodes, T]
    last = torch.full_like(done[:, :1], done.shape[-1] - 1, dtype=torch.long)
    first_done = torch.where(done.any(-1, keepdim=True), done.int().argmax(-1, keepdim=True), last)
    return rollout["next", "episode_reward"].squeeze(-1).gather(-1, first_done).squeeze(-1)


# evaluation environments are seeded from here on, by run seed and batch (see eval_seed)
EVAL_SEED = 10_000_000


def eval_seed(cfg: Config, frames: int) -> int:
    """The seed of the evaluation after ``frames`` training frames: the same whether the run
    was resumed before it or not, and different for every batch and every run seed."""
    return EVAL_SEED + 100_000 * cfg.seed + cfg.eval_episodes * (frames // cfg.frames_per_batch)


def evaluate(env, actor) -> float:
    """Mean return of the deterministic (mode) policy over one episode per environment."""
    return episode_returns(env, actor).mean().item()


def load_actor(path: Path, env) -> tuple[Config, ProbabilisticActor]:
    """The run's settings and its trained actor, from a ``checkpoint.pt`` of this script.

    ``env`` is any environment of the run's task (it gives the actor its specs).

    Examples:
        >>> env = make_env("walker-walk", num_envs=16, seed=123)  # doctest: +SKIP
        >>> cfg, actor = load_actor(Path("runs/walker/checkpoint.pt"), env)  # doctest: +SKIP
        >>> evaluate(env, actor)  # mean return from 16 starts  # doctest: +SKIP
    """
    ckpt = torch.load(path, weights_only=False, map_location="cpu")
    names = {field.name for field in dataclasses.fields(Config)}
    cfg = Config(**{**{k: v for k, v in ckpt["config"].items() if k in names}, "device": "cpu"})
    actor, critic, _ = make_agent(env, env.observation_spec["observation"].shape[-1],
                                  env.action_spec.shape[-1])
    make_loss(cfg, actor, critic)[0].load_state_dict(ckpt["loss"])  # the actor's parameters
    return cfg, actor


def ratio_stats_by_staleness(loss, stored: TensorDict, version: int) -> dict[str, float]:
    """Mean and variance of the ratio pi_theta / pi_behaviour for each data age."""
    with torch.no_grad():
        log_prob, _, _ = loss._get_cur_log_prob(stored.clone(False))
        ratio = (log_prob - stored[loss.tensor_keys.sample_log_prob]).exp()
    return staleness_stats(ratio, version - stored["policy_version"])


def try_record_video(env_name: str, actor, path: Path, seed: int, gl_problem: str | None) -> str:
    if gl_problem is not None:
        return f"no video: MuJoCo cannot render offscreen here: {gl_problem}"
    try:
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            record_rollout_gif(env_name, actor, path, seed=seed)
    except Exception as err:  # the renderer's own errors vary by OpenGL backend
        return f"no video: MuJoCo offscreen rendering failed ({type(err).__name__}: {err})"
    return f"video: {path}"


def plot_curve(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["frames"], r["train_return"]) for r in rows if r["train_return"] != ""]
    evals = [(r["frames"], r["eval_return"]) for r in rows if r["eval_return"] != ""]
    for points, label, style in ((train, "train (stochastic)", "-"), (evals, "eval (deterministic)", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set(xlabel="frames", ylabel="episode return", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CURVE_FIELDS = ["frames", "time_s", "fps", "update_s", "train_return", "eval_return", "lagrange_multiplier",
                "ratio_var", "ESS", "clip_fraction", "kl_approx", "entropy", "loss_objective",
                "loss_critic", "physics_errors"]


def main(cfg: Config, env=None) -> dict:
    """Trains, evaluates and writes the outputs of one run.

    ``env`` is an already built ``make_env(cfg.env, num_envs=cfg.num_envs, ...)``
    Playground environment to train and evaluate in, so that several runs share
    its compiled step; it stays usable. By default the run builds its own.
    """
    out = Path(cfg.out)
    ckpt_path, curve_path = open_run_dir(out, cfg.resume, cfg.overwrite)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    playground, shared_env = cfg.env.startswith("playground:"), env is not None
    device = torch.device(cfg.device)
    gl_problem = None  # before MuJoCo is imported: a renderer for the video, or none at all
    if cfg.video and not playground:
        gl_problem = select_mujoco_gl()
    else:
        os.environ.setdefault("MUJOCO_GL", "disable")

    # --- environments, networks, loss ---------------------------------------------------
    if playground:  # one batch of environments on the device, for training and evaluation
        if env is None:
            env = make_env(cfg.env, num_envs=cfg.num_envs, seed=cfg.seed, device=device)
        eval_env = env
    else:
        eval_env = make_env(cfg.env, num_envs=cfg.eval_episodes)  # seeded at each evaluation
    obs_dim = eval_env.observation_spec["observation"].shape[-1]
    act_dim = eval_env.action_spec.shape[-1]
    actor, critic, obs_norm = make_agent(eval_env, obs_dim, act_dim)
    actor.to(device)
    critic.to(device)
    loss, scheduler = make_loss(cfg, actor, critic)
    optimizer = make_optimizer(loss, cfg.lr, cfg.compile)
    gae = GAE(gamma=cfg.gamma, lmbda=cfg.gae_lambda, value_network=critic, average_gae=False,
              device=device)
    # the last K+1 collected batches, each tagged with the policy version that collected it
    history = TensorDictReplayBuffer(storage=LazyTensorStorage(cfg.reuse + 1, device=device))
    minibatches = TensorDictReplayBuffer(
        storage=LazyTensorStorage((cfg.reuse + 1) * cfg.frames_per_batch, device=device),
        sampler=SamplerWithoutReplacement(drop_last=True), batch_size=cfg.minibatch_size)

    # --- resume -------------------------------------------------------------------------
    frames, version, logger_state = 0, 0, None
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False, map_location=device)
        check_resumable(ckpt["config"], cfg, RESUMABLE_CHANGES)
        loss.load_state_dict(ckpt["loss"])
        load_optimizer_state(optimizer, ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        history.load_state_dict(ckpt["history"])
        frames, version, logger_state = ckpt["frames"], ckpt["version"], ckpt["logger"]
        set_rng_state(ckpt["rng"])
        print(f"resumed at frame {frames}: lambda {getattr(loss, 'lagrange_multiplier', float('nan')):.9g}, "
              f"observation count {int(obs_norm.count)}")
    elif cfg.resume:
        print(f"--resume: no checkpoint in {out}, starting from scratch")
    truncate_curve(curve_path, "frames", frames, CURVE_FIELDS)

    try:
        logger = get_logger(cfg.logger, logger_name=str(out / "logs"),
                            experiment_name=f"{cfg.loss}-{cfg.env.replace(':', '-')}-seed{cfg.seed}",
                            state_dict=logger_state,
                            wandb_kwargs={"config": dataclasses.asdict(cfg),
                                          "project": "torchrl_r2vpo"})
    except ImportError as err:
        raise SystemExit(f"--logger {cfg.logger} needs its package: pip install {cfg.logger} "
                         f"({err})") from err
    def snapshot() -> dict:
        """The whole training state, copied: taken after each batch, saved as a checkpoint."""
        return copy.deepcopy(dict(
            config=dataclasses.asdict(cfg), frames=frames, version=version,
            loss=loss.state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            history=history.state_dict(), logger=logger.state_dict(),
            rng=rng_state()))

    last_state = snapshot()
    update = make_update(loss, optimizer, cfg.max_grad_norm, compile=cfg.compile)
    threads = torch.get_num_threads()

    # --- training loop ------------------------------------------------------------------
    pbar = tqdm(total=cfg.frames, initial=frames, unit="frames", dynamic_ncols=True)
    last_eval, last_ckpt = frames // cfg.eval_every, frames // cfg.checkpoint_every
    eval_return = float("nan")
    # built last: from here on, whatever happens, the finally below shuts its workers down
    collector = None
    if frames < cfg.frames:  # a resumed run starts fresh episodes, seeded by its version
        collector = make_collector(cfg, actor, cfg.frames - frames, seed=cfg.seed + 1000 * version,
                                   env=env)
    else:
        print(f"nothing to train: {frames} frames done, --frames {cfg.frames}")
    start = iteration_start = time.perf_counter()
    try:
        for data in collector if collector is not None else ():
            torch.set_num_threads(threads)  # a batched env closed after the last batch raises it
            for group in optimizer.param_groups:
                if cfg.compile:
                    group["lr"].fill_(cfg.lr * (1 - frames / cfg.frames))
                else:
                    group["lr"] = cfg.lr * (1 - frames / cfg.frames)
            data.set("policy_version", torch.full(data.shape, version, device=data.device))
            if cfg.reward_scale != 1:  # the returns reported below stay unscaled
                data.set(("next", "reward"), data["next", "reward"] * cfg.reward_scale)
            update_start = time.perf_counter()
            history.extend(data.unsqueeze(0))
            stored = history[: len(history)]  # [K + 1, (workers,) envs, T]: GAE runs along T
            metrics = []
            for _ in range(cfg.epochs):
                with torch.no_grad():
                    gae(stored)  # recomputed with the current critic, stale batches included
                minibatches.empty()
                minibatches.extend(stored.reshape(-1))
                for batch in minibatches:
                    out_td = update(batch)
                    if scheduler is not None and not scheduler.fixed:
                        scheduler.step(out_td)
                    metrics.append(out_td.detach())
            if device.type == "cuda":  # the time of the work, not of queueing it
                torch.cuda.synchronize(device)
            update_s = time.perf_counter() - update_start  # GAE and the optimiser steps
            staleness = ratio_stats_by_staleness(loss, stored.reshape(-1), version)
            obs_norm.update(data["observation"])  # after training: data and update agree
            collector.update_policy_weights_()
            version += 1
            frames += data.numel()

            # --- metrics, evaluation, checkpoint --------------------------------------------
            done = data["next", "done"]
            episode_returns = data["next", "episode_reward"][done]
            physics_errors = data.get(("next", "physics_error"), torch.zeros(())).sum().item()
            mean_metrics = torch.stack(metrics).apply(lambda x: x.float().mean(), batch_size=[])
            row = {key: "" for key in CURVE_FIELDS}
            now = time.perf_counter()  # frames/s of collection and training, not evaluation
            row.update(frames=frames, time_s=round(now - start, 2),
                       fps=round(data.numel() / (now - iteration_start), 1),
                       update_s=round(update_s, 3),
                       physics_errors=physics_errors,
                       train_return=episode_returns.mean().item() if episode_returns.numel() else "")
            for key in CURVE_FIELDS:
                if key in mean_metrics.keys():
                    row[key] = mean_metrics[key].item()
            stop = cfg.time_limit > 0 and now - start >= cfg.time_limit
            if frames // cfg.eval_every > last_eval or frames >= cfg.frames or stop:
                last_eval = frames // cfg.eval_every
                if eval_env is not env:  # its own environments: starts that a resume keeps
                    eval_env.set_seed(eval_seed(cfg, frames))
                eval_return = row["eval_return"] = evaluate(eval_env, actor)
                if eval_env is env:  # the collector's episodes were interrupted: start afresh
                    collector.reset()
            with interrupts_deferred():  # the row, its logs and its state, together
                for key, value in {**row, **staleness}.items():
                    if key != "frames" and value != "":
                        logger.log_scalar(key, value, step=frames)
                append_row(curve_path, CURVE_FIELDS, row)
                last_state = snapshot()
                if frames // cfg.checkpoint_every > last_ckpt or frames >= cfg.frames or stop:
                    last_ckpt = frames // cfg.checkpoint_every
                    save_checkpoint(ckpt_path, last_state)
            pbar.update(data.numel())
            pbar.set_postfix(fps=row["fps"], ret=row["train_return"] or "-",
                             eval=f"{eval_return:.1f}", lam=row["lagrange_multiplier"] or "-",
                             var=f"{row['ratio_var']:.4f}" if row["ratio_var"] != "" else "-")
            if stop:
                print(f"\n--time-limit {cfg.time_limit:g} s reached at frame {frames}")
                break
            iteration_start = time.perf_counter()
    except KeyboardInterrupt:  # save the state after the last complete batch, not a half update
        save_checkpoint(ckpt_path, last_state)
        frames = last_state["frames"]
        print(f"\ninterrupted at frame {frames}; checkpoint saved, continue with --resume")
        return {"interrupted": True, "frames": frames}
    finally:
        pbar.close()
        if eval_env is not env:
            eval_env.close(raise_if_closed=False)  # a stop signal may have closed it
        if collector is not None and shared_env:
            collector.shutdown(close_env=False)
        elif collector is not None:
            collector.shutdown()

    # --- results --------------------------------------------------------------------------
    with open(curve_path) as f:
        rows = [{k: (float(v) if v != "" else "") for k, v in r.items()} for r in csv.DictReader(f)]
    plot_curve(rows, out / "curve.png", f"{cfg.loss} on {cfg.env}, seed {cfg.seed}")
    final = next((r["eval_return"] for r in reversed(rows) if r["eval_return"] != ""), math.nan)
    if not cfg.video:
        video = "no video (--no-video)"
    elif playground:
        video = "no video for Playground tasks"
    else:
        video = try_record_video(cfg.env, actor, out / "policy.gif", cfg.seed, gl_problem)
    print(f"final evaluation return: {final:.1f} after {frames} frames")
    print(f"curve: {curve_path}, plot: {out / 'curve.png'}, checkpoint: {ckpt_path}")
    print(video)
    return {"interrupted": False, "frames": frames, "final_eval_return": final}


if __name__ == "__main__":
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    stop_on_sigterm()
    main(parse_args())
