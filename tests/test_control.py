from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from dm_control.rl.control import PhysicsError
from tensordict import TensorDict

from torchrl.envs import (CatTensors, Compose, DoubleToFloat, GymEnv, GymWrapper, InitTracker,
                          ParallelEnv, RewardSum, SerialEnv, StepCounter, TransformedEnv)

from torchrl_r2vpo.envs import DMControlBatchEnv, FaultTolerantDMControlEnv, make_env, parse_env_name
from torchrl_r2vpo.modules import RunningObservationNorm, RunningReturnNorm
from torchrl_r2vpo.recipes.control import RecentReturns


def fail_at_step(raw_env, n: int) -> None:
    """Makes a dm_control Environment raise PhysicsError at its n-th step."""
    step, calls = raw_env.step, [0]

    def unstable_step(action):
        calls[0] += 1
        if calls[0] == n:
            raise PhysicsError("simulated instability")
        return step(action)

    raw_env.step = unstable_step


class TestEnvFactory:
    def test_dm_control_task(self):
        env = make_env("walker-walk", seed=0)
        assert env.observation_spec["observation"].shape == (24,)
        assert env.observation_spec["observation"].dtype == torch.float32
        td = env.rollout(5)
        for key in ("observation", "step_count", "is_init"):
            assert key in td.keys()
        for key in ("reward", "episode_reward", "done", "truncated", "physics_error"):
            assert ("next", key) in td.keys(True)
        torch.testing.assert_close(
            td["next", "episode_reward"][-1], td["next", "reward"].sum(0)
        )

    @pytest.mark.parametrize("name, obs_dim", [("Pendulum-v1", 3), ("HalfCheetah-v5", 17)])
    def test_gymnasium_through_the_same_factory(self, name, obs_dim):
        env = make_env(name, num_envs=2, seed=0)
        td = env.rollout(4)
        assert td["observation"].shape == (2, 4, obs_dim)
        assert td["observation"].dtype == torch.float32
        assert ("next", "episode_reward") in td.keys(True)

    def test_batched_envs_are_seeded_apart(self):
        env = make_env("cartpole-balance", num_envs=2, seed=3)
        first = env.reset()["observation"]
        assert not torch.allclose(first[0], first[1])
        again = make_env("cartpole-balance", num_envs=2, seed=3).reset()["observation"]
        torch.testing.assert_close(first, again)

    @pytest.mark.parametrize(
        "name, parsed",
        [
            ("walker-walk", ("walker", "walk")),
            ("ball_in_cup-catch", ("ball_in_cup", "catch")),
            ("cartpole-swingup_sparse", ("cartpole", "swingup_sparse")),
            ("Pendulum-v1", ("Pendulum-v1", None)),
            ("HalfCheetah-v5", ("HalfCheetah-v5", None)),
            ("dm_control/walker-walk-v0", ("dm_control/walker-walk-v0", None)),
        ],
    )
    def test_parse_env_name(self, name, parsed):
        assert parse_env_name(name) == parsed

    def test_unknown_task_lists_the_known_ones(self):
        with pytest.raises(ValueError, match="Unknown DeepMind Control task.*walker-run"):
            make_env("walker-fly")

    def test_physics_error_ends_the_episode_and_is_counted(self):
        env = make_env("walker-walk", seed=0)
        fail_at_step(env.base_env._env._env, 4)  # the dm_control Environment under the guard
        td = env.rollout(10, break_when_any_done=False)
        errors = td["next", "physics_error"].squeeze(-1)
        assert errors.tolist() == [False] * 3 + [True] + [False] * 6
        assert td["next", "truncated"][3].item() and not td["next", "terminated"][3].item()
        assert td["next", "reward"][3].item() == 0.0
        # the faulty step returned the last valid observation, then a reset followed
        torch.testing.assert_close(td["next", "observation"][3], td["next", "observation"][2])
        assert td["step_count"][4].item() == 0 and td["is_init"][4].item()


