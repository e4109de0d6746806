"""How often the example's initial policy finds a reward on a sparse task, before any training.

For each setting of action repeat and initial scale, and each run seed: the actor that
``examples/dmc_walker.py`` builds for that seed (a state-independent scale, as in the sparse
settings), sampling its actions, plays one episode in each of ``--episodes`` environments
seeded as the training's are; the report gives the share of episodes with any reward and
their mean return. A seed whose first policy never meets a reward gives PPO-style training no
signal to follow.

    python benchmarks/sparse_exploration.py      # cartpole-swingup_sparse, seeds 0-5, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
from torchrl.envs import ExplorationType, set_exploration_type

from torchrl_r2vpo.envs import make_env
from torchrl_r2vpo.recipes.control import make_agent
from torchrl_r2vpo.recipes.run_state import seed_everything

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["4:1.0", "4:2.0", "8:1.0", "1:1.0"]  # frame skip : initial scale


def reward_share(task: str, seed: int, frame_skip: int, initial_scale: float,
                 episodes: int) -> tuple[float, float]:
    """The share of ``episodes`` first-policy episodes with any reward, and their mean return."""
    seed_everything(seed)
    env = make_env(task, num_envs=episodes, seed=seed, frame_skip=frame_skip)
    try:
        actor, _, _ = make_agent(env, env.observation_spec["observation"].shape[-1],
                                 env.action_spec.shape[-1], initial_scale=initial_scale,
                                 state_independent_scale=True)
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            rollout = env.rollout(100_000, actor, break_when_any_done=False,
                                  break_when_all_done=True)
    finally:
        env.close()
    reward = rollout["next", "reward"].squeeze(-1)  # [episodes, T]: one episode each
    return (reward > 0).any(-1).float().mean().item(), reward.sum(-1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="cartpole-swingup_sparse")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--settings", nargs="+", default=SETTINGS, metavar="SKIP:SCALE")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "dmc-sparse" / "exploration")
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "disable")
    torch.set_num_threads(1)
    rows, results = [], []
    for setting in args.settings:
        skip, scale = setting.split(":")
        shares = [reward_share(args.task, seed, int(skip), float(scale), args.episodes)
                  for seed in args.seeds]
        results.append({"frame_skip": int(skip), "initial_scale": float(scale),
                        "seeds": args.seeds, "share_rewarded": [s for s, _ in shares],
                        "mean_return": [r for _, r in shares]})
        rows.append(f"| {skip} | {scale} | " + " | ".join(f"{s:.2f} ({r:.1f})" for s, r in shares)
                    + f" | {sum(s > 0 for s, _ in shares)} of {len(shares)} |")
        print(rows[-1], flush=True)
    report = "\n".join([
        f"{args.task}: the share of {args.episodes} episodes of the example's first policy "
        "(state-independent scale, actions sampled) with any reward, and their mean return in "
        f"brackets, per run seed; {platform.processor() or platform.machine()}.", "",
        "| frame skip | initial scale | " + " | ".join(f"seed {s}" for s in args.seeds)
        + " | seeds with a reward |",
        "|---|---|" + "---|" * len(args.seeds) + "---|", *rows])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exploration.json").write_text(json.dumps(
        {"task": args.task, "episodes": args.episodes, "results": results}, indent=2))
    (args.out / "exploration.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
