from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import (
    CompositeDistribution,
    NormalParamExtractor,
    set_composite_lp_aggregate,
    TensorDictModule,
    TensorDictSequential,
)
from torch import nn
from torchrl.modules import ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.modules.distributions import IndependentNormal
from torchrl.objectives import ClipPPOLoss, PPOLoss, SoftUpdate
from torchrl.objectives.value import GAE

from torchrl_r2vpo import DualVariableScheduler, R2VPOLoss
from torchrl_r2vpo.modules import UpdateMeanNoise

N_OBS, N_ACT = 4, 2


def make_actor(n_obs=N_OBS, n_act=N_ACT, composite=False, seed=0, distribution_class=TanhNormal):
    torch.manual_seed(seed)
    if not composite:
        net = nn.Sequential(nn.Linear(n_obs, 2 * n_act), NormalParamExtractor())
        module = TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"])
        return ProbabilisticActor(
            module,
            in_keys=["loc", "scale"],
            distribution_class=distribution_class,
            return_log_prob=True,
        )
    # two action heads, each a TanhNormal over n_act dims
    heads = [
        TensorDictModule(
            nn.Sequential(nn.Linear(n_obs, 2 * n_act), NormalParamExtractor()),
            in_keys=["observation"],
            out_keys=[("params", name, "loc"), ("params", name, "scale")],
        )
        for name in ("action1", "action2")
    ]
    return ProbabilisticActor(
        TensorDictSequential(*heads),
        in_keys=["params"],
        distribution_class=CompositeDistribution,
        distribution_kwargs={
            "distribution_map": {"action1": TanhNormal, "action2": TanhNormal},
            "name_map": {name: ("action", name) for name in ("action1", "action2")},
        },
        return_log_prob=True,
    )


def make_critic(n_obs=N_OBS, seed=1):
    torch.manual_seed(seed)
    return ValueOperator(nn.Linear(n_obs, 1), in_keys=["observation"])