def serial_env(domain: str, task: str, num_envs: int, seed: int, frame_skip: int = 1
               ) -> TransformedEnv:
    """The SerialEnv of FaultTolerantDMControlEnv that DMControlBatchEnv stands in for."""
    def factory(i):
        env = FaultTolerantDMControlEnv(domain, task, frame_skip=frame_skip)
        env.set_seed(seed + i)
        return env
    env = SerialEnv(num_envs, [lambda i=i: factory(i) for i in range(num_envs)])
    keys = sorted(k for k in env.observation_spec.keys() if k != "physics_error")
    return TransformedEnv(env, Compose(CatTensors(in_keys=keys, out_key="observation"),
                                       DoubleToFloat(), StepCounter(), InitTracker(), RewardSum()))


class TestDMControlBatchEnv:
    def test_make_env_steps_dm_control_batches_in_one_loop(self):
        assert isinstance(make_env("walker-walk", num_envs=2).base_env, DMControlBatchEnv)
        assert isinstance(make_env("walker-walk", num_envs=2, parallel=True).base_env, ParallelEnv)

    @pytest.mark.parametrize("name, frame_skip", [
        ("cartpole-swingup_sparse", 1), ("walker-walk", 1), ("cartpole-swingup_sparse", 3)])
    def test_same_data_as_a_serial_env_across_an_episode_end(self, name, frame_skip):
        """Same seeds, same actions: every entry equal, through the time limit's partial
        resets (cartpole: 1000 simulator steps, 334 actions of 3 steps, the last cut to
        one) and after reseeding."""
        domain, task = parse_env_name(name)
        ours = make_env(name, num_envs=3, seed=5, frame_skip=frame_skip)
        serial = serial_env(domain, task, 3, seed=5, frame_skip=frame_skip)
        episode = -(-1000 // frame_skip)  # actions per cartpole episode
        steps = episode + 3 if domain == "cartpole" else 20
        for _ in range(2):
            torch.manual_seed(0)
            a = ours.rollout(steps, break_when_any_done=False)
            torch.manual_seed(0)
            b = serial.rollout(steps, break_when_any_done=False)
            assert set(a.keys(True, True)) == set(b.keys(True, True))
            for key in a.keys(True, True):
                assert a[key].dtype == b[key].dtype, key
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
            assert ours.set_seed(7) == serial.set_seed(7)  # the same chain of seeds
        if domain == "cartpole":
            assert a["next", "truncated"].sum() == 3 and a["is_init"][:, episode].all()

    def test_frame_skip_repeats_the_action_and_sums_the_rewards(self):
        """Each action is applied frame_skip times: the state of 4 single steps, their
        rewards summed; a 1000-step episode is 250 actions, in one environment too."""
        skip, single = make_env("cartpole-balance", num_envs=2, seed=3, frame_skip=4), \
            make_env("cartpole-balance", num_envs=2, seed=3)
        actions = torch.rand(5, 2, 1) * 2 - 1
        td_skip, td_single = skip.reset(), single.reset()
        for action in actions:
            td_skip["action"] = action
            td_skip = skip.step(td_skip)
            reward = 0
            for _ in range(4):
                td_single["action"] = action
                td_single = single.step(td_single)
                reward = reward + td_single["next", "reward"]
                td_single = td_single["next"].exclude("reward", "episode_reward")
            torch.testing.assert_close(td_skip["next", "observation"], td_single["observation"],
                                       rtol=0, atol=0)
            torch.testing.assert_close(td_skip["next", "reward"], reward)
            td_skip = td_skip["next"]
        for env in (make_env("cartpole-balance", frame_skip=4, seed=0),
                    make_env("cartpole-balance", num_envs=2, frame_skip=4, seed=0)):
            assert env.rollout(1000, break_when_any_done=True)["next", "done"].shape[-2] == 250

    def test_bad_frame_skip_is_refused(self):
        with pytest.raises(ValueError, match="frame_skip must be >= 1, got 0"):
            make_env("cartpole-balance", frame_skip=0)
        with pytest.raises(ValueError, match="Playground tasks .* set their own control step"):
            make_env("playground:CartpoleBalance", frame_skip=2)

    def test_physics_error_ends_only_that_episode(self):
        """Environment 1 faults at its 4th step and is reset alone; environment 0 goes on."""
        env = make_env("walker-walk", num_envs=2, seed=0)
        fail_at_step(env.base_env._envs[1]._env, 4)  # environment 1's dm_control Environment
        td = env.rollout(6, break_when_any_done=False)
        assert td["next", "physics_error"].squeeze(-1).tolist() == [
            [False] * 6, [False] * 3 + [True] + [False] * 2]
        assert td["next", "truncated"][1, 3].item() and not td["next", "terminated"][1, 3].item()
        assert td["next", "reward"][1, 3].item() == 0.0
        torch.testing.assert_close(td["next", "observation"][1, 3], td["next", "observation"][1, 2])
        assert td["step_count"][1, 4].item() == 0 and td["step_count"][0, 4].item() == 4
        torch.testing.assert_close(td["observation"][0, 4], td["next", "observation"][0, 3])
        assert not torch.equal(td["observation"][1, 4], td["next", "observation"][1, 3])


class TestGymnasiumBatch:
    @pytest.mark.parametrize("frame_skip", [1, 3])
    def test_same_data_as_a_serial_env_across_an_episode_end(self, frame_skip):
        """gymnasium's SyncVectorEnv, auto-reset off: the data of a SerialEnv of GymEnv seeded
        seed + i, through Pendulum's 200-step time limit (67 actions of 3 steps, the last
        cut to two)."""
        ours = make_env("Pendulum-v1", num_envs=3, seed=5, frame_skip=frame_skip)
        assert isinstance(ours.base_env, GymWrapper) and ours.batch_size == (3,)
        serial = TransformedEnv(
            SerialEnv(3, [lambda i=i: seeded(GymEnv("Pendulum-v1", frame_skip=frame_skip), 5 + i)
                          for i in range(3)]), ours.transform.clone())
        episode = -(-200 // frame_skip)
        torch.manual_seed(0)
        a = ours.rollout(episode + 3, break_when_any_done=False)
        torch.manual_seed(0)
        b = serial.rollout(episode + 3, break_when_any_done=False)
        assert set(a.keys(True, True)) == set(b.keys(True, True))
        for key in a.keys(True, True):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=str(key))
        assert a["next", "truncated"].sum() == 3 and a["is_init"][:, episode].all()

    def test_set_seed_reproduces_the_starts(self):
        env = make_env("Pendulum-v1", num_envs=2)
        env.set_seed(11)
        first = env.reset()["observation"]
        env.set_seed(11)
        torch.testing.assert_close(env.reset()["observation"], first)
        assert not torch.equal(first[0], first[1])


def seeded(env, seed: int):
    env.set_seed(seed)
    return env


class TestRunningObservationNorm:
    def test_merged_batches_equal_one_batch(self):
        data = torch.randn(1000, 3, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]) + 7
        norm = RunningObservationNorm(3)
        for chunk in data.split([1, 299, 700]):
            norm.update(chunk)
        torch.testing.assert_close(norm.mean, data.mean(0))
        torch.testing.assert_close(norm.var, data.var(0, correction=0))
        assert norm.count.item() == 1000
        out = norm(data.float())
        torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
        torch.testing.assert_close(out.std(0, correction=0), torch.ones(3), atol=1e-4, rtol=0)

    def test_forward_clips_and_keeps_dtype(self):
        norm = RunningObservationNorm(2, clip=5.0)
        norm.update(torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
        out = norm(torch.tensor([[100.0, -100.0]]))
        assert out.dtype == torch.float32
        assert out.tolist() == [[5.0, -5.0]]

    def test_statistics_are_saved_with_the_state_dict(self):
        norm = RunningObservationNorm(2)
        norm.update(torch.randn(10, 2))
        other = RunningObservationNorm(2)
        other.load_state_dict(norm.state_dict())
        torch.testing.assert_close(other.mean, norm.mean)
        assert other.count.item() == 10


def discounted_returns(reward: torch.Tensor, done: torch.Tensor, gamma: float) -> torch.Tensor:
    """Each environment's return, step by step, restarted after each done step: [envs, T]."""
    returns = torch.zeros_like(reward, dtype=torch.float64)
    for env in range(reward.shape[0]):
        g = 0.0
        for t in range(reward.shape[1]):
            g = gamma * g + reward[env, t].item()
            returns[env, t] = g
            g = 0.0 if done[env, t] else g
    return returns


class TestRunningReturnNorm:
    def test_statistics_of_the_returns_carried_across_batches(self):
        torch.manual_seed(0)
        reward = torch.randn(3, 50)
        done = torch.rand(3, 50) < 0.1
        norm = RunningReturnNorm(gamma=0.9)
        for part in (slice(0, 7), slice(7, 8), slice(8, 50)):  # one episode spans all three
            norm.update(reward[:, part, None], done[:, part, None])
        returns = discounted_returns(reward, done, 0.9)
        assert norm.stats.count.item() == 150
        torch.testing.assert_close(norm.stats.mean, returns.mean().reshape(1))
        torch.testing.assert_close(norm.stats.var, returns.var(correction=0).reshape(1))
        scaled = norm(reward)
        torch.testing.assert_close(scaled, reward / returns.var(correction=0).sqrt().float())

    def test_a_done_step_restarts_the_return(self):
        norm = RunningReturnNorm(gamma=1.0)
        reward = torch.ones(1, 4, 1)
        norm.update(reward, torch.tensor([False, True, False, False]).reshape(1, 4, 1))
        torch.testing.assert_close(norm.stats.mean, torch.tensor([1.5], dtype=torch.float64))
        assert norm.returns.item() == 2.0  # carried to the next batch

    def test_the_sign_is_kept_and_the_scaled_rewards_are_clipped(self):
        norm = RunningReturnNorm(gamma=0.0, clip=3.0)  # the return is the reward
        norm.update(torch.tensor([[[1.0], [-1.0]]]), torch.zeros(1, 2, 1, dtype=torch.bool))
        assert norm(torch.tensor([0.5, -0.5, 7.0])).tolist() == [0.5, -0.5, 3.0]

    def test_only_the_statistics_are_saved(self):
        norm = RunningReturnNorm(gamma=0.99)
        norm.update(torch.rand(2, 5, 1), torch.zeros(2, 5, 1, dtype=torch.bool))
        assert set(norm.state_dict()) == {"stats.mean", "stats.var", "stats.count"}
        other = RunningReturnNorm(gamma=0.99)
        other.load_state_dict(norm.state_dict())
        torch.testing.assert_close(other(torch.ones(3)), norm(torch.ones(3)))
        assert other.returns is None  # a resumed run starts fresh episodes

    def test_bad_shapes_and_gamma_are_refused(self):
        with pytest.raises(ValueError, match=r"both be \[\*envs, T, 1\], got \(2, 5\) and \(2, 5\)"):
            RunningReturnNorm(0.9).update(torch.ones(2, 5), torch.zeros(2, 5, dtype=torch.bool))
        with pytest.raises(ValueError, match="gamma must be in"):
            RunningReturnNorm(1.5)


if __name__ == "__main__":
    pytest.main([__file__])


def _normalised_actor(obs_dim, act_dim):
    from tensordict.nn import NormalParamExtractor, TensorDictModule
    from torch import nn
    from torchrl.modules import ProbabilisticActor, TanhNormal

    norm = RunningObservationNorm(obs_dim)
    net = nn.Sequential(norm, nn.Linear(obs_dim, 2 * act_dim), NormalParamExtractor())
    actor = ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        distribution_class=TanhNormal,
        return_log_prob=True,
    )
    return actor, norm


