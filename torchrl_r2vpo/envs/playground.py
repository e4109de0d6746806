"""MuJoCo Playground (MJX in JAX) environments, stepped as one compiled batch and handed to torch."""

from __future__ import annotations

import importlib.util
import os

import torch
from tensordict import TensorDict
from torchrl.envs import MujocoPlaygroundEnv

from torchrl_r2vpo._compat import ndarray_to_tensor, tensor_to_ndarray

__all__ = ["PLAYGROUND_PREFIX", "PlaygroundEnv", "playground_env"]

PLAYGROUND_PREFIX = "playground:"


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
            mask = tensor_to_ndarray(mask.reshape(-1).to(torch.uint8)) != 0
            state = self._where(mask, state, self._current_state)
        self._current_state = state
        done = ndarray_to_tensor(state.done).to(self.device).bool().view(*self.batch_size, 1)
        return TensorDict._new_unsafe(
            {**self._extract_obs(state), "done": done, "terminated": done.clone()},
            batch_size=self.batch_size,
            device=self.device,
        )


def playground_env(name: str, num_envs: int, seed: int | None, device) -> tuple[PlaygroundEnv, int]:
    """``num_envs`` environments of the Playground task ``name`` (``"playground:<TaskName>"``)
    and the episode length of the task's default configuration."""
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
