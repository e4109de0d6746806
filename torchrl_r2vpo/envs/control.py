"""Continuous-control environments: DeepMind Control, gymnasium and MuJoCo Playground through one factory."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict
from torchrl.data import Binary
from torchrl.envs import (
    CatTensors,
    Compose,
    DMControlEnv,
    DoubleToFloat,
    EnvBase,
    GymEnv,
    InitTracker,
    MujocoPlaygroundEnv,
    ParallelEnv,
    RewardSum,
    SerialEnv,
    StepCounter,
    TransformedEnv,
)
from torchrl.envs.gym_like import default_info_dict_reader
from torchrl.envs.libs.jax_utils import _ndarray_to_tensor, _tensor_to_ndarray

__all__ = [
    "FaultTolerantDMControlEnv",
    "PlaygroundEnv",
    "make_env",
    "parse_env_name",
    "record_rollout_gif",
    "select_mujoco_gl",
]

PHYSICS_ERROR_KEY = "physics_error"
PLAYGROUND_PREFIX = "playground:"


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


class PlaygroundEnv(MujocoPlaygroundEnv):
    """:class:`~torchrl.envs.MujocoPlaygroundEnv` with one compiled batch step and per-environment resets.

    The batch of environments is stepped by a single ``jax.jit(jax.vmap(step))``
    call (TorchRL's wrapper runs ``jax.vmap(jax.jit(step))``, which batches the
    step again in Python at every call, and reads the env's observation size,
    which traces its reset, at every step), with the state's dtypes and device
    kept fixed so the step compiles once. JAX runs on its default device; the
    tensors are handed to torch through DLPack, without a copy when that is
    ``device``. A reset with a ``"_reset"`` mask re-initialises only
    the masked environments and keeps the state of the others (TorchRL's wrapper
    resets the whole batch), so a collector can run environments whose episodes
    end at different steps. Only flat, single-agent batches (``batch_size=[n]``)
    are supported.

    It takes :class:`~torchrl.envs.MujocoPlaygroundEnv`'s arguments; build it
    through :func:`make_env` (``"playground:<TaskName>"``) to get the usual
    transforms.
    """

    def _init_env(self) -> None:
        super()._init_env()
        if len(self.batch_size) != 1 or self._agent_mapping is not None:
            raise ValueError("PlaygroundEnv needs a flat single-agent batch: batch_size=[n].")
        jax = self.jax

        def strong(tree):  # weak-typed leaves would make the step compile a second time
            return jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype), tree)

        def where(mask, new, old):
            return jax.tree.map(
                lambda n, o: jax.numpy.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o),
                new, old,
            )

        self._vmap_jit_env_reset = jax.jit(lambda keys: strong(jax.vmap(self._env.reset)(keys)))
        self._vmap_jit_env_step = jax.jit(
            lambda state, action: strong(jax.vmap(self._env.step)(state, action))
        )
        self._where = jax.jit(where)

    def _obs_is_dict(self) -> bool:  # computed once: it traces the env's reset
        if getattr(self, "_obs_dict", None) is None:
            self._obs_dict = super()._obs_is_dict()
        return self._obs_dict

    def _reset(self, tensordict=None, **kwargs):
        jax = self.jax
        if self._key is None:
            self._set_seed(getattr(self, "_seed", None))
        keys = jax.random.split(self._key, self.batch_size.numel() + 1)
        self._key = keys[0]
        # committed to a device, as the actions from torch are: the step compiles once
        state = self._vmap_jit_env_reset(jax.device_put(keys[1:], jax.devices()[0]))
        mask = None if tensordict is None else tensordict.get("_reset", None)
        if mask is not None and self._current_state is not None:
            mask = _tensor_to_ndarray(mask.reshape(-1).to(torch.uint8)) != 0
            state = self._where(mask, state, self._current_state)
        self._current_state = state
        done = _ndarray_to_tensor(state.done).to(self.device).bool().view(*self.batch_size, 1)
        return TensorDict._new_unsafe(
            {**self._extract_obs(state), "done": done, "terminated": done.clone()},
            batch_size=self.batch_size,
            device=self.device,
        )


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


def _playground_env(name: str, num_envs: int, seed: int | None, device) -> tuple[PlaygroundEnv, int]:
    task = name[len(PLAYGROUND_PREFIX):]
    if importlib.util.find_spec("mujoco_playground") is None:
        raise ImportError(
            f"{name!r} is a MuJoCo Playground task but playground is not installed: "
            "pip install 'torchrl_r2vpo[playground]'."
        )
    # JAX would otherwise reserve most of the GPU's memory before torch gets any
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from mujoco_playground import registry

    if task not in registry.ALL_ENVS:
        known = ", ".join(PLAYGROUND_PREFIX + t for t in registry.ALL_ENVS)
        raise ValueError(f"Unknown MuJoCo Playground task {name!r}. Known: {known}.")
    device = torch.device("cpu" if device is None else device)
    # MuJoCo Warp only where it is installed and has a GPU; else MJX's JAX implementation
    warp = device.type == "cuda" and importlib.util.find_spec("warp") is not None
    env = PlaygroundEnv(task, batch_size=[num_envs], device=device,
                        config_overrides={"impl": "warp" if warp else "jax"})
    if seed is not None:
        env.set_seed(seed)
    return env, registry.get_default_config(task).episode_length


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
        env, episode_steps = _playground_env(name, num_envs, seed, device)
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


def select_mujoco_gl(timeout: float = 60.0) -> str | None:
    """Picks a MuJoCo OpenGL backend for offscreen rendering on a machine without a display.

    Call it before dm_control or MuJoCo is imported. With ``MUJOCO_GL`` already
    set, or a ``DISPLAY``, it changes nothing. Otherwise it tries EGL in a
    subprocess (a broken EGL would break the import itself) and sets
    ``MUJOCO_GL=egl`` when a frame renders.

    Returns:
        ``None`` if rendering should work, else a one-line reason it will not.
    """
    if "MUJOCO_GL" in os.environ or os.environ.get("DISPLAY"):
        return None
    code = "import mujoco; m = mujoco.MjModel.from_xml_string('<mujoco/>'); mujoco.Renderer(m, 8, 8)"
    try:
        probe = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "MUJOCO_GL": "egl"},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return f"the EGL probe timed out after {timeout:.0f} s"
    if probe.returncode == 0:
        os.environ["MUJOCO_GL"] = "egl"
        return None
    lines = probe.stderr.strip().splitlines()
    return f"no display and no EGL ({lines[-1] if lines else 'unknown error'})"


def record_rollout_gif(
    name: str,
    policy: Callable,
    path: str | Path,
    *,
    seed: int | None = None,
    max_steps: int = 1000,
    every: int = 4,
    height: int = 120,
    width: int = 160,
) -> int:
    """Rolls ``policy`` out in a fresh ``name`` environment and saves every ``every``-th frame as a GIF.

    Raises whatever the renderer raises when MuJoCo cannot render offscreen
    (see :func:`select_mujoco_gl`).

    Returns:
        The number of frames written.
    """
    import imageio

    if name.startswith(PLAYGROUND_PREFIX):
        raise ValueError(f"record_rollout_gif renders dm_control and gymnasium environments, not {name!r}.")
    env = make_env(name, seed=seed)
    try:
        base = env.base_env
        if isinstance(base, DMControlEnv):
            physics = base._env.physics

            def render():
                return physics.render(height, width, camera_id=0)

            frame_seconds = physics.timestep() * base._env._n_sub_steps
        else:  # gymnasium: rebuild with an rgb_array renderer
            try:  # MuJoCo environments take the frame size, classic control ones do not
                gym_env = GymEnv(name, render_mode="rgb_array", width=width, height=height)
            except TypeError:
                gym_env = GymEnv(name, render_mode="rgb_array")
            plain, env = env, TransformedEnv(gym_env, env.transform.clone())
            plain.close()
            if seed is not None:
                env.set_seed(seed)
            render = env.base_env._env.render
            frame_seconds = getattr(env.base_env._env.unwrapped, "dt", 0.05)

        start = env.reset()  # gymnasium renders only after a reset; the GIF starts from this state
        frames = [render()]
        step = [0]

        def grab(_env, _td):
            step[0] += 1
            if step[0] % every == 0:
                frames.append(render())

        with torch.no_grad():
            env.rollout(max_steps, policy, callback=grab, break_when_any_done=True,
                        auto_reset=False, tensordict=start)
    finally:
        env.close(raise_if_closed=False)
    imageio.mimsave(path, frames, duration=1000 * every * frame_seconds, loop=0)
    return len(frames)