@pytest.mark.timeout(120)
def test_normaliser_statistics_reach_collector_workers():
    import functools

    from torchrl.collectors import MultiSyncCollector

    env_fn = functools.partial(make_env, "cartpole-balance", num_envs=2)
    actor, norm = _normalised_actor(5, 1)
    collector = MultiSyncCollector(
        [env_fn, env_fn], actor, frames_per_batch=64, total_frames=-1,
        auto_register_policy_transforms=False,
    )
    try:
        batches = iter(collector)
        stale = norm.mean.clone(), norm.var.clone()
        next(batches)
        norm.update(torch.randn(256, 5, generator=torch.Generator().manual_seed(0)) * 2 + 0.5)
        collector.update_policy_weights_()
        data = next(batches)
    finally:
        collector.shutdown()

    def log_prob():
        with torch.no_grad():
            return actor.get_dist(data.select("observation")).log_prob(data["action"])

    # away from tanh saturation, where float32 log-probs are exact enough to compare
    inside = data["action"].abs().squeeze(-1) < 0.95
    assert inside.sum() > 16
    # the workers sampled with the updated statistics: the ratio is 1
    torch.testing.assert_close(log_prob()[inside], data["action_log_prob"][inside])
    norm.mean.copy_(stale[0]), norm.var.copy_(stale[1])
    assert not torch.allclose(log_prob()[inside], data["action_log_prob"][inside])


