"""R2VPOLoss on stale data: the decoupled (proximal) ratio r = pi_theta / pi_prox with the
detached behaviour weight w = min(pi_prox / pi_b, c), and its use by examples/dmc_walker.py."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import set_composite_lp_aggregate
from torchrl.modules.distributions import IndependentNormal
from torchrl.objectives import SoftUpdate

from torchrl_r2vpo import R2VPOLoss
from torchrl_r2vpo.recipes import control
from torchrl_r2vpo.recipes.config import ControlConfig

from test_r2vpo import make_actor, make_critic, perturb_

N_OBS, BATCH = 4, 64
PROX = "proximal_log_prob"  # the loss's default key
LOSS_KEYS = ["loss_objective", "loss_ratio_var", "loss_critic"]


def make_data(actor, batch=(BATCH,), seed=3):
    """Data sampled by ``actor``: observations, actions, their log-probs, advantages."""
    torch.manual_seed(seed)
    td = TensorDict({"observation": torch.randn(*batch, N_OBS)}, batch)
    with torch.no_grad():
        actor(td)
    td.set("advantage", torch.randn(*batch, 1))
    td.set("value_target", torch.randn(*batch, 1))
    return td


def current_log_prob(loss, data):
    """log pi_theta of the stored actions, computed as the loss computes it."""
    with torch.no_grad():
        log_prob, _, _ = loss._get_cur_log_prob(data.clone(False))
    return log_prob


def scramble_behaviour_(data, scale=1.0, seed=7):
    """Moves the stored behaviour log-probs at random: weights pi_prox / pi_b on both sides
    of 1 (the loss reads them as numbers; no policy needs to have made them)."""
    gen = torch.Generator().manual_seed(seed)
    data["action_log_prob"] = data["action_log_prob"] + scale * torch.randn(
        data["action_log_prob"].shape, generator=gen)


def stale_setup():
    """Data of an old behaviour policy, a proximal policy between it and the current one:
    pi_prox is the actor perturbed once, pi_theta twice; the proximal log-probs are stored."""
    actor = make_actor()
    data = make_data(actor)
    perturb_(actor, seed=2)
    data.set(PROX, current_log_prob(R2VPOLoss(actor), data))
    perturb_(actor, scale=0.1, seed=4)
    scramble_behaviour_(data)
    return actor, data


def outputs_and_grads(loss, data):
    """Every output entry, and the gradient of each loss term on every parameter."""
    torch.manual_seed(0)  # the entropy estimate of TanhNormal samples
    out = loss(data)
    params = [p for p in loss.parameters() if p.requires_grad]
    grads = {key: torch.autograd.grad(out[key], params, retain_graph=True, allow_unused=True)
             for key in LOSS_KEYS + ["loss_entropy"] if key in out.keys()}
    return out, grads


def assert_bit_identical(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert set(out_a.keys()) == set(out_b.keys())
    for key in out_a.keys():
        assert torch.equal(out_a[key], out_b[key]), key
    for key, grads in grads_a.items():
        for g_a, g_b in zip(grads, grads_b[key]):
            assert (g_a is None and g_b is None) or torch.equal(g_a, g_b), key


class TestFreshDataIsTodaysLoss:
    @pytest.mark.parametrize("kwargs", [
        {}, {"variance_center": "one", "lagrange_multiplier": 2.0},
        {"max_behaviour_weight": None}, {"max_importance_ratio": 1.1},
        {"weighted_variance": False},
    ])
    def test_proximal_equal_to_behaviour_is_bit_identical(self, kwargs):
        actor = make_actor()
        data = make_data(actor)
        perturb_(actor)  # r != 1: the identity is not the trivial one at r == 1
        data.set(PROX, data["action_log_prob"].clone())
        loss = R2VPOLoss(actor, make_critic(), **kwargs)
        assert loss(data)["ratio_var"] > 1e-3
        assert_bit_identical(outputs_and_grads(loss, data),
                             outputs_and_grads(loss, data.exclude(PROX)))

    def test_padding_may_hold_garbage_in_the_proximal_log_prob(self):
        actor = make_actor(distribution_class=IndependentNormal)
        data = make_data(actor, batch=(4, 16))
        perturb_(actor)
        mask = torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) > 0.3
        data.set(("collector", "mask"), mask)
        data.set(PROX, torch.where(mask, data["action_log_prob"], float("nan")))
        data["action_log_prob"] = torch.where(mask, data["action_log_prob"], float("-inf"))
        loss = R2VPOLoss(actor, make_critic())
        with_key, without = outputs_and_grads(loss, data), outputs_and_grads(loss, data.exclude(PROX))
        assert_bit_identical(with_key, without)
        assert all(torch.isfinite(with_key[0][k]) for k in LOSS_KEYS + ["ratio_var", "kl_approx"])


class TestDecoupledRatio:
    @pytest.mark.parametrize("center", ["mean", "one"])
    @pytest.mark.parametrize("c", [None, 1.5])
    def test_at_the_proximal_policy_the_penalty_is_flat_and_the_objective_is_weighted(
            self, center, c):
        actor = make_actor()
        data = make_data(actor)
        perturb_(actor)  # pi_theta == pi_prox, far from the behaviour policy
        loss = R2VPOLoss(actor, entropy_bonus=False, lagrange_multiplier=3.0,
                         variance_center=center, max_behaviour_weight=c)
        data.set(PROX, current_log_prob(loss, data))
        scramble_behaviour_(data)
        out = loss(data)
        assert out["ratio_var"] == 0 and out["loss_ratio_var"] == 0
        assert out["mean_ratio"] == 1 and out["max_ratio"] == 1 and out["ESS"] == 1
        assert out["clip_fraction"] == 0 and out["kl_approx"] == 0
        params = [p for p in loss.parameters() if p.requires_grad]
        penalty_grads = torch.autograd.grad(out["loss_ratio_var"], params, retain_graph=True)
        assert all((g == 0).all() for g in penalty_grads)
        # the objective's gradient is that of -mean(w * A * log pi), w = min(pi_prox / pi_b, c)
        w = (data[PROX] - data["action_log_prob"]).exp()
        if c is not None:
            assert (w > c).any() and (w < 1).any()  # the truncation and the age both act
            w = w.clamp_max(c)
        objective_grads = torch.autograd.grad(out["loss_objective"], params)
        log_prob = actor.get_dist(data.clone(False)).log_prob(data["action"])
        surrogate = -(w * data["advantage"].squeeze(-1) * log_prob).mean()
        for got, expected in zip(objective_grads, torch.autograd.grad(surrogate, list(actor.parameters()))):
            torch.testing.assert_close(got, expected)

    @pytest.mark.parametrize("c", [1.0, 2.0, None])
    def test_the_objective_is_the_truncated_weight_times_the_proximal_ratio(self, c):
        actor, data = stale_setup()
        loss = R2VPOLoss(actor, entropy_bonus=False, lagrange_multiplier=1.0,
                         max_behaviour_weight=c, weighted_variance=False)
        out = loss(data)
        r = (current_log_prob(loss, data) - data[PROX]).exp()
        w = (data[PROX] - data["action_log_prob"]).exp()
        assert (w > 2).any() and (w < 1).any()
        w_c = w if c is None else w.clamp_max(c)
        adv = data["advantage"].squeeze(-1)
        torch.testing.assert_close(out["loss_objective"], -(w_c * r * adv).mean())
        # the constraint (unweighted here) and every ratio diagnostic measure r, not w * r
        torch.testing.assert_close(out["ratio_var"], ((r - r.mean()) ** 2).mean())
        torch.testing.assert_close(out["loss_ratio_var"], ((r - r.mean()) ** 2).mean())
        torch.testing.assert_close(out["mean_ratio"], r.mean())
        torch.testing.assert_close(out["max_ratio"], r.max())
        torch.testing.assert_close(out["ESS"], r.mean() ** 2 / (r ** 2).mean())
        torch.testing.assert_close(out["kl_approx"], -r.log().mean())
        assert out["ratio_var"] < ((w * r - (w * r).mean()) ** 2).mean() / 10

    @pytest.mark.parametrize("center", ["mean", "one"])
    def test_weighted_variance_is_the_self_normalised_one(self, center):
        actor, data = stale_setup()
        lam = 2.0
        loss = R2VPOLoss(actor, entropy_bonus=False, lagrange_multiplier=lam,
                         variance_center=center, weighted_variance=True)
        out = loss(data)
        r = (current_log_prob(loss, data) - data[PROX]).exp()
        w = (data[PROX] - data["action_log_prob"]).exp().clamp_max(2.0)
        c = (w * r).sum() / w.sum() if center == "mean" else 1.0
        var = (w * (r - c) ** 2).sum() / w.sum()
        torch.testing.assert_close(out["ratio_var"], var)
        torch.testing.assert_close(out["loss_ratio_var"], lam * var)
        torch.testing.assert_close(loss.last_ratio_stats.variance(center).float(), var)
        unweighted = R2VPOLoss(actor, entropy_bonus=False, lagrange_multiplier=lam,
                               variance_center=center, weighted_variance=False)(data)
        torch.testing.assert_close(unweighted["loss_objective"], out["loss_objective"])
        assert not torch.isclose(unweighted["ratio_var"], out["ratio_var"])

    def test_max_importance_ratio_caps_the_weighted_ratio(self):
        actor, data = stale_setup()
        cap = 1.5
        out = R2VPOLoss(actor, entropy_bonus=False, max_importance_ratio=cap,
                        max_behaviour_weight=None)(data)
        r = (current_log_prob(R2VPOLoss(actor), data) - data[PROX]).exp()
        wr = (data[PROX] - data["action_log_prob"]).exp() * r
        assert (wr > cap).any()
        torch.testing.assert_close(out["loss_objective"],
                                   -(wr.clamp_max(cap) * data["advantage"].squeeze(-1)).mean())

    def test_ratio_behaviour_ignores_the_key(self):
        actor, data = stale_setup()
        loss = R2VPOLoss(actor, make_critic(), ratio="behaviour")
        assert_bit_identical(outputs_and_grads(loss, data),
                             outputs_and_grads(loss, data.exclude(PROX)))
        decoupled = R2VPOLoss(actor, make_critic())(data)
        assert not torch.isclose(decoupled["ratio_var"], loss(data)["ratio_var"])

    def test_composite_actions_take_the_joint_proximal_log_prob(self):
        with set_composite_lp_aggregate(False):
            actor = make_actor(composite=True)
            data = make_data(actor)
            perturb_(actor)
            lp_keys = [("action", "action1_log_prob"), ("action", "action2_log_prob")]
            loss = R2VPOLoss(actor, entropy_bonus=False)
            data.set(PROX, sum(data[k] for k in lp_keys))  # fresh: the loss of today
            fresh, today = loss(data), loss(data.exclude(PROX))
            for key in ("loss_objective", "loss_ratio_var", "ratio_var"):
                torch.testing.assert_close(fresh[key], today[key])
            assert today["ratio_var"] > 1e-3
            current = current_log_prob(loss, data)  # per head
            data.set(PROX, sum(current[k] for k in lp_keys))
            # zero up to rounding: the ratio sums the heads' log-ratios, the shift the joints
            assert loss(data)["ratio_var"] < 1e-10


class TestArgumentsAndKeys:
    @pytest.mark.parametrize("kwargs, name", [
        ({"ratio": "prox"}, "ratio"), ({"max_behaviour_weight": 0.5}, "max_behaviour_weight"),
        ({"max_behaviour_weight": float("nan")}, "max_behaviour_weight"),
    ])
    def test_bad_arguments_are_refused_by_name(self, kwargs, name):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            R2VPOLoss(make_actor(), **kwargs)

    def test_attributes(self):
        loss = R2VPOLoss(make_actor(), ratio="behaviour", max_behaviour_weight=None)
        assert (loss.ratio, loss.max_behaviour_weight) == ("behaviour", None)
        assert loss.tensor_keys.proximal_log_prob == PROX

    def test_set_keys_routes_the_proximal_log_prob(self):
        actor, data = stale_setup()
        expected = R2VPOLoss(actor, entropy_bonus=False)(data)
        loss = R2VPOLoss(actor, entropy_bonus=False)
        loss.set_keys(proximal_log_prob=("prox", "lp"))
        renamed = data.clone(False)
        renamed.set(("prox", "lp"), renamed.pop(PROX))
        out = loss(renamed)
        for key in ("loss_objective", "loss_ratio_var", "ratio_var"):
            torch.testing.assert_close(out[key], expected[key])
        # the default name is no longer read
        ignored = loss(data)
        torch.testing.assert_close(ignored["ratio_var"],
                                   R2VPOLoss(actor, entropy_bonus=False)(data.exclude(PROX))["ratio_var"])

    def test_delay_actor_and_the_key_are_exclusive(self):
        actor, data = stale_setup()
        loss = R2VPOLoss(actor, delay_actor=True)
        SoftUpdate(loss, eps=0.9)
        loss(data.exclude(PROX))  # without the key: PPO-EWMA's proximal policy
        with pytest.raises(ValueError, match="delay_actor"):
            loss(data)

    def test_a_non_finite_proximal_log_prob_is_named(self):
        actor, data = stale_setup()
        data[PROX][3] = float("nan")
        with pytest.raises(ValueError, match=f"proximal log-probability \\(key '{PROX}'\\)"):
            R2VPOLoss(actor)(data)

    def test_a_misshapen_proximal_log_prob_is_named(self):
        actor, data = stale_setup()
        data.set(PROX, data[PROX].unsqueeze(-1).expand(BATCH, 3).clone())
        with pytest.raises(ValueError, match="proximal log-probability"):
            R2VPOLoss(actor)(data)


class TestRecipe:
    @pytest.mark.parametrize("cfg_weight, loss_weight", [(2.0, 2.0), (0.0, None), (3.5, 3.5)])
    @pytest.mark.parametrize("ratio", ["proximal", "behaviour"])
    def test_make_loss_passes_the_ratio_settings(self, ratio, cfg_weight, loss_weight):
        actor, critic = make_actor(), make_critic()
        cfg = ControlConfig(ratio=ratio, max_behaviour_weight=cfg_weight)
        loss, _ = control.make_loss(cfg, actor, critic)
        assert (loss.ratio, loss.max_behaviour_weight) == (ratio, loss_weight)

    def test_ratio_stats_by_staleness_split_the_step_from_the_age(self):
        actor = make_actor()
        stored = torch.stack([make_data(actor, seed=s) for s in (5, 6)])  # [K + 1, N]
        stored.set("policy_version", torch.tensor([[3], [4]]).expand(2, BATCH))
        perturb_(actor)  # both batches are now stale, the newer by one update
        prox = control.action_log_probs(actor, stored)
        assert prox.shape == (2, BATCH)
        torch.testing.assert_close(prox, current_log_prob(R2VPOLoss(actor), stored))
        stored.set(PROX, prox)
        flat = stored.reshape(-1)
        # right after pi_prox is taken, the step is nil and the weight holds the age
        stats = control.ratio_stats_by_staleness(actor, flat, 5, proximal_log_prob_key=PROX,
                                                 clip_epsilon=0.1)
        behaviour = control.ratio_stats_by_staleness(actor, flat, 5)
        for k in (1, 2):
            assert stats[f"stale{k}/ratio_mean"] == 1 and stats[f"stale{k}/ratio_var"] == 0
            assert stats[f"stale{k}/clip_fraction"] == 0
            assert stats[f"stale{k}/weight_mean"] == pytest.approx(
                behaviour[f"stale{k}/ratio_mean"], rel=1e-5)
            assert behaviour[f"stale{k}/weight_mean"] == 1  # no weight without the key
            assert behaviour[f"stale{k}/ratio_var"] > 1e-3
        # the band of clip_fraction is the caller's
        wide = control.ratio_stats_by_staleness(actor, flat, 5, clip_epsilon=10.0)
        assert wide["stale1/clip_fraction"] == 0 < behaviour["stale1/clip_fraction"]


EXAMPLE = Path(__file__).parents[1] / "examples" / "dmc_walker.py"
SMALL = ["--env", "cartpole-balance", "--frames-per-batch", "512", "--num-envs", "4",
         "--num-workers", "1", "--epochs", "2", "--minibatch-size", "256", "--eval-episodes", "1",
         "--final-eval-episodes", "1",
         "--eval-every", "1000000", "--frames", "1536", "--reuse", "1", "--no-video"]


def read_scalar(out: Path, name: str) -> list[float]:
    path = out / "logs" / "r2vpo-cartpole-balance-seed0" / "scalars" / f"{name}.csv"
    with open(path) as f:
        return [float(row[1]) for row in csv.reader(f)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ratio", ["proximal", "behaviour"])
def test_the_example_reuses_stale_data_with_either_ratio(tmp_path, ratio):
    result = subprocess.run([sys.executable, str(EXAMPLE), *SMALL, "--ratio", ratio,
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr[-3000:]
    weight = read_scalar(tmp_path, "stale1/weight_mean")
    assert len(weight) == 2 and len(read_scalar(tmp_path, "stale0/weight_max")) == 3
    for field in ("ratio_mean", "ratio_var", "ESS", "clip_fraction", "weight_ESS"):
        assert all(map(torch.isfinite, map(torch.tensor, read_scalar(tmp_path, f"stale1/{field}"))))
    if ratio == "behaviour":
        assert weight == [1.0, 1.0]
    else:  # a batch one update old has pi_prox != pi_b; fresh data has pi_prox == pi_b
        assert all(w != 1.0 for w in weight)
        assert max(read_scalar(tmp_path, "stale0/weight_max")) == pytest.approx(1.0, abs=1e-3)
