"""Continuous-control environments: DeepMind Control, gymnasium and MuJoCo Playground through one factory."""

from __future__ import annotations

import functools
import importlib.util
import re

import numpy as np
import torch
from torchrl.data import Binary
from torchrl.envs import (
    CatTensors,
    Compose,
    DMControlEnv,
    DoubleToFloat,
    EnvBase,
    GymEnv,
    InitTracker,
    ParallelEnv,
    RewardSum,
    SerialEnv,
    StepCounter,
    TransformedEnv,
)
from torchrl.envs.gym_like import default_info_dict_reader

from torchrl_r2vpo.envs.playground import PLAYGROUND_PREFIX, playground_env

__all__ = ["FaultTolerantDMControlEnv", "make_env", "parse_env_name"]

PHYSICS_ERROR_KEY = "physics_error"


def parse_env_name(name: str) -> tuple[str, str | None]:
    """Splits ``"walker-walk"`` into ``("walker", "walk")``; gymnasium ids give ``(id, None)``.

    A name is a dm_control ``domain-task`` when its domain is a dm_control suite
    domain (so ``dm_control/walker-walk-v0``, a gymnasium id, stays a gymnasium
    id). Tasks may contain underscores (``cartpole-swingup_sparse``). Without
    dm_control installed, any lowercase ``domain-task`` name counts as one (gymnasium
    ids end in a version, ``-v5``), so that :func:`make_env` can say what to install.

    Examples:
        >>> parse_env_name("walker-walk")
        ('walker', 'walk')
        >>> parse_env_name("cartpole-swingup_sparse")
        ('cartpole', 'swingup_sparse')
        >>> parse_env_name("HalfCheetah-v5")
        ('HalfCheetah-v5', None)
    """
    domain, sep, task = name.partition("-")
    domains = _dm_control_domains()
    if domains is None:  # dm_control is not installed
        is_dm_control = re.fullmatch(r"[a-z_]+-[a-z_]+", name) is not None
    else:
        is_dm_control = bool(sep and task) and domain in domains
    return (domain, task) if is_dm_control else (name, None)


def _dm_control_domains() -> set[str] | None:
    if importlib.util.find_spec("dm_control") is None:
        return None
    from dm_control import suite

    return {domain for domain, _ in suite.ALL_TASKS}


class _PhysicsFaultGuard:
    """A dm_control ``Environment`` proxy that ends the episode on ``PhysicsError``.

    The step that fails returns the last valid observation, a zero reward and a
    *truncation* (``discount=1``): the episode ends without pretending the state
    is terminal, so value bootstrapping stays unbiased. The next reset rebuilds
    the physics.
    """

    def __init__(self, env):
        self._env = env
        self._last_observation = None
        self.faulted = False

    def reset(self):
        timestep = self._env.reset()
        self._keep(timestep)
        return timestep

    def _keep(self, timestep) -> None:
        # a copy: TorchRL writes its outputs into the observation dict it reads
        self._last_observation = type(timestep.observation)(timestep.observation)
        self.faulted = False

    def step(self, action):
        import dm_env
        from dm_control.rl.control import PhysicsError

        try:
            timestep = self._env.step(action)
        except PhysicsError:
            self.faulted = True
            return dm_env.truncation(0.0, type(self._last_observation)(self._last_observation))
        self._keep(timestep)
        return timestep

    def __getattr__(self, name):
        return getattr(self._env, name)


class FaultTolerantDMControlEnv(DMControlEnv):
    """:class:`~torchrl.envs.DMControlEnv` that survives simulator faults.

    A dm_control ``PhysicsError`` (an unstable simulation) ends the episode as a
    truncation instead of raising, and the step output carries
    ``("next", "physics_error") = True`` so faults can be counted and logged.

    Examples:
        >>> env = FaultTolerantDMControlEnv("cartpole", "balance")
        >>> bool(env.rollout(3)["next", "physics_error"].any())
        False
    """

    def _build_env(self, env_name, task_name, _seed=None, **kwargs):
        env = super()._build_env(env_name, task_name, _seed=_seed, **kwargs)
        return _PhysicsFaultGuard(env)

    def _make_specs(self, env) -> None:
        super()._make_specs(env)
        reader = default_info_dict_reader(
            [PHYSICS_ERROR_KEY],
            spec={PHYSICS_ERROR_KEY: Binary(1, dtype=torch.bool, device=self.device)},
        )
        self.set_info_dict_reader(reader)

    def _output_transform(self, timestep_tuple):
        observation, reward, terminated, truncated, done, info = super()._output_transform(
            timestep_tuple
        )
        info[PHYSICS_ERROR_KEY] = np.array([self._env.faulted])
        return observation, reward, terminated, truncated, done, info