def perturb_(module, scale=0.3, seed=2):
    """Moves a policy away from the one that collected the data, so r != 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def make_data(actor, batch=(64,), seed=3):
    """Data collected by ``actor``: observations, sampled actions and their log-probs."""
    torch.manual_seed(seed)
    td = TensorDict({"observation": torch.randn(*batch, N_OBS)}, batch)
    with torch.no_grad():
        actor(td)
    td.set("advantage", torch.randn(*batch, 1))
    td.set("value_target", torch.randn(*batch, 1))
    td.set(("next", "reward"), torch.randn(*batch, 1))
    td.set(("next", "done"), torch.zeros(*batch, 1, dtype=torch.bool))
    td.set(("next", "terminated"), torch.zeros(*batch, 1, dtype=torch.bool))
    td.set(("next", "observation"), torch.randn(*batch, N_OBS))
    return td


def stale_setup():
    """An actor, its data, and the actor moved away: the ratio varies."""
    actor = make_actor()
    data = make_data(actor)
    perturb_(actor)
    return actor, data


def ratio_of(loss, data):
    """The behaviour ratio the loss sees, recomputed independently."""
    with torch.no_grad():
        log_prob, _, _ = loss._get_cur_log_prob(data.clone(False))
    return (log_prob - data["action_log_prob"]).exp()


class LeafLogProb:
    """Replaces the current log-prob by a leaf tensor, to read d loss / d log pi."""

    def _get_cur_log_prob(self, tensordict, params=None):
        log_prob, dist, is_composite = super()._get_cur_log_prob(tensordict, params)
        self.leaf = log_prob.detach().requires_grad_(True)
        return self.leaf, dist, is_composite


class LeafR2VPOLoss(LeafLogProb, R2VPOLoss):
    pass


class LeafClipPPOLoss(LeafLogProb, ClipPPOLoss):
    pass


class TestIdentities:
    @pytest.mark.parametrize("lam", [0.0, 0.7, 5.0])
    def test_objective_is_ppo_unclipped_and_penalty_is_lambda_var(self, lam):
        actor, data = stale_setup()
        ppo = PPOLoss(actor, entropy_bonus=False)
        r2 = R2VPOLoss(actor, entropy_bonus=False, lagrange_multiplier=lam)
        out_ppo, out_r2 = ppo(data), r2(data)
        torch.testing.assert_close(out_r2["loss_objective"], out_ppo["loss_objective"])
        r = ratio_of(r2, data)
        expected_var = ((r - r.mean()) ** 2).mean()
        torch.testing.assert_close(out_r2["ratio_var"], expected_var)
        torch.testing.assert_close(out_r2["loss_ratio_var"], lam * expected_var)
        assert out_r2["ratio_var"] > 1e-3  # the penalty is exercised, not inert
        total = out_r2["loss_objective"] + out_r2["loss_ratio_var"]
        torch.testing.assert_close(total, out_ppo["loss_objective"] + lam * expected_var)

    def test_variance_center_one_is_second_moment_about_one(self):
        actor, data = stale_setup()
        loss = R2VPOLoss(actor, entropy_bonus=False, variance_center="one")
        out = loss(data)
        r = ratio_of(loss, data)
        torch.testing.assert_close(out["ratio_var"], ((r - 1) ** 2).mean())
        torch.testing.assert_close(out["mean_ratio"], r.mean())

    def test_diagnostics(self):
        actor, data = stale_setup()
        loss = R2VPOLoss(actor, entropy_bonus=False, diagnostic_clip_epsilon=0.2)
        out = loss(data)
        r = ratio_of(loss, data)
        torch.testing.assert_close(out["ESS"], r.mean() ** 2 / (r**2).mean())
        torch.testing.assert_close(
            out["clip_fraction"], ((r < 0.8) | (r > 1.2)).float().mean()
        )
        torch.testing.assert_close(out["max_ratio"], r.max())
        torch.testing.assert_close(out["lagrange_multiplier"], loss.lagrange_multiplier)
        for key in ("ratio_var", "ESS", "kl_approx", "lagrange_multiplier"):
            assert not out[key].requires_grad

    @pytest.mark.parametrize("batch", [(64,), (4, 16)])
    def test_gae_through_make_value_estimator(self, batch):
        actor = make_actor()
        data = make_data(actor, batch=batch)
        perturb_(actor)
        critic = make_critic()
        loss = R2VPOLoss(actor, critic, lagrange_multiplier=1.0)
        loss.make_value_estimator(gamma=0.9, lmbda=0.8)
        without_adv = data.exclude("advantage", "value_target")
        out = loss(without_adv)
        gae = GAE(gamma=0.9, lmbda=0.8, value_network=critic)
        with torch.no_grad():
            precomputed = gae(without_adv.clone())
        expected = loss(precomputed)
        for key in ("loss_objective", "loss_critic", "ratio_var"):
            torch.testing.assert_close(out[key], expected[key])

    def test_functional_false_matches_functional(self):
        actor, data = stale_setup()
        critic = make_critic()
        out = R2VPOLoss(actor, critic, lagrange_multiplier=1.0)(data)
        stateful = R2VPOLoss(actor, critic, lagrange_multiplier=1.0, functional=False)(data)
        for key in ("loss_objective", "loss_ratio_var", "loss_critic", "ratio_var"):
            torch.testing.assert_close(out[key], stateful[key])

    def test_explained_variance_is_ppo_s_on_a_flat_batch_and_one_scalar_on_a_2d_one(self):
        actor, data = stale_setup()
        critic = make_critic()
        ours = R2VPOLoss(actor, critic)(data)["explained_variance"]
        torch.testing.assert_close(ours, PPOLoss(actor, critic)(data)["explained_variance"].squeeze())
        assert ours.shape == ()
        # with separate_losses the critic runs on a copy of the input: the same value
        separate = R2VPOLoss(actor, critic, separate_losses=True)(data.exclude("state_value"))
        torch.testing.assert_close(separate["explained_variance"], ours)
        data = make_data(actor, batch=(4, 16))
        out = R2VPOLoss(actor, critic)(data)["explained_variance"]
        with torch.no_grad():
            residual = data["value_target"] - critic(data.clone())["state_value"]
        expected = 1 - residual.var(correction=0) / data["value_target"].var(correction=0)
        assert out.shape == ()
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)

    def test_delay_actor_constrains_the_proximal_ratio(self):
        actor, data = stale_setup()
        loss = R2VPOLoss(actor, entropy_bonus=False, delay_actor=True, lagrange_multiplier=1.0)
        ppo = PPOLoss(actor, entropy_bonus=False, delay_actor=True)
        SoftUpdate(loss, eps=0.9), SoftUpdate(ppo, eps=0.9)  # PPO-EWMA's proximal policy
        with torch.no_grad():  # move the proximal (delayed) policy away from both
            for p in loss.target_actor_network_params.values(True, True):
                p.add_(0.2)
        out = loss(data)
        ppo.target_actor_network_params.update(loss.target_actor_network_params)
        # the objective keeps the behaviour ratio, as in PPOLoss
        torch.testing.assert_close(out["loss_objective"], ppo(data)["loss_objective"])
        with torch.no_grad():
            current, _, _ = loss._get_cur_log_prob(data.clone(False))
            prox, _, _ = loss._get_cur_log_prob(
                data.clone(False), params=loss.target_actor_network_params
            )
        r = (current - prox).exp()
        torch.testing.assert_close(out["ratio_var"], ((r - r.mean()) ** 2).mean())
        assert not torch.allclose(r, ratio_of(loss, data))

    def test_max_importance_ratio_caps_the_objective_not_the_statistic(self):
        actor, data = stale_setup()
        r = ratio_of(R2VPOLoss(actor), data)
        cap = r.quantile(0.5).item()
        loss = R2VPOLoss(actor, entropy_bonus=False, max_importance_ratio=cap)
        out = loss(data)
        ppo = PPOLoss(actor, entropy_bonus=False, max_importance_ratio=cap)
        torch.testing.assert_close(out["loss_objective"], ppo(data)["loss_objective"])
        torch.testing.assert_close(out["ratio_var"], ((r - r.mean()) ** 2).mean())
        torch.testing.assert_close(out["max_ratio"], r.max())

    def test_kl_target_sets_twice_the_budget(self):
        loss = R2VPOLoss(make_actor(), kl_target=0.015)
        torch.testing.assert_close(loss.ratio_var_target, torch.tensor(0.03))


class TestGradient:
    @pytest.mark.parametrize("center", ["mean", "one"])
    @pytest.mark.parametrize("lam", [0.0, 0.5, 3.0])
    def test_effective_advantage_form(self, lam, center):
        actor, data = stale_setup()
        loss = LeafR2VPOLoss(
            actor, entropy_bonus=False, lagrange_multiplier=lam, variance_center=center
        )
        out = loss(data)
        (out["loss_objective"] + out["loss_ratio_var"]).backward()
        r = (loss.leaf.detach() - data["action_log_prob"]).exp()
        adv = data["advantage"].squeeze(-1)
        rbar = r.mean() if center == "mean" else 1.0
        expected = -(r / r.numel()) * (adv - 2 * lam * (r - rbar))
        torch.testing.assert_close(loss.leaf.grad, expected)

    def _grads_for_ratios(self, loss_cls, ratios, advantage, **kwargs):
        actor = make_actor()
        data = make_data(actor, batch=(len(ratios),))
        # store the behaviour log-prob that yields exactly the requested ratios
        with torch.no_grad():
            current, _, _ = ClipPPOLoss(actor)._get_cur_log_prob(data.clone(False))
        data["action_log_prob"] = current - torch.log(torch.tensor(ratios))
        data["advantage"] = torch.tensor(advantage).unsqueeze(-1)
        loss = loss_cls(actor, entropy_bonus=False, **kwargs)
        out = loss(data)
        sum(v for k, v in out.items() if k.startswith("loss_")).backward()
        return loss.leaf.grad

    def test_soft_brake_where_clip_has_zero_gradient(self):
        # sample 0: ratio far above the clip band with a positive advantage
        ratios, adv = [1.0, 1.0, 1.0, 1.5], [0.0, 0.0, 0.0, 1.0]
        clip = self._grads_for_ratios(LeafClipPPOLoss, ratios, adv, clip_epsilon=0.2)
        assert clip[3] == 0
        lam = 0.1  # r - rbar = 0.375 < A / (2 lambda) = 5: still pushed up
        r2 = self._grads_for_ratios(LeafR2VPOLoss, ratios, adv, lagrange_multiplier=lam)
        assert r2[3] < 0  # minimising: a negative gradient raises log pi

    @pytest.mark.parametrize("offset, sign", [(-0.05, -1), (0.05, 1)])
    def test_push_reverses_past_a_over_two_lambda(self, offset, sign):
        lam, adv_i, others = 2.0, 1.0, [1.0] * 7
        # r_i - rbar = A / (2 lambda) = 0.25 with rbar = (7 + r_i) / 8
        r_threshold = (0.25 + 7 / 8) / (7 / 8)
        ratios = others + [r_threshold + offset]
        grad = self._grads_for_ratios(
            LeafR2VPOLoss, ratios, [0.0] * 7 + [adv_i], lagrange_multiplier=lam
        )
        assert math.copysign(1, grad[-1].item()) == sign


def _constant_policy(distribution_class, **params):
    """A policy whose distribution parameters are free tensors (no observation input)."""

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.params = nn.ParameterDict({k: nn.Parameter(v) for k, v in params.items()})

        def forward(self, observation):
            batch = observation.shape[:-1]
            return tuple(p.expand(*batch, *p.shape) for p in self.params.values())

    module = TensorDictModule(Constant(), in_keys=["observation"], out_keys=list(params))
    return ProbabilisticActor(
        module,
        in_keys=list(params),
        distribution_class=distribution_class,
        return_log_prob=True,
    )


class TestTrustRegionLink:
    """ratio_var / 2 approaches both KL directions as the policy step shrinks."""

    STEPS = (0.4, 0.2, 0.1, 0.05, 0.025)

    def _relative_errors(self, make_step):
        errors = []
        for t in self.STEPS:
            loss, data, kl_fwd, kl_rev = make_step(t)
            half_var = loss(data)["ratio_var"] / 2
            errors.append(max(abs(half_var - kl) / kl for kl in (kl_fwd, kl_rev)).item())
        return errors

    def _check(self, errors):
        assert all(b < a for a, b in zip(errors, errors[1:])), errors
        assert errors[-1] < 0.1 and errors[-1] < errors[0] / 4, errors

    def test_gaussian(self):
        n = 20_000
        # quantiles of N(0, 1): a deterministic, near-exact expectation under pi_b
        u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        x = torch.distributions.Normal(0.0, 1.0).icdf(u).unsqueeze(-1)

        def make_step(t):
            loc, scale = torch.tensor([t], dtype=torch.float64), torch.tensor([1 + t / 2], dtype=torch.float64)
            actor = _constant_policy(IndependentNormal, loc=loc, scale=scale)
            behaviour = IndependentNormal(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
            data = TensorDict(
                {
                    "observation": torch.zeros(n, 1, dtype=torch.float64),
                    "action": x,
                    "action_log_prob": behaviour.log_prob(x),
                    "advantage": torch.zeros(n, 1, dtype=torch.float64),
                },
                [n],
            )
            current = IndependentNormal(loc, scale)
            kl_fwd = torch.distributions.kl_divergence(behaviour, current)
            kl_rev = torch.distributions.kl_divergence(current, behaviour)
            loss = R2VPOLoss(actor, entropy_bonus=False).double()
            return loss, data, kl_fwd, kl_rev

        self._check(self._relative_errors(make_step))

    def test_categorical(self):
        probs_b = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
        # each action repeated in proportion to pi_b: the batch mean is E_b exactly
        actions = torch.repeat_interleave(torch.arange(4), torch.tensor([1, 2, 3, 4]))
        direction = torch.tensor([1.0, -0.5, 0.3, -0.8], dtype=torch.float64)

        def make_step(t):
            logits = probs_b.log() + t * direction
            actor = _constant_policy(torch.distributions.Categorical, logits=logits)
            behaviour = torch.distributions.Categorical(probs=probs_b)
            current = torch.distributions.Categorical(logits=logits)
            data = TensorDict(
                {
                    "observation": torch.zeros(10, 1, dtype=torch.float64),
                    "action": actions,
                    "action_log_prob": behaviour.log_prob(actions),
                    "advantage": torch.zeros(10, 1, dtype=torch.float64),
                },
                [10],
            )
            kl_fwd = torch.distributions.kl_divergence(behaviour, current)
            kl_rev = torch.distributions.kl_divergence(current, behaviour)
            loss = R2VPOLoss(actor, entropy_bonus=False).double()
            return loss, data, kl_fwd, kl_rev

        self._check(self._relative_errors(make_step))


class TestMeanNoise:
    """RPO's noise on the actor's mean (UpdateMeanNoise): the objective scores the perturbed
    policy, the constraint the policy itself."""

    def make(self):
        torch.manual_seed(0)
        noise = UpdateMeanNoise(0.5)
        net = nn.Sequential(nn.Linear(N_OBS, 2 * N_ACT), NormalParamExtractor(), noise)
        actor = ProbabilisticActor(
            TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
            in_keys=["loc", "scale"], distribution_class=TanhNormal, return_log_prob=True)
        data = make_data(actor)
        perturb_(actor)
        return actor, noise, data

    def test_objective_perturbed_penalty_and_diagnostics_unperturbed(self):
        actor, noise, data = self.make()
        loss = R2VPOLoss(actor, entropy_bonus=False, lagrange_multiplier=2.0)
        clean = loss(data)
        torch.manual_seed(7)
        with noise.active():
            out = loss(data)
        for key in ("ratio_var", "loss_ratio_var", "kl_approx", "ESS", "mean_ratio"):
            torch.testing.assert_close(out[key], clean[key])
        # the objective: the ratio of the policy whose mean took the same noise draw
        torch.manual_seed(7)
        with noise.active():
            perturbed = ratio_of(loss, data)
        expected = -(perturbed * data["advantage"].squeeze(-1)).mean()
        torch.testing.assert_close(out["loss_objective"], expected)
        assert (out["loss_objective"] - clean["loss_objective"]).abs() > 1e-3

    def test_penalty_gradient_is_the_unperturbed_one(self):
        actor, noise, data = self.make()
        loss = R2VPOLoss(actor, entropy_bonus=False, lagrange_multiplier=2.0)

        def penalty_grad():
            actor.zero_grad()
            loss(data)["loss_ratio_var"].backward()
            return [p.grad.clone() for p in actor.parameters()]

        clean = penalty_grad()
        with noise.active():
            noisy = penalty_grad()
        for a, b in zip(noisy, clean):
            torch.testing.assert_close(a, b)

    def test_paused_restores_the_state(self):
        noise = UpdateMeanNoise(0.5)
        loc, scale = torch.zeros(4), torch.ones(4)
        with noise.active():
            with noise.paused():
                assert not noise.is_active
                assert noise((loc, scale))[0].eq(0).all()
            assert noise.is_active and noise((loc, scale))[0].ne(0).any()
        assert not noise.is_active and not UpdateMeanNoise(0.0).is_active


class TestTorchRLConventions:
    def test_set_keys_routes_every_input(self):
        actor, data = stale_setup()
        expected = R2VPOLoss(actor, entropy_bonus=False)(data)
        renamed = data.rename_key_("advantage", "adv").rename_key_("action_log_prob", "old_lp")
        loss = R2VPOLoss(actor, entropy_bonus=False)
        loss.set_keys(advantage="adv", sample_log_prob="old_lp")
        assert "old_lp" in loss.in_keys
        out = loss(renamed)
        for key in ("loss_objective", "loss_ratio_var", "ratio_var"):
            torch.testing.assert_close(out[key], expected[key])

    def test_unknown_key_raises(self):
        with pytest.raises(ValueError, match="not an accepted tensordict key"):
            R2VPOLoss(make_actor()).set_keys(not_a_key="x")

    @pytest.mark.parametrize("reduction, shape", [("none", (64,)), ("mean", ()), ("sum", ())])
    def test_reduction_shapes(self, reduction, shape):
        actor, data = stale_setup()
        out = R2VPOLoss(actor, make_critic(), reduction=reduction)(data)
        for key in ("loss_objective", "loss_ratio_var", "loss_entropy", "loss_critic"):
            assert out[key].shape == torch.Size(shape), key
        if reduction == "sum":
            mean = R2VPOLoss(actor, make_critic(), reduction="mean")(data)
            torch.testing.assert_close(out["loss_ratio_var"], 64 * mean["loss_ratio_var"])

    def test_state_dict_round_trip_and_to(self):
        loss = R2VPOLoss(make_actor(), make_critic(), lagrange_multiplier=1.5, ratio_var_target=0.03)
        loss.lagrange_multiplier = 4.25  # e.g. after dual ascent
        state = loss.state_dict()
        assert "lagrange_multiplier" in state and "ratio_var_target" in state
        assert "last_ratio_var" not in state
        other = R2VPOLoss(make_actor(), make_critic())
        other.load_state_dict(state)
        assert other.lagrange_multiplier.item() == 4.25
        torch.testing.assert_close(other.ratio_var_target, torch.tensor(0.03))
        other = other.double()
        assert other.lagrange_multiplier.dtype == torch.float64
        other.reset()
        assert other.lagrange_multiplier.item() == 0.5  # its own initial value
        bad = dict(state, lagrange_multiplier=torch.tensor(-3.0))
        with pytest.raises(ValueError, match="lagrange_multiplier in the state_dict must be .* >= 0"):
            other.load_state_dict(bad)
        assert other.lagrange_multiplier.item() == 0.5

    def test_half_precision_keeps_the_dual_variables_in_float32(self):
        # in bfloat16 a dual step of 3e-3 is lost against lambda = 1, and delta = 0.02 rounds
        actor, data = stale_setup()
        loss = R2VPOLoss(actor, lagrange_multiplier=1.0, ratio_var_target=0.02).bfloat16()
        assert loss.lagrange_multiplier.dtype == loss.ratio_var_target.dtype == torch.float32
        assert loss.ratio_var_target.item() == torch.tensor(0.02).item()
        dual = DualVariableScheduler(loss, lr=0.1)
        for _ in range(100):
            dual.step(0.05)
        assert loss.lagrange_multiplier.item() == pytest.approx(1.3, abs=1e-5)
        out = loss(data.bfloat16())
        assert out["ratio_var"].dtype == torch.float32 and out["loss_ratio_var"].dtype == torch.float32
        assert loss.last_ratio_var.dtype == torch.float32

    def test_forward_is_pure(self):
        actor, data = stale_setup()
        loss = R2VPOLoss(actor, lagrange_multiplier=1.0)
        first = loss(data)
        second = loss(data)
        assert loss.lagrange_multiplier.item() == 1.0
        torch.testing.assert_close(first["loss_objective"], second["loss_objective"])
        torch.testing.assert_close(loss.last_ratio_var, first["ratio_var"])

    def test_gradients_reach_the_right_networks(self):
        actor, data = stale_setup()
        critic = make_critic()
        loss = R2VPOLoss(actor, critic, lagrange_multiplier=1.0)
        out = loss(data)
        actor_params = {n for n, _ in loss.named_parameters() if "actor" in n}
        critic_params = {n for n, _ in loss.named_parameters() if "critic" in n}
        assert actor_params and critic_params
        for key, reached, untouched in [
            ("loss_objective", actor_params, critic_params),
            ("loss_ratio_var", actor_params, critic_params),
            ("loss_critic", critic_params, actor_params),
        ]:
            loss.zero_grad(set_to_none=True)
            out[key].backward(retain_graph=True)
            grads = {n: p.grad for n, p in loss.named_parameters()}
            assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in reached), key
            assert all(grads[n] is None or grads[n].abs().sum() == 0 for n in untouched), key

    def test_composite_action_distribution(self):
        with set_composite_lp_aggregate(False):
            actor = make_actor(composite=True)
            data = make_data(actor)
            perturb_(actor)
            loss = LeafR2VPOLoss(actor, entropy_bonus=False, lagrange_multiplier=1.0)
            lp_keys = [("action", "action1_log_prob"), ("action", "action2_log_prob")]
            assert loss.tensor_keys.sample_log_prob == lp_keys
            out = loss(data)
        # the joint ratio: the product of the heads' ratios
        r = sum(loss.leaf[k].detach() - data[k] for k in lp_keys).exp()
        torch.testing.assert_close(out["ratio_var"], ((r - r.mean()) ** 2).mean())
        assert out["ratio_var"] > 1e-3

    @pytest.mark.parametrize("normalize_advantage", [False, True])
    def test_collector_mask_excludes_padding(self, normalize_advantage):
        actor = make_actor(distribution_class=IndependentNormal)  # analytic entropy
        data = make_data(actor, batch=(4, 16))
        perturb_(actor)
        mask = torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) > 0.3
        data.set(("collector", "mask"), mask)
        # stored entries may hold garbage at padding, non-finite values included (the
        # networks' inputs there must be finite: a NaN observation poisons their gradients)
        data["action_log_prob"] = torch.where(mask, data["action_log_prob"], float("nan"))
        data["advantage"] = torch.where(mask.unsqueeze(-1), data["advantage"], float("inf"))
        data["observation"] = torch.where(mask.unsqueeze(-1), data["observation"], 1e3)
        data["value_target"] = torch.where(mask.unsqueeze(-1), data["value_target"], float("nan"))
        kwargs = dict(lagrange_multiplier=1.0, normalize_advantage=normalize_advantage)
        loss = R2VPOLoss(actor, make_critic(), **kwargs)
        out = loss(data)
        valid = loss(data[mask].exclude("collector"))
        keys = ["loss_objective", "loss_ratio_var", "loss_critic", "loss_entropy",
                "ratio_var", "ESS", "kl_approx", "mean_ratio", "max_ratio", "entropy",
                "clip_fraction", "explained_variance"]
        for key in keys:
            torch.testing.assert_close(out[key], valid[key], msg=key)
            assert torch.isfinite(out[key])
        # the garbage stays out of the backward pass too
        params = [p for p in loss.parameters() if p.requires_grad]
        loss_keys = [key for key in keys if key.startswith("loss_")]
        grads = torch.autograd.grad(sum(out[k] for k in loss_keys), params)
        valid_grads = torch.autograd.grad(sum(valid[k] for k in loss_keys), params)
        for grad, valid_grad in zip(grads, valid_grads):
            torch.testing.assert_close(grad, valid_grad)
        per_sample = R2VPOLoss(actor, make_critic(), reduction="none", **kwargs)(data)
        assert per_sample["loss_ratio_var"].shape == (4, 16)
        assert (per_sample["loss_ratio_var"][~mask] == 0).all()
        summed = R2VPOLoss(actor, make_critic(), reduction="sum", **kwargs)(data)
        torch.testing.assert_close(summed["loss_ratio_var"], per_sample["loss_ratio_var"].sum())
        torch.testing.assert_close(summed["loss_ratio_var"], valid["loss_ratio_var"] * mask.sum())

    def test_no_valid_position_gives_no_statistic(self):
        actor = make_actor()
        data = make_data(actor, batch=(2, 4))
        data.set(("collector", "mask"), torch.zeros(2, 4, dtype=torch.bool))
        out = R2VPOLoss(actor)(data)
        assert torch.isnan(out["ratio_var"])
        assert out["loss_objective"] == 0 and out["loss_ratio_var"] == 0

    def test_no_valid_position_gives_nan_for_every_statistic(self):
        actor = make_actor()
        data = make_data(actor, batch=(2, 4))
        data.set(("collector", "mask"), torch.zeros(2, 4, dtype=torch.bool))
        out = R2VPOLoss(actor, make_critic())(data)
        statistics = {key for key in out.keys() if not key.startswith("loss_")}
        assert {"ratio_var", "ESS", "mean_ratio", "max_ratio", "clip_fraction", "kl_approx",
                "entropy", "explained_variance"} <= statistics
        for key in statistics - {"lagrange_multiplier"}:
            assert torch.isnan(out[key]), key
        assert out["lagrange_multiplier"] == 0.5
        for key in out.keys():
            if key.startswith("loss_"):
                assert out[key] == 0, key

    def test_precomputed_advantage_without_critic(self):
        actor, data = stale_setup()
        out = R2VPOLoss(actor)(data)
        assert "loss_critic" not in out.keys()
        with pytest.raises(KeyError, match="'advantage'.*no critic"):
            R2VPOLoss(actor)(data.exclude("advantage"))


class TestBadInput:
    def test_nan_advantage_names_the_key(self):
        actor, data = stale_setup()
        data["advantage"][3] = float("nan")
        with pytest.raises(ValueError, match="advantage.*'advantage'"):
            R2VPOLoss(actor)(data)

    @pytest.mark.parametrize("delay_actor", [False, True])
    def test_inf_behaviour_log_prob_names_the_key(self, delay_actor):
        # with delay_actor the stored log-probability enters only the behaviour ratio
        actor, data = stale_setup()
        data["action_log_prob"][0] = float("-inf")
        loss = R2VPOLoss(actor, delay_actor=delay_actor)
        if delay_actor:
            SoftUpdate(loss, eps=0.9)
        with pytest.raises(ValueError, match="'action_log_prob'"):
            loss(data)

    @pytest.mark.parametrize("key", ["action_log_prob", "proximal_log_prob"])
    def test_plus_inf_stored_log_prob_names_the_key(self, key):
        # +inf gives a ratio of 0, which is finite: the stored entries are checked themselves
        actor, data = stale_setup()
        if key == "proximal_log_prob":
            data[key] = data["action_log_prob"].clone()
        data[key][0] = float("inf")
        with pytest.raises(ValueError, match=f"'{key}'.* NaN or inf"):
            R2VPOLoss(actor)(data)

    def test_diverged_policy_is_reported(self):
        actor, data = stale_setup()
        with torch.no_grad():
            next(actor.parameters()).fill_(float("nan"))
        with pytest.raises(ValueError, match="current policy's log-probability"):
            R2VPOLoss(actor)(data)

    def test_ratio_overflow_is_reported(self):
        actor, data = stale_setup()
        data["action_log_prob"][5] -= 200.0  # finite log-probs, exp(200) overflows
        with pytest.raises(ValueError, match="ratio overflowed"):
            R2VPOLoss(actor)(data)

    def test_composite_nan_behaviour_log_prob_names_the_keys(self):
        with set_composite_lp_aggregate(False):
            actor = make_actor(composite=True)
            data = make_data(actor)
            data["action", "action2_log_prob"][0] = float("nan")
            with pytest.raises(ValueError, match="action2_log_prob"):
                R2VPOLoss(actor)(data)

    def test_missing_key_names_it(self):
        actor, data = stale_setup()
        with pytest.raises(KeyError, match="action_log_prob"):
            R2VPOLoss(actor)(data.exclude("action_log_prob"))

    def test_empty_batch_is_refused(self):
        actor, data = stale_setup()
        for loss in (R2VPOLoss(actor), R2VPOLoss(actor, make_critic())):
            with pytest.raises(ValueError, match=r"empty batch \(batch size \(0,\)\)"):
                loss(data[:0])

    def test_missing_action_names_the_key_and_its_field(self):
        actor, data = stale_setup()
        with pytest.raises(KeyError, match="'action' .*tensor_keys.action"):
            R2VPOLoss(actor)(data.exclude("action"))
        loss = R2VPOLoss(actor)
        loss.set_keys(action="act")
        with pytest.raises(KeyError, match="'act' .*tensor_keys.action"):
            loss(data)

    def test_missing_observation_names_the_actor_input(self):
        actor, data = stale_setup()
        with pytest.raises(KeyError, match=r"\['observation'\] missing .* the actor reads them"):
            R2VPOLoss(actor)(data.exclude("observation"))

    def test_missing_advantage_and_next_names_what_the_estimator_reads(self):
        actor, data = stale_setup()
        loss = R2VPOLoss(actor, make_critic())
        with pytest.raises(KeyError, match=r"\('next', 'reward'\).*tensor_keys.advantage"):
            loss(data.exclude("advantage", "next"))
        with pytest.raises(KeyError, match=r"\[\('next', 'reward'\)\] missing"):
            loss(data.exclude("advantage", ("next", "reward")))

    @pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
    def test_non_bool_mask_is_refused(self, dtype):
        actor = make_actor()
        data = make_data(actor, batch=(2, 4))
        data.set(("collector", "mask"), torch.ones(2, 4, dtype=dtype))
        with pytest.raises(TypeError, match=r"\('collector', 'mask'\) must be a bool tensor"):
            R2VPOLoss(actor)(data)

    @pytest.mark.parametrize("bad", [-5.0, float("nan")])
    def test_multiplier_written_in_place_is_never_used_out_of_bounds(self, bad):
        actor, data = stale_setup()
        loss = R2VPOLoss(actor, entropy_bonus=False)
        loss.lagrange_multiplier.fill_(bad)  # bypasses the check on assignment
        with pytest.raises(ValueError, match="lagrange_multiplier is .*fill_"):
            loss(data)
        loss.check_finite = False  # unchecked, it is read as 0
        out = loss(data)
        assert out["lagrange_multiplier"] == 0 and out["loss_ratio_var"] == 0
        assert out["ratio_var"] > 1e-3

    @pytest.mark.parametrize(
        "kwargs, name",
        [
            ({"lagrange_multiplier": -1.0}, "lagrange_multiplier"),
            ({"ratio_var_target": -0.1}, "ratio_var_target"),
            ({"ratio_var_target": float("nan")}, "ratio_var_target"),
            ({"kl_target": -0.1}, "kl_target"),
            ({"ratio_var_target": 0.1, "kl_target": 0.05}, "kl_target"),
            ({"variance_center": "median"}, "variance_center"),
            ({"diagnostic_clip_epsilon": 1.5}, "diagnostic_clip_epsilon"),
        ],
    )
    def test_invalid_hyperparameters(self, kwargs, name):
        with pytest.raises(ValueError, match=name):
            R2VPOLoss(make_actor(), **kwargs)

    def test_clip_epsilon_and_misspelt_arguments_raise(self):
        # PPOLoss ignores keyword arguments it does not know; a misspelling must not
        # leave the default in place
        with pytest.raises(TypeError, match="diagnostic_clip_epsilon"):
            R2VPOLoss(make_actor(), clip_epsilon=0.1)
        with pytest.raises(TypeError, match="lagrange_multiplyer, variance_centre"):
            R2VPOLoss(make_actor(), lagrange_multiplyer=5.0, variance_centre="one")

    def test_integer_hyperparameters_give_float_buffers(self):
        loss = R2VPOLoss(make_actor(), lagrange_multiplier=1, ratio_var_target=0)
        assert loss.lagrange_multiplier.dtype == loss.ratio_var_target.dtype == torch.float32
        loss.lagrange_multiplier = 0.5
        assert loss.lagrange_multiplier.item() == 0.5

    def test_negative_multiplier_assignment_raises(self):
        loss = R2VPOLoss(make_actor())
        buffer = loss.lagrange_multiplier
        for bad in (-0.5, torch.tensor(-0.5), torch.tensor(float("nan")), torch.ones(2)):
            with pytest.raises(ValueError, match="lagrange_multiplier"):
                loss.lagrange_multiplier = bad
        assert loss.lagrange_multiplier.item() == 0.5
        loss.lagrange_multiplier = torch.tensor(2, dtype=torch.float64)  # copied in place
        assert loss.lagrange_multiplier is buffer and buffer.dtype == torch.float32
        assert buffer.item() == 2.0

    def test_an_advantage_with_several_columns_is_checked_not_refused(self):
        # PPOLoss broadcasts an advantage of shape [N, k] (k reward heads) against the ratio
        actor, data = stale_setup()
        data["advantage"] = torch.randn(*data.shape, 2, generator=torch.Generator().manual_seed(0))
        expected = PPOLoss(actor, entropy_bonus=False)(data)["loss_objective"]
        torch.testing.assert_close(R2VPOLoss(actor, entropy_bonus=False)(data)["loss_objective"], expected)
        data["advantage"][3, 1] = float("nan")
        with pytest.raises(ValueError, match="advantage.*'advantage'"):
            R2VPOLoss(actor)(data)

    def test_check_finite_can_be_disabled(self):
        actor, data = stale_setup()
        data["advantage"][3] = float("nan")
        out = R2VPOLoss(actor, check_finite=False)(data)
        assert torch.isnan(out["loss_objective"])


if __name__ == "__main__":
    pytest.main([__file__])
