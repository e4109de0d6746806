"""Offscreen rendering of MuJoCo policies: picking an OpenGL backend, and a GIF of a rollout."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torchrl.envs import DMControlEnv, GymEnv, TransformedEnv

from torchrl_r2vpo.envs.control import make_env
from torchrl_r2vpo.envs.playground import PLAYGROUND_PREFIX

__all__ = ["record_rollout_gif", "select_mujoco_gl"]


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
    frame_skip: int = 1,
    max_steps: int = 1000,
    every: int = 4,
    height: int = 120,
    width: int = 160,
) -> int:
    """Rolls ``policy`` out in a fresh ``name`` environment and saves every ``every``-th frame as a GIF.

    ``frame_skip`` is the policy's action repeat (:func:`~torchrl_r2vpo.envs.make_env`): a
    frame is rendered after every ``every``-th action, and the GIF plays in real time.
    Raises whatever the renderer raises when MuJoCo cannot render offscreen
    (see :func:`select_mujoco_gl`).

    Returns:
        The number of frames written.
    """
    import imageio

    if name.startswith(PLAYGROUND_PREFIX):
        raise ValueError(f"record_rollout_gif renders dm_control and gymnasium environments, not {name!r}.")
    env = make_env(name, seed=seed, frame_skip=frame_skip)
    try:
        base = env.base_env
        if isinstance(base, DMControlEnv):
            physics = base._env.physics

            def render():
                return physics.render(height, width, camera_id=0)

            frame_seconds = physics.timestep() * base._env._n_sub_steps * frame_skip
        else:  # gymnasium: rebuild with an rgb_array renderer
            try:  # MuJoCo environments take the frame size, classic control ones do not
                gym_env = GymEnv(name, render_mode="rgb_array", width=width, height=height,
                                 frame_skip=frame_skip)
            except TypeError:
                gym_env = GymEnv(name, render_mode="rgb_array", frame_skip=frame_skip)
            plain, env = env, TransformedEnv(gym_env, env.transform.clone())
            plain.close()
            if seed is not None:
                env.set_seed(seed)
            render = env.base_env._env.render
            frame_seconds = getattr(env.base_env._env.unwrapped, "dt", 0.05) * frame_skip

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
