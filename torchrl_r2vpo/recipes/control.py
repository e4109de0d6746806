"""Continuous control with R2VPO or clipped PPO: the pieces of ``examples/dmc_walker.py``.

Networks (:func:`make_agent`), the loss and its dual-variable scheduler (:func:`make_loss`),
the optimiser (:func:`make_optimizer`), the collector (:func:`make_collector`), evaluation of the
deterministic policy (:func:`evaluate`, :func:`eval_seed`, :func:`save_final_eval`), the recent
training returns of the progress bar (:class:`RecentReturns`), the log-probabilities of stored
actions (:func:`action_log_probs`, e.g. the proximal policy's) and their ratio statistics by age
(:func:`ratio_stats_by_staleness`), reloading a trained policy (:func:`load_actor`)
and the run's plot and GIF. They read their settings from a
:class:`~torchrl_r2vpo.recipes.config.ControlConfig`.

Examples:
    >>> from torchrl_r2vpo.envs import make_env
    >>> env = make_env("cartpole-balance", num_envs=2, seed=0)
    >>> actor, critic, obs_norm = make_agent(env, 5, 1)
    >>> loss, scheduler = make_loss(ControlConfig(), actor, critic)
    >>> returns = episode_returns(env, actor)  # one deterministic episode per environment
    >>> returns.shape
    torch.Size([2])
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import importlib.util
import math
from pathlib import Path

import torch
from tensordict import TensorDict
from tensordict.nn import AddStateIndependentNormalScale, NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import Collector, MultiSyncCollector
from torchrl.envs import EnvBase, ExplorationType, set_exploration_type
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import ClipPPOLoss, PPOLoss

from torchrl_r2vpo.data import staleness_stats
from torchrl_r2vpo.envs import make_env
from torchrl_r2vpo.modules import RunningObservationNorm, UpdateMeanNoise
from torchrl_r2vpo.objectives import DualVariableScheduler, R2VPOLoss
from torchrl_r2vpo.recipes.config import ControlConfig
from torchrl_r2vpo.recipes.run_state import read_checkpoint
from torchrl_r2vpo.record import record_rollout_gif

__all__ = ["CURVE_FIELDS", "EVAL_SEED", "FINAL_EVAL_FIELDS", "RAY_WORKER", "RecentReturns",
           "action_log_probs", "episode_returns", "eval_seed", "evaluate", "load_actor",
           "load_optimizer_state", "make_agent", "make_collector", "make_loss", "make_optimizer",
           "plot_curve", "ratio_stats_by_staleness", "save_final_eval", "set_lr",
           "try_record_video"]

# the columns of curve.csv, one row per collected batch
CURVE_FIELDS = ["frames", "time_s", "fps", "update_s", "train_return", "eval_return",
                "lagrange_multiplier", "ratio_var", "ESS", "clip_fraction", "kl_approx", "entropy",
                "loss_objective", "loss_critic", "physics_errors", "lr", "skipped_steps"]

# the columns of final_eval.csv, one row per start of the final evaluation
FINAL_EVAL_FIELDS = ["frames", "start", "return"]

# resources of one Ray collector actor: it steps CPU simulators
RAY_WORKER = {"num_cpus": 1, "num_gpus": 0}

# evaluation environments are seeded from here on, by run seed and batch (see eval_seed)
EVAL_SEED = 10_000_000


def make_agent(env: EnvBase, obs_dim: int, act_dim: int, *, initial_scale: float = 1.0,
               state_independent_scale: bool = False, rpo_alpha: float = 0.0
               ) -> tuple[ProbabilisticActor, ValueOperator, RunningObservationNorm]:
    """A tanh-Gaussian actor and a value critic, MLPs of two hidden layers of 64 tanh units,
    sharing one observation normaliser (returned too: the training loop updates it).

    ``env`` gives the action spec (``full_action_spec_unbatched`` and
    ``action_spec_unbatched``, whose bounds the tanh maps to). The Gaussian's scale (before
    the tanh) starts at ``initial_scale``; it is a second output of the actor network
    (``softplus(x + b)``, ``b`` chosen so that ``x = 0`` gives ``initial_scale``), or with
    ``state_independent_scale`` one learnt parameter per action dimension, ``exp(s)`` with
    ``s = log(initial_scale)`` at first (TorchRL's ``AddStateIndependentNormalScale``, as in
    CleanRL's and TorchRL's PPO). With ``rpo_alpha > 0`` the actor ends with an
    :class:`~torchrl_r2vpo.modules.UpdateMeanNoise` (RPO), active only inside its ``active()``
    block.
    """
    obs_norm = RunningObservationNorm(obs_dim)
    hidden = dict(num_cells=[64, 64], activation_class=nn.Tanh)
    if state_independent_scale:
        actor_net = nn.Sequential(obs_norm, MLP(obs_dim, act_dim, **hidden),
                                  AddStateIndependentNormalScale(
                                      act_dim, scale_lb=1e-4, init_value=math.log(initial_scale)))
    else:
        actor_net = nn.Sequential(obs_norm, MLP(obs_dim, 2 * act_dim, **hidden),
                                  NormalParamExtractor(f"biased_softplus_{initial_scale!r}",
                                                       scale_lb=1e-4))
    if rpo_alpha > 0:
        actor_net.append(UpdateMeanNoise(rpo_alpha))
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


def make_loss(cfg: ControlConfig, actor: ProbabilisticActor, critic: ValueOperator
              ) -> tuple[PPOLoss, DualVariableScheduler | None]:
    """``cfg.loss``: :class:`~torchrl_r2vpo.R2VPOLoss` with its
    :class:`~torchrl_r2vpo.DualVariableScheduler` (step size 0 when ``cfg.dual`` is fixed), or
    TorchRL's ``ClipPPOLoss`` and ``None``; both with an L2 critic loss and normalised
    advantages. R2VPO takes ``cfg.ratio``, ``cfg.max_behaviour_weight`` (0: no bound) and
    ``cfg.weighted_variance``; its ratio is decoupled where the data carry the proximal
    log-probabilities (:func:`action_log_probs` before the update)."""
    common = dict(entropy_coeff=cfg.entropy_coeff, critic_coeff=cfg.critic_coeff,
                  loss_critic_type="l2", normalize_advantage=True)
    if cfg.loss == "ppo":
        return ClipPPOLoss(actor, critic, clip_epsilon=cfg.clip_epsilon, **common), None
    loss = R2VPOLoss(actor, critic, lagrange_multiplier=cfg.lagrange_multiplier,
                     ratio_var_target=cfg.ratio_var_target,
                     diagnostic_clip_epsilon=cfg.clip_epsilon, ratio=cfg.ratio,
                     max_behaviour_weight=cfg.max_behaviour_weight or None,
                     weighted_variance=cfg.weighted_variance, **common)
    scheduler = DualVariableScheduler(loss, lr=cfg.dual_lr if cfg.dual == "adaptive" else 0.0)
    return loss, scheduler


def make_optimizer(loss: nn.Module, lr: float, compile: bool = False) -> torch.optim.Adam:
    """Adam (``eps=1e-5``) over the loss's parameters, fused on the CPU (one kernel for all
    parameters: the per-parameter Python loop of the default step is most of its cost for
    networks this small).

    Under ``compile`` the learning rate is a tensor on the parameters' device, so that
    annealing it (:func:`set_lr`) recompiles nothing; on CUDA the optimiser then keeps its step
    count there (``capturable``), which foreach Adam needs with a tensor learning rate and CUDA
    graphs need to capture the step.
    """
    device = next(loss.parameters()).device
    capturable = compile and device.type == "cuda"
    return torch.optim.Adam(loss.parameters(), lr=torch.tensor(lr, device=device) if compile else lr,
                            eps=1e-5, capturable=capturable, fused=device.type == "cpu" or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets the learning rate, in place where it is a tensor (:func:`make_optimizer`)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Loads a checkpoint's optimiser state but keeps this optimiser's kind of step (its
    learning rate, a tensor or not, ``capturable``, ``fused`` and ``foreach``): the
    checkpoint's run may have compiled or not, on another device. The learning rate is set from
    the run's schedule anyway."""
    kind = ("lr", "capturable", "fused", "foreach")
    state = {**state, "param_groups": [
        {**saved, **{key: group[key] for key in kind if key in group}}
        for saved, group in zip(state["param_groups"], optimizer.param_groups)]}
    optimizer.load_state_dict(state)