def _base_env(name: str, seed: int | None, device) -> EnvBase:
    domain, task = parse_env_name(name)
    if task is None:
        if importlib.util.find_spec("gymnasium") is None:
            raise ImportError(
                f"{name!r} is a gymnasium id but gymnasium is not installed: "
                "pip install 'torchrl_r2vpo[gym]'."
            )
        env = GymEnv(name, device=device)
    else:
        if importlib.util.find_spec("dm_control") is None:
            raise ImportError(
                f"{name!r} is a DeepMind Control task but dm_control is not installed: "
                "pip install 'torchrl_r2vpo[dmc]'."
            )
        from dm_control import suite

        if (domain, task) not in suite.ALL_TASKS:
            known = ", ".join(f"{d}-{t}" for d, t in suite.ALL_TASKS)
            raise ValueError(f"Unknown DeepMind Control task {name!r}. Known: {known}.")
        env = FaultTolerantDMControlEnv(domain, task, device=device)
    if seed is not None:
        env.set_seed(seed)
    return env


def make_env(
    name: str,
    *,
    num_envs: int = 1,
    parallel: bool = False,
    seed: int | None = None,
    device: torch.device | str | None = None,
    max_episode_steps: int | None = None,
) -> TransformedEnv:
    """Builds a continuous-control environment with the usual TorchRL transforms.

    ``name`` is a DeepMind Control ``domain-task`` (``"walker-walk"``,
    ``"cartpole-swingup_sparse"``) run through :class:`FaultTolerantDMControlEnv`,
    a gymnasium id (``"HalfCheetah-v5"``, ``"Pendulum-v1"``) run through
    :class:`~torchrl.envs.GymEnv`, or a MuJoCo Playground task
    (``"playground:WalkerWalk"``, ``"playground:CartpoleSwingupSparse"``) run
    through :class:`PlaygroundEnv` (the ``playground`` extra): ``num_envs``
    environments simulated together by MJX in JAX, on the GPU where JAX has one,
    with MuJoCo Warp where it is installed and ``device`` is CUDA, else MJX's
    JAX implementation; their tensors are handed to torch on ``device`` without
    a copy. Playground tasks get the episode length of their default
    configuration as a truncation. The environment gets one float32
    ``"observation"`` vector (dm_control's observation dictionary concatenated),
    a step counter, an init tracker and an ``"episode_reward"`` sum. Batched
    environments are stepped together and the transforms run once, on the
    batch. Observations are *not* normalised here: normalise them in the
    networks (:class:`~torchrl_r2vpo.modules.RunningObservationNorm`), where the
    statistics travel with the policy weights to every collector worker and
    into checkpoints.

    Args:
        name (str): the task.

    Keyword Args:
        num_envs (int, optional): environments stepped together, batched along a
            leading dimension. Defaults to ``1`` (an unbatched environment; a
            Playground environment always has the batch dimension).
        parallel (bool, optional): with ``num_envs > 1``, step them in
            subprocesses (:class:`~torchrl.envs.ParallelEnv`) instead of in this
            process (:class:`~torchrl.envs.SerialEnv`). Defaults to ``False``.
        seed (int, optional): seeds the environment(s); batched environments get
            ``seed, seed + 1, ...``.
        device (torch.device, optional): where the environment's tensors live
            (``"cuda"`` for Playground on a GPU). Defaults to the CPU.
        max_episode_steps (int, optional): truncation horizon added on top of the
            task's own (dm_control tasks end after 1000 steps).

    Examples:
        >>> env = make_env("cartpole-swingup_sparse", num_envs=2, seed=0)
        >>> td = env.rollout(5)
        >>> td["observation"].shape, td["next", "episode_reward"].shape
        (torch.Size([2, 5, 5]), torch.Size([2, 5, 1]))
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}.")
    if name.startswith(PLAYGROUND_PREFIX):
        env, episode_steps = playground_env(name, num_envs, seed, device)
        if max_episode_steps is None or max_episode_steps > episode_steps:
            max_episode_steps = episode_steps  # Playground leaves the time limit to the trainer
    elif num_envs == 1:
        env = _base_env(name, seed, device)
    else:
        factories = [
            functools.partial(_base_env, name, None if seed is None else seed + i, device)
            for i in range(num_envs)
        ]
        env = (ParallelEnv if parallel else SerialEnv)(num_envs, factories, device=device)
    observation_keys = [
        key for key in env.observation_spec.keys(True, True) if key != PHYSICS_ERROR_KEY
    ]
    transforms = []
    if observation_keys != ["observation"]:
        transforms.append(CatTensors(in_keys=observation_keys, out_key="observation"))
    transforms += [
        DoubleToFloat(),
        StepCounter(max_steps=max_episode_steps),
        InitTracker(),
        RewardSum(),
    ]
    return TransformedEnv(env, Compose(*transforms))
