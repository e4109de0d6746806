"""MuJoCo Playground on the CPU: the env contract, and a few updates of both losses.

Each test runs in its own process: JAX starts threads that a later fork (collector workers,
Ray) could deadlock on, so it is never imported into the test process. Each pays a JIT
compile of about half a minute on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("mujoco_playground") is None:
    pytest.skip("needs the playground extra", allow_module_level=True)

ROOT = Path(__file__).parents[1]

CONTRACT = """
import torch
from torchrl_r2vpo.envs import make_env

try:
    make_env("playground:WalkerFly")
except ValueError as err:
    assert "playground:WalkerWalk" in str(err)
else:
    raise AssertionError("an unknown task was accepted")

env = make_env("playground:CartpoleSwingupSparse", num_envs=4, seed=0)
assert env.observation_spec["observation"].shape == (4, 5)
assert env.observation_spec["observation"].dtype == torch.float32
assert env.transform[1].max_steps == 1000  # the task's episode length truncates
td = env.rollout(5, break_when_any_done=False)
assert td["observation"].shape == (4, 5, 5)
for key in ("observation", "step_count", "is_init"):
    assert key in td.keys()
for key in ("reward", "episode_reward", "done", "terminated", "truncated"):
    assert ("next", key) in td.keys(True)
torch.testing.assert_close(td["next", "episode_reward"][:, -1], td["next", "reward"].sum(1))

# a partial reset re-initialises the masked environments only
td = env.reset()
for _ in range(3):
    td = env.rand_step(td)
    td = td["next"].exclude("reward", "episode_reward")
before = env.base_env._current_state.data.time.copy()
td["_reset"] = torch.tensor([[True], [False], [False], [True]])
out = env.reset(td)
after = env.base_env._current_state.data.time
assert after[0] == after[3] == 0, after
assert (after[1:3] == before[1:3]).all() and before[1] > 0, (before, after)
assert out["step_count"].squeeze(-1).tolist() == [0, 3, 3, 0]
print("contract ok")
"""


@pytest.mark.timeout(300)
def test_env_contract_and_partial_reset():
    result = subprocess.run([sys.executable, "-c", CONTRACT], capture_output=True, text=True,
                            timeout=240, cwd=ROOT)
    assert result.returncode == 0 and "contract ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.timeout(300)
def test_benchmark_trains_both_losses_on_a_task_compiled_once(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "playground_compare.py"), "--device", "cpu",
         "--tasks", "CartpoleSwingupSparse", "--num-envs", "4", "--frames", "768",
         "--random-steps", "10", "--time-limit", "120", "--out", str(tmp_path),
         "--frames-per-batch", "256", "--minibatch-size", "64", "--epochs", "2"],
        capture_output=True, text=True, timeout=270,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    task = results["tasks"]["CartpoleSwingupSparse"]
    assert task["env_steps_per_s"] > 0
    assert [run["loss"] for run in task["runs"]] == ["r2vpo", "ppo"]
    for run in task["runs"]:  # 3 batches of 2 epochs x 4 minibatches each
        assert run["frames"] == 768 and [r["frames"] for r in run["rows"]] == [256, 512, 768]
        assert run["final_eval_return"] is not None and run["loop_env_steps_per_s"] > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| CartpoleSwingupSparse | 0 | 768 |" in summary  # returns at equal steps
    # each run is a process of the example, which finds the task's compiled step here
    assert any((tmp_path / "runs" / "jax_cache").iterdir())
    assert (tmp_path / "curves.png").stat().st_size > 0