def make_collector(cfg: ControlConfig, actor: ProbabilisticActor, total_frames: int, seed: int,
                   env: EnvBase | None = None) -> Collector | MultiSyncCollector:
    """A collector of ``cfg.frames_per_batch`` frames per batch, whole batches up to
    ``total_frames``; frames are simulator steps, ``cfg.frame_skip`` of them per collected
    transition.

    It steps ``env`` in this process on ``cfg.device`` if given (Playground's batch), else
    builds ``cfg.num_workers`` batches of ``cfg.num_envs`` environments: in this process, in
    worker processes, or in Ray actors (``cfg.collector="ray"``, :data:`RAY_WORKER`). Built
    environments are seeded ``seed, seed + 1, ...`` across workers when they are made, before
    the collector's first reset; ``set_seed`` then also seeds each worker process's torch and
    numpy generators: a run is reproducible from its seed. With ``cfg.compile`` the collectors
    on the CPU (in process or in worker processes) ``torch.compile`` their policy.

    Raises:
        ImportError: ``cfg.collector="ray"`` without ray installed.
    """
    env_fns = [functools.partial(make_env, cfg.env, num_envs=cfg.num_envs,
                                 seed=seed + worker * cfg.num_envs, frame_skip=cfg.frame_skip)
               for worker in range(cfg.num_workers)]
    batches = math.ceil(total_frames / cfg.frames_per_batch)  # whole batches only
    transitions = cfg.frames_per_batch // cfg.frame_skip
    frames = dict(frames_per_batch=transitions, total_frames=batches * transitions)
    kwargs = dict(auto_register_policy_transforms=False, **frames)
    # --compile: the CPU collectors compile their copy of the policy
    compiled = dict(compile_policy=cfg.compile or None)
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
        collector = MultiSyncCollector(env_fns, actor, **kwargs, **compiled)
    else:
        collector = Collector(env_fns[0](), actor, **kwargs, **compiled)
    collector.set_seed(seed)
    return collector


