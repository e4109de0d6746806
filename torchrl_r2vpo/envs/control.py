"""Continuous-control environments: DeepMind Control, gymnasium and MuJoCo Playground through one factory."""

from __future__ import annotations

import functools
import importlib.util
import re

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Binary, Bounded, Composite, Unbounded
from torchrl.envs import (
    CatTensors,
    Compose,
    DMControlEnv,
    DoubleToFloat,
    EnvBase,
    GymEnv,
    GymWrapper,
    InitTracker,
    ParallelEnv,
    RewardSum,
    StepCounter,
    TransformedEnv,
)
from torchrl._utils import seed_generator
from torchrl.envs.gym_like import default_info_dict_reader

from torchrl_r2vpo.envs.playground import PLAYGROUND_PREFIX, playground_env

__all__ = ["DMControlBatchEnv", "FaultTolerantDMControlEnv", "make_env", "parse_env_name"]

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


class DMControlBatchEnv(EnvBase):
    """A batch of ``num_envs`` DeepMind Control environments stepped in one loop.

    One :class:`~tensordict.TensorDict` per step for the whole batch: each
    environment is stepped on its row of the action, and the observations,
    rewards and flags are written into shared arrays. A
    :class:`~torchrl.envs.SerialEnv` of :class:`FaultTolerantDMControlEnv`
    builds, reads and copies a TensorDict per environment and per step, which
    costs several times the physics; this environment produces the same data
    (same seeds, same values) at a fraction of that.

    Each output is what the ``SerialEnv`` of :class:`FaultTolerantDMControlEnv`
    gives after ``CatTensors`` and ``DoubleToFloat``: ``"observation"``, the
    task's observations flattened and concatenated in sorted key order, as
    float32; ``"reward"`` as float32; ``done``/``terminated``/``truncated``
    (the episode's last step is a termination when its discount is 0, else a
    truncation); and ``"physics_error"``, ``True`` on a step where the
    simulation became unstable (the episode then ends as a truncation, as in
    :class:`FaultTolerantDMControlEnv`). Seeds follow a ``SerialEnv``'s
    (:meth:`set_seed`). Partial resets
    (``"_reset"``) reset only the flagged environments. With ``frame_skip = k``
    each action is applied for ``k`` simulator steps (fewer where the episode
    ends), and the reward is their sum, as ``DMControlEnv(frame_skip=k)`` does.

    Args:
        domain (str): the dm_control domain (``"walker"``).
        task (str): the task (``"walk"``).
        num_envs (int): the batch size.

    Keyword Args:
        frame_skip (int, optional): simulator steps per action. Defaults to ``1``.
        device (torch.device, optional): where the tensors live. Defaults to the CPU.

    Examples:
        >>> env = DMControlBatchEnv("cartpole", "balance", num_envs=3)
        >>> _ = env.set_seed(0)
        >>> env.rollout(4)["next", "observation"].shape
        torch.Size([3, 4, 5])
    """

    _has_frame_skip = True  # its _step repeats the action (no FrameSkipTransform on top)

    def __init__(self, domain: str, task: str, num_envs: int, *, frame_skip: int = 1,
                 device=None):
        from dm_control import suite

        if frame_skip < 1:
            raise ValueError(f"frame_skip must be >= 1, got {frame_skip}.")
        super().__init__(batch_size=torch.Size([num_envs]), device=device)
        self.domain, self.task, self.frame_skip = domain, task, frame_skip
        self._envs = [_PhysicsFaultGuard(suite.load(domain, task)) for _ in range(num_envs)]
        self._keys = sorted(self._envs[0].observation_spec())
        obs_dim = sum(int(np.prod(spec.shape)) for spec in self._envs[0].observation_spec().values())
        self._observation = np.zeros((num_envs, obs_dim), dtype=np.float32)
        self._reward = np.zeros((num_envs, 1), dtype=np.float32)
        self._flags = np.zeros((3, num_envs, 1), dtype=bool)  # terminated, truncated, physics error
        action = self._envs[0].action_spec()
        shape = (num_envs, *action.shape)
        self.action_spec = Bounded(
            low=torch.tensor(np.broadcast_to(action.minimum, shape), dtype=torch.float32),
            high=torch.tensor(np.broadcast_to(action.maximum, shape), dtype=torch.float32),
            shape=shape, dtype=torch.float32, device=self.device)
        self.observation_spec = Composite(
            observation=Unbounded((num_envs, obs_dim), dtype=torch.float32, device=self.device),
            **{PHYSICS_ERROR_KEY: Binary(1, shape=(num_envs, 1), dtype=torch.bool, device=self.device)},
            shape=(num_envs,), device=self.device)
        self.reward_spec = Unbounded((num_envs, 1), dtype=torch.float32, device=self.device)
        done = Binary(1, shape=(num_envs, 1), dtype=torch.bool, device=self.device)
        self.done_spec = Composite(done=done, terminated=done.clone(), truncated=done.clone(),
                                   shape=(num_envs,), device=self.device)

    def _write_observation(self, i: int, observation) -> None:
        self._observation[i] = np.concatenate(
            [np.asarray(observation[key], dtype=np.float64).ravel() for key in self._keys])

    def _output(self, with_reward: bool) -> TensorDictBase:
        terminated, truncated, faulted = (torch.from_numpy(f.copy()) for f in self._flags)
        out = {"observation": torch.from_numpy(self._observation.copy()),
               PHYSICS_ERROR_KEY: faulted, "terminated": terminated, "truncated": truncated,
               "done": terminated | truncated}
        if with_reward:
            out["reward"] = torch.from_numpy(self._reward.copy())
        return TensorDict(out, batch_size=self.batch_size).to(self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        actions = tensordict["action"].detach().cpu().double().numpy()
        terminated, truncated, faulted = self._flags
        for i, env in enumerate(self._envs):
            reward = 0.0
            for _ in range(self.frame_skip):
                timestep = env.step(actions[i])
                reward += timestep.reward or 0.0
                if timestep.last():
                    break
            self._write_observation(i, timestep.observation)
            self._reward[i] = reward
            last = timestep.last()
            truncated[i] = last and bool(np.isclose(timestep.discount, 1))
            terminated[i] = last and not truncated[i]
            faulted[i] = env.faulted
        return self._output(with_reward=True)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        which = (range(len(self._envs)) if reset is None
                 else np.flatnonzero(reset.reshape(len(self._envs), -1).any(-1).cpu().numpy()))
        for i in which:
            self._write_observation(i, self._envs[i].reset().observation)
            self._flags[:, i] = False
        return self._output(with_reward=False)

    def seed_each(self, seeds) -> None:
        """Seeds environment ``i`` with ``seeds[i]`` and resets the batch."""
        for env, seed in zip(self._envs, seeds, strict=True):  # as DMControlEnv seeds itself
            env.task._random = np.random.RandomState(seed)
        self._reset()

    def set_seed(self, seed: int | None = None, static_seed: bool = False) -> int | None:
        """Seeds the environments in turn as a :class:`~torchrl.envs.SerialEnv` does: the
        first with ``seed``, each next one with the seed the previous returned; returns the
        seed after the last."""
        if seed is None:
            return None
        seeds = []
        for _ in self._envs:
            seeds.append(seed)
            seed = seed if static_seed else seed_generator(seed)
        self.seed_each(seeds)
        return seed

    def _set_seed(self, seed: int | None) -> None:
        """Not used: :meth:`set_seed` seeds each environment."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(domain={self.domain!r}, task={self.task!r}, "
                f"frame_skip={self.frame_skip}, batch_size={self.batch_size})")


def _check_dm_control_task(name: str) -> tuple[str, str]:
    """``(domain, task)`` of a DeepMind Control task name, or a clear error."""
    if importlib.util.find_spec("dm_control") is None:
        raise ImportError(
            f"{name!r} is a DeepMind Control task but dm_control is not installed: "
            "pip install 'torchrl_r2vpo[dmc]'."
        )
    from dm_control import suite

    domain, task = parse_env_name(name)
    if (domain, task) not in suite.ALL_TASKS:
        known = ", ".join(f"{d}-{t}" for d, t in suite.ALL_TASKS)
        raise ValueError(f"Unknown DeepMind Control task {name!r}. Known: {known}.")
    return domain, task


def _check_gymnasium(name: str) -> None:
    if importlib.util.find_spec("gymnasium") is None:
        raise ImportError(
            f"{name!r} is a gymnasium id but gymnasium is not installed: "
            "pip install 'torchrl_r2vpo[gym]'."
        )


@functools.cache
def _action_repeat_wrapper() -> type:
    """A gymnasium wrapper that applies each action ``frame_skip`` times (fewer where the
    episode ends) and returns the summed reward: ``GymEnv(frame_skip=k)`` for one
    environment of a ``SyncVectorEnv``."""
    import gymnasium

    class ActionRepeat(gymnasium.Wrapper):
        def __init__(self, env, frame_skip: int):
            super().__init__(env)
            self.frame_skip = frame_skip

        def step(self, action):
            reward = 0.0
            for _ in range(self.frame_skip):
                observation, step_reward, terminated, truncated, info = self.env.step(action)
                reward += step_reward
                if terminated or truncated:
                    break
            return observation, reward, terminated, truncated, info

    return ActionRepeat


def _gymnasium_make(name: str, frame_skip: int):
    import gymnasium

    env = gymnasium.make(name)
    return env if frame_skip == 1 else _action_repeat_wrapper()(env, frame_skip)


def _gymnasium_batch(name: str, num_envs: int, seed: int | None, frame_skip: int,
                     device) -> EnvBase:
    """``num_envs`` gymnasium environments stepped together by gymnasium's ``SyncVectorEnv``
    (without auto-reset: TorchRL resets the finished ones), one TensorDict per step; seeded
    ``seed, seed + 1, ...`` (gymnasium's rule, also on :meth:`set_seed`)."""
    _check_gymnasium(name)
    import gymnasium

    vector = gymnasium.vector.SyncVectorEnv(
        [functools.partial(_gymnasium_make, name, frame_skip)] * num_envs,
        autoreset_mode=gymnasium.vector.AutoresetMode.DISABLED)
    env = GymWrapper(vector, device=device)
    if seed is not None:
        env.set_seed(seed)
    return env


def _base_env(name: str, seed: int | None, frame_skip: int, device) -> EnvBase:
    domain, task = parse_env_name(name)
    if task is None:
        _check_gymnasium(name)
        env = GymEnv(name, frame_skip=frame_skip, device=device)
    else:
        env = FaultTolerantDMControlEnv(*_check_dm_control_task(name), frame_skip=frame_skip,
                                        device=device)
    if seed is not None:
        env.set_seed(seed)
    return env


def make_env(
    name: str,
    *,
    num_envs: int = 1,
    parallel: bool = False,
    seed: int | None = None,
    frame_skip: int = 1,
    device: torch.device | str | None = None,
    max_episode_steps: int | None = None,
) -> TransformedEnv:
    """Builds a continuous-control environment with the usual TorchRL transforms.

    ``name`` is a DeepMind Control ``domain-task`` (``"walker-walk"``,
    ``"cartpole-swingup_sparse"``) run through :class:`FaultTolerantDMControlEnv`
    (a batch: :class:`DMControlBatchEnv`, the same data in one loop),
    a gymnasium id (``"HalfCheetah-v5"``, ``"Pendulum-v1"``) run through
    :class:`~torchrl.envs.GymEnv` (a batch: gymnasium's ``SyncVectorEnv``), or a MuJoCo Playground task
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
            process (:class:`DMControlBatchEnv` for DeepMind Control, gymnasium's
            ``SyncVectorEnv`` for gymnasium). Defaults to ``False``.
        seed (int, optional): seeds the environment(s); batched environments get
            ``seed, seed + 1, ...``.
        frame_skip (int, optional): simulator steps per action (action repeat): each
            action is applied ``frame_skip`` times, or until the episode ends, and the
            step's reward is the sum (TorchRL's ``frame_skip``). Not for Playground tasks,
            whose control step is part of the task. Defaults to ``1``.
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
    if frame_skip < 1:
        raise ValueError(f"frame_skip must be >= 1, got {frame_skip}.")
    if name.startswith(PLAYGROUND_PREFIX):
        if frame_skip != 1:
            raise ValueError(f"frame_skip={frame_skip}: Playground tasks ({name!r}) set their "
                             "own control step; use frame_skip=1.")
        env, episode_steps = playground_env(name, num_envs, seed, device)
        if max_episode_steps is None or max_episode_steps > episode_steps:
            max_episode_steps = episode_steps  # Playground leaves the time limit to the trainer
    elif num_envs == 1:
        env = _base_env(name, seed, frame_skip, device)
    elif parallel:
        factories = [
            functools.partial(_base_env, name, None if seed is None else seed + i, frame_skip,
                              device)
            for i in range(num_envs)
        ]
        env = ParallelEnv(num_envs, factories, device=device)
    elif parse_env_name(name)[1] is not None:  # DeepMind Control: one loop, one TensorDict
        env = DMControlBatchEnv(*_check_dm_control_task(name), num_envs,
                                frame_skip=frame_skip, device=device)
        if seed is not None:
            env.seed_each([seed + i for i in range(num_envs)])
    else:  # gymnasium: its SyncVectorEnv, one TensorDict
        env = _gymnasium_batch(name, num_envs, seed, frame_skip, device)
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