def test_playground_without_the_package_names_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "mujoco_playground" else find_spec(name, *args))
    with pytest.raises(ImportError, match=r"pip install 'torchrl_r2vpo\[playground\]'"):
        make_env("playground:WalkerWalk", num_envs=2)


@pytest.mark.parametrize("name, extra", [("walker-walk", "dmc"), ("HalfCheetah-v5", "gym")])
def test_missing_simulator_names_the_extra(monkeypatch, name, extra):
    import importlib.util

    missing = {"dmc": "dm_control", "gym": "gymnasium"}[extra]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *args: None if module == missing else find_spec(module, *args))
    with pytest.raises(ImportError, match=rf"pip install 'torchrl_r2vpo\[{extra}\]'"):
        make_env(name)


def test_gif_of_a_dm_control_and_a_gymnasium_rollout(tmp_path):
    # in a subprocess: the OpenGL backend must be chosen before MuJoCo is first imported
    script = f"""
import imageio
from torchrl.envs.utils import RandomPolicy
from torchrl_r2vpo.envs import make_env
from torchrl_r2vpo.record import record_rollout_gif, select_mujoco_gl

reason = select_mujoco_gl()
if reason:
    print("NO-RENDERER", reason)
    raise SystemExit
for name, seed in (("cartpole-balance", 0), ("HalfCheetah-v5", None)):  # unseeded: not reset yet
    path = {str(tmp_path)!r} + f"/{{name}}.gif"
    policy = RandomPolicy(make_env(name).action_spec)
    count = record_rollout_gif(name, policy, path, seed=seed, max_steps=12, every=4, height=48, width=64)
    frames = imageio.mimread(path)
    print(name, count, len(frames), frames[0].shape[:2])
"""
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}  # other tests may disable it
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    if "NO-RENDERER" in result.stdout:
        pytest.skip(result.stdout.strip())
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    for name in ("cartpole-balance", "HalfCheetah-v5"):
        count, written, shape = lines[name].split(" ", 2)
        assert int(count) == int(written) >= 3 and shape == "(48, 64)", lines[name]