def episode_returns(env: EnvBase, actor: ProbabilisticActor) -> torch.Tensor:
    """Returns of the deterministic (mode) policy, one episode per environment: ``[num_envs]``.

    An episode's return is its ``episode_reward`` at its first ``done``.
    """
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        rollout = env.rollout(100_000, actor, break_when_any_done=False,
                              break_when_all_done=True)
    if rollout.ndim == 1:  # a single environment is not batched
        rollout = rollout.unsqueeze(0)
    done = rollout["next", "done"].squeeze(-1)  # [episodes, T]
    last = torch.full_like(done[:, :1], done.shape[-1] - 1, dtype=torch.long)
    first_done = torch.where(done.any(-1, keepdim=True), done.int().argmax(-1, keepdim=True), last)
    return rollout["next", "episode_reward"].squeeze(-1).gather(-1, first_done).squeeze(-1)


def evaluate(env: EnvBase, actor: ProbabilisticActor) -> float:
    """Mean return of the deterministic (mode) policy over one episode per environment."""
    return episode_returns(env, actor).mean().item()


def eval_seed(cfg: ControlConfig, frames: int) -> int:
    """The seed of the evaluation environments after ``frames`` training frames:
    ``EVAL_SEED + 100_000 * seed + eval_episodes * batch``, the same whether the run was
    resumed before it or not, and different for every batch and every run seed."""
    return EVAL_SEED + 100_000 * cfg.seed + cfg.eval_episodes * (frames // cfg.frames_per_batch)


def save_final_eval(path: Path, frames: int, returns: torch.Tensor) -> None:
    """Writes the final evaluation's returns to ``path`` (atomically), one row per start:
    :data:`FINAL_EVAL_FIELDS`, ``frames`` being the training frames before it."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FINAL_EVAL_FIELDS)
        writer.writerows((frames, start, value) for start, value in enumerate(returns.tolist()))
    tmp.replace(path)


class RecentReturns:
    """The returns of the last ``window`` episodes to finish, kept across batches, for a
    progress bar.

    ``str()`` gives their mean; before any episode has finished (a batch rarely ends an episode
    of 1,000 steps), the mean reward per step of the last batch, marked ``/step``: an episode's
    length varies by task, so it is not scaled to one.

    Examples:
        >>> recent = RecentReturns(window=2)
        >>> done = torch.tensor([[False, False], [False, False]]).unsqueeze(-1)
        >>> batch = TensorDict({"next": {"reward": torch.full((2, 2, 1), 0.25), "done": done,
        ...                              "episode_reward": torch.zeros(2, 2, 1)}}, [2, 2])
        >>> recent.update(batch)
        >>> str(recent)
        '0.250/step'
        >>> batch["next", "done"][:, 1] = True  # both environments end an episode at step 1
        >>> batch["next", "episode_reward"][:, 1] = torch.tensor([[10.0], [20.0]])
        >>> recent.update(batch)
        >>> str(recent)
        '15.0'
    """

    def __init__(self, window: int = 10):
        self.returns = collections.deque(maxlen=window)
        self.reward_per_step = math.nan

    def update(self, data: TensorDict) -> None:
        """Adds the returns of the episodes that ``data`` (``[..., T]``) ends, in the order
        they ended, and keeps its mean reward per step."""
        done = data["next", "done"].squeeze(-1)
        returns = data["next", "episode_reward"].squeeze(-1)[done]
        order = done.nonzero()[:, -1].argsort(stable=True)  # by the step each one ended at
        self.returns.extend(returns[order].tolist())
        self.reward_per_step = data["next", "reward"].mean().item()

    def __str__(self) -> str:
        if self.returns:
            return f"{sum(self.returns) / len(self.returns):.1f}"
        return f"{self.reward_per_step:.3f}/step"


def load_actor(path: Path, env: EnvBase) -> tuple[ControlConfig, ProbabilisticActor]:
    """The run's settings and its trained actor, from a ``checkpoint.pt`` of the example.

    ``env`` is any environment of the run's task (it gives the actor its specs).

    Examples:
        >>> env = make_env("walker-walk", num_envs=16, seed=123)  # doctest: +SKIP
        >>> cfg, actor = load_actor(Path("runs/walker/checkpoint.pt"), env)  # doctest: +SKIP
        >>> evaluate(env, actor)  # mean return from 16 starts  # doctest: +SKIP
    """
    ckpt = read_checkpoint(path, map_location="cpu")
    names = {field.name for field in dataclasses.fields(ControlConfig)}
    cfg = ControlConfig(**{**{k: v for k, v in ckpt["config"].items() if k in names},
                           "device": "cpu"})
    actor, critic, _ = make_agent(env, env.observation_spec["observation"].shape[-1],
                                  env.action_spec.shape[-1], initial_scale=cfg.initial_scale,
                                  state_independent_scale=cfg.state_independent_scale,
                                  rpo_alpha=cfg.rpo_alpha)
    make_loss(cfg, actor, critic)[0].load_state_dict(ckpt["loss"])  # the actor's parameters
    return cfg, actor


def action_log_probs(actor: ProbabilisticActor, stored: TensorDict) -> torch.Tensor:
    """:math:`\\log \\pi(a|s)` of each stored action under ``actor`` as it is now, without
    gradient, shaped as ``stored`` (any batch shape, e.g. ``[K + 1, (workers,) envs, T]``).

    Taken before an update's epochs, these are the proximal policy's log-probabilities, which
    :class:`~torchrl_r2vpo.R2VPOLoss` reads under its ``tensor_keys.proximal_log_prob``.
    """
    with torch.no_grad():
        return actor.get_dist(stored.clone(False)).log_prob(stored["action"])


def ratio_stats_by_staleness(actor: ProbabilisticActor, stored: TensorDict, version: int,
                             log_prob_key: str = "action_log_prob",
                             proximal_log_prob_key: str | None = None,
                             clip_epsilon: float = 0.2) -> dict[str, float]:
    """The ratio statistics of the stored transitions after an update, for each data age
    ``version - policy_version`` (0: this batch): ``{"stale{k}/{field}": value}``, with the
    fields of :func:`torchrl_r2vpo.data.staleness_stats`.

    ``log_prob_key`` holds :math:`\\log \\pi_b`, the behaviour policy's log-probability (the
    loss's ``tensor_keys.sample_log_prob``). When ``stored`` also holds
    ``proximal_log_prob_key`` (:math:`\\log \\pi_{prox}`: :func:`action_log_probs` before the
    update), the ratio is :math:`\\pi_\\theta / \\pi_{prox}`, the step of this
    update, and the weight :math:`\\pi_{prox} / \\pi_b` (untruncated); else the ratio is
    :math:`\\pi_\\theta / \\pi_b` and the weight 1. ``clip_epsilon`` is the band of
    ``clip_fraction``.
    """
    log_prob = action_log_probs(actor, stored)  # pi_theta: the actor after the update
    behaviour = stored[log_prob_key]
    weight = None
    if proximal_log_prob_key is not None and proximal_log_prob_key in stored.keys(True):
        proximal = stored[proximal_log_prob_key]
        ratio, weight = (log_prob - proximal).exp(), (proximal - behaviour).exp()
    else:
        ratio = (log_prob - behaviour).exp()
    return staleness_stats(ratio, version - stored["policy_version"], weight=weight,
                           clip_epsilon=clip_epsilon)


def try_record_video(env_name: str, actor: ProbabilisticActor, path: Path, seed: int,
                     gl_problem: str | None, frame_skip: int = 1) -> str:
    """Saves a GIF of one deterministic episode at ``path`` and says where, or says why there
    is none: ``gl_problem`` (from :func:`torchrl_r2vpo.record.select_mujoco_gl`), or the
    renderer's error."""
    if gl_problem is not None:
        return f"no video: MuJoCo cannot render offscreen here: {gl_problem}"
    try:
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            record_rollout_gif(env_name, actor, path, seed=seed, frame_skip=frame_skip)
    except Exception as err:  # the renderer's own errors vary by OpenGL backend
        return f"no video: MuJoCo offscreen rendering failed ({type(err).__name__}: {err})"
    return f"video: {path}"


def plot_curve(rows: list[dict], path: Path, title: str) -> None:
    """Plots the training (stochastic) and evaluation (deterministic) returns of a curve's
    rows against frames, to ``path``."""
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
