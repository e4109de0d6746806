"""Collection with Ray actors on a local Ray instance (``Collector(backend="ray")``)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

EXAMPLE = Path(__file__).parents[1] / "examples" / "dmc_walker.py"


@pytest.mark.timeout(300)
def test_the_example_trains_on_ray_collectors(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--env", "cartpole-balance", "--collector", "ray",
         "--num-workers", "2", "--num-envs", "2", "--frames-per-batch", "512",
         "--minibatch-size", "128", "--epochs", "2", "--frames", "1536", "--eval-every", "1536",
         "--eval-episodes", "2", "--final-eval-episodes", "2", "--no-video", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["frames"]) for r in rows] == [512, 1024, 1536]
    assert rows[-1]["eval_return"] and float(rows[-1]["ratio_var"]) > 0


@pytest.mark.timeout(300)
def test_updated_weights_reach_the_ray_workers():
    import functools

    import ray
    import torch
    from test_control import _normalised_actor
    from torchrl.collectors import Collector

    from torchrl_r2vpo.envs import make_env

    env_fn = functools.partial(make_env, "cartpole-balance", num_envs=2)
    actor, norm = _normalised_actor(5, 1)
    collector = Collector(
        env_fn, actor, backend="ray", num_collectors=2, sync=True, frames_per_batch=64,
        total_frames=128, backend_options={"remote_configs": {"num_cpus": 1, "num_gpus": 0}},
    )
    try:
        collector.update_policy_weights_()  # connects the workers to the weights first
        batches = iter(collector)
        next(batches)
        stale = norm.mean.clone(), norm.var.clone()
        norm.update(torch.randn(256, 5, generator=torch.Generator().manual_seed(0)) * 2 + 0.5)
        collector.update_policy_weights_()
        data = next(batches)
    finally:
        collector.shutdown()
        ray.shutdown()
    assert data.shape == (2, 2, 16)  # [workers, envs, time]

    def log_prob():
        with torch.no_grad():
            return actor.get_dist(data.select("observation")).log_prob(data["action"])

    inside = data["action"].abs().squeeze(-1) < 0.95  # away from tanh saturation
    assert inside.sum() > 16
    torch.testing.assert_close(log_prob()[inside], data["action_log_prob"][inside])
    norm.mean.copy_(stale[0]), norm.var.copy_(stale[1])
    assert not torch.allclose(log_prob()[inside], data["action_log_prob"][inside])