def test_the_progress_bar_shows_the_last_episodes_returns_kept_across_batches():
    def batch(ends: dict[tuple[int, int], float], reward: float = 0.5) -> TensorDict:
        """Two environments x 4 steps; ``ends`` maps (environment, step) to a return."""
        done, episode_reward = torch.zeros(2, 4, 1, dtype=torch.bool), torch.zeros(2, 4, 1)
        for (env, step), value in ends.items():
            done[env, step], episode_reward[env, step] = True, value
        return TensorDict({"next": {"reward": torch.full((2, 4, 1), reward), "done": done,
                                    "episode_reward": episode_reward}}, [2, 4])

    recent = RecentReturns(window=3)
    recent.update(batch({}, reward=0.25))
    assert str(recent) == "0.250/step"  # no episode has ended: the reward per step, marked
    recent.update(batch({(0, 3): 30.0, (1, 1): 10.0}))
    assert list(recent.returns) == [10.0, 30.0] and str(recent) == "20.0"  # in the order they ended
    recent.update(batch({}))
    assert str(recent) == "20.0"  # a batch that ends none keeps the last ones
    recent.update(batch({(0, 0): 50.0, (1, 2): 70.0}))
    assert list(recent.returns) == [30.0, 50.0, 70.0] and str(recent) == "50.0"
