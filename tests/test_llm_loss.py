"""Tests of the token-level R2VPO loss, its LLM baselines and exact accumulation.

The model tests build a tiny Qwen2 and a character tokenizer in code (offline),
score it through TorchRL's ``TransformersWrapper`` and feed the project's
sequence-batch layout: left-padded prompts, right-padded responses, masks over
the response tokens up to and including EOS, behaviour log-probs that are 0
outside the response, and one advantage per sequence.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tensordict import TensorDict
from torchrl.objectives.llm import CISPOLoss, DAPO, GRPOLoss

from torchrl_r2vpo import DualVariableScheduler
from torchrl_r2vpo.objectives.llm import (
    CISPOLLMLoss,
    DAPOLLMLoss,
    DecoupledGRPOLLMLoss,
    GPPOLLMLoss,
    GRPOLLMLoss,
    GRPOTISLLMLoss,
    LLM_LOSSES,
    M2POLLMLoss,
    make_llm_loss,
    merge_ratio_stats,
    R2VPOLLMLoss,
    R2VPOLLMLossOutput,
    SPOLLMLoss,
    TOPRLLMLoss,
)

PAD, BOS, EOS = 0, 1, 2
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
PROMPT_WIDTH, RESPONSE_WIDTH = 5, 7


# ------------------------------------------------------------------ model and data


@pytest.fixture(scope="module")
def actor():
    pytest.importorskip("transformers")
    from tokenizers import models, pre_tokenizers, Tokenizer
    from torchrl.modules.llm import TransformersWrapper
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(CHARS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    return TransformersWrapper(
        model,
        tokenizer=tokenizer,
        input_mode="tokens",
        generate=False,
        return_log_probs=True,
        pad_output=True,
    )


def current_log_probs(actor, data):
    """The actor's log-prob of each token, 0 outside the response (no grad)."""
    scorer = GRPOLoss(actor, masking_strategy="rlhf", entropy_bonus=False)
    with torch.no_grad():
        log_prob, _, _ = scorer._get_cur_log_prob(data.copy())
    return torch.where(data["masks", "all_assistant_mask"], log_prob, 0.0)


def make_batch(actor, n=6, staleness=0.3, seed=0):
    """A sequence batch whose behaviour log-probs are the actor's plus noise (r != 1)."""
    gen = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(1, PROMPT_WIDTH + 1, (n,), generator=gen)
    response_len = torch.randint(1, RESPONSE_WIDTH + 1, (n,), generator=gen)  # incl. EOS
    response_len[0] = RESPONSE_WIDTH  # one sequence fills the width
    prompt = torch.full((n, PROMPT_WIDTH), PAD)
    response = torch.full((n, RESPONSE_WIDTH), PAD)
    for i in range(n):
        p, r = int(prompt_len[i]), int(response_len[i])
        prompt[i, PROMPT_WIDTH - p :] = torch.randint(4, 4 + len(CHARS), (p,), generator=gen)
        response[i, : r - 1] = torch.randint(4, 4 + len(CHARS), (r - 1,), generator=gen)
        response[i, r - 1] = EOS
    prompt_mask = torch.arange(PROMPT_WIDTH) >= (PROMPT_WIDTH - prompt_len)[:, None]
    response_mask = torch.arange(RESPONSE_WIDTH) < response_len[:, None]
    data = TensorDict(
        {
            ("tokens", "prompt"): prompt,
            ("tokens", "response"): response,
            ("tokens", "full"): torch.cat([prompt, response], -1),
            ("masks", "all_attention_mask"): torch.cat([prompt_mask, response_mask], -1),
            ("masks", "all_assistant_mask"): torch.cat(
                [torch.zeros_like(prompt_mask), response_mask], -1
            ),
            "advantage": torch.randn(n, 1, 1, generator=gen),
        },
        [n],
    )
    noise = staleness * torch.randn(data["tokens", "full"].shape, generator=gen)
    behaviour = current_log_probs(actor, data) + noise
    data["log_probs", "full"] = torch.where(data["masks", "all_assistant_mask"], behaviour, 0.0)
    return data


def pad_response(data, width):
    """``data`` with ``width`` more padding columns after every response."""
    pads = {("tokens", "response"): PAD, ("tokens", "full"): PAD, ("masks", "all_attention_mask"): False,
            ("masks", "all_assistant_mask"): False, ("log_probs", "full"): 0.0,
            ("next", "ref_log_probs", "full"): 0.0}
    padded = data.clone()
    for key, value in pads.items():
        if key in data.keys(True, True):
            padded[key] = torch.nn.functional.pad(data[key], (0, width), value=value)
    return padded


def ratio_and_mask(data, actor):
    """The current/behaviour ratio over [N, L] and the response mask, recomputed here."""
    mask = data["masks", "all_assistant_mask"]
    log_ratio = current_log_probs(actor, data) - data["log_probs", "full"]
    return torch.where(mask, log_ratio.exp(), 1.0), mask


def total(out):
    return sum(v for k, v in out.to_tensordict().items() if k.startswith("loss_"))


def grads(actor):
    return [p.grad.clone() for p in actor.parameters()]


def backward_grads(actor, fn):
    actor.zero_grad()
    fn()
    return grads(actor)


class LeafLogProb:
    """Replaces the current log-prob by a leaf tensor, to read d loss / d log pi."""

    def _get_cur_log_prob(self, tensordict):
        log_prob, dist, is_composite = super()._get_cur_log_prob(tensordict)
        self.leaf = log_prob.detach().requires_grad_(True)
        return self.leaf, dist, is_composite


class LeafR2VPOLLMLoss(LeafLogProb, R2VPOLLMLoss):
    pass


# ---------------------------------------------------------------- layout and masks


class TestLayout:
    @pytest.mark.parametrize("strategy", ["sft", "rlhf"])
    def test_strategy_masks_exactly_the_response(self, actor, strategy):
        data = make_batch(actor)
        loss = R2VPOLLMLoss(actor, masking_strategy=strategy, entropy_bonus=False)
        _, _, _, mask = loss._log_weight(data.copy(), data["advantage"].shape[:-1])
        assert torch.equal(mask, data["masks", "all_assistant_mask"])
        assert torch.equal(loss.token_mask(data), mask)

    def test_generic_also_scores_the_prompt(self, actor):
        data = make_batch(actor)
        loss = R2VPOLLMLoss(actor, masking_strategy="generic", entropy_bonus=False)
        _, _, _, mask = loss._log_weight(data.copy(), data["advantage"].shape[:-1])
        assert torch.equal(mask, loss.token_mask(data))
        assert torch.equal(mask, data["masks", "all_attention_mask"])

    def test_sft_and_rlhf_give_the_same_loss(self, actor):
        data = make_batch(actor)
        out = {
            s: R2VPOLLMLoss(actor, masking_strategy=s, lagrange_multiplier=1.0)(data)
            for s in ("sft", "rlhf")
        }
        for key in ("loss_objective", "loss_ratio_var", "loss_entropy", "ratio_var"):
            torch.testing.assert_close(out["sft"].get(key), out["rlhf"].get(key))

    def test_count_tokens_drops_non_finite_behaviour_log_probs(self, actor):
        data = make_batch(actor)
        n = int(data["masks", "all_assistant_mask"].sum())
        data["log_probs", "full"][0, PROMPT_WIDTH + 1] = float("nan")
        loss = R2VPOLLMLoss(actor, masking_strategy="rlhf", entropy_bonus=False)
        assert int(loss.count_tokens(data)) == n - 1
        with pytest.warns(UserWarning, match=f"leaves out 1 of {n} tokens"):
            assert int(loss(data).num_tokens) == n - 1


# ----------------------------------------------------------------- R2VPO identities


class TestR2VPOLLM:
    @pytest.mark.parametrize("aggregation", ["token_mean", "prompt_mean"])
    def test_lambda_zero_is_grpo_unclipped(self, actor, aggregation):
        data = make_batch(actor)
        kw = dict(masking_strategy="rlhf", entropy_bonus=False, aggregation=aggregation)
        r2 = R2VPOLLMLoss(actor, lagrange_multiplier=0.0, **kw)
        wide = (0.999999, 1e6)
        for baseline in (GRPOLoss(actor, clip_epsilon=wide, **kw), CISPOLoss(actor, clip_epsilon=wide, **kw)):
            out_r2 = r2(data)
            g_r2 = backward_grads(actor, lambda: total(out_r2).backward())
            out_b = baseline(data)
            g_b = backward_grads(actor, lambda: out_b.loss_objective.backward())
            torch.testing.assert_close(out_r2.loss_objective, out_b.loss_objective)
            torch.testing.assert_close(out_r2.loss_ratio_var, torch.zeros_like(out_r2.loss_ratio_var))
            for a, b in zip(g_r2, g_b):
                torch.testing.assert_close(a, b)
        # and explicitly -mean(r A)
        r, mask = ratio_and_mask(data, actor)
        per_token = -r * data["advantage"].squeeze(-1)
        if aggregation == "token_mean":
            expected = per_token[mask].mean()
        else:
            expected = (torch.where(mask, per_token, 0).sum(-1) / mask.sum(-1)).mean()
        torch.testing.assert_close(out_r2.loss_objective.reshape(()), expected)

    @pytest.mark.parametrize("center", ["mean", "one"])
    def test_variance_over_valid_tokens(self, actor, center):
        data = make_batch(actor)
        loss = R2VPOLLMLoss(actor, lagrange_multiplier=3.0, variance_center=center,
                            masking_strategy="rlhf", entropy_bonus=False)
        out = loss(data)
        r, mask = ratio_and_mask(data, actor)
        valid = r[mask]
        rbar = valid.mean() if center == "mean" else torch.tensor(1.0)
        expected = ((valid - rbar) ** 2).mean()
        assert expected > 1e-2  # the penalty is exercised
        torch.testing.assert_close(out.ratio_var, expected)
        torch.testing.assert_close(out.loss_ratio_var.reshape(()), 3.0 * expected)
        torch.testing.assert_close(loss.last_ratio_var, expected)
        torch.testing.assert_close(out.mean_ratio, valid.mean())
        torch.testing.assert_close(out.max_ratio, valid.max())
        assert int(out.num_tokens) == int(mask.sum())
        torch.testing.assert_close(out.ratio_sum, valid.double().sum())
        torch.testing.assert_close(out.ratio_sq_sum, (valid.double() ** 2).sum())
        # the padded ratio is 1 at masked tokens: a variance over all positions differs
        assert not torch.isclose(out.ratio_var, ((r - r.mean()) ** 2).mean())

    def test_masked_tokens_do_not_matter(self, actor):
        data = make_batch(actor)
        loss = R2VPOLLMLoss(actor, lagrange_multiplier=1.0, masking_strategy="rlhf")
        out = loss(data)
        # garbage behaviour log-probs outside the response
        garbage = data.clone()
        outside = ~data["masks", "all_assistant_mask"]
        garbage["log_probs", "full"] = torch.where(outside, torch.randn(outside.shape) * 5,
                                                   data["log_probs", "full"])
        # two more pad columns after every response
        n = data.shape[0]
        padded = data.clone()
        for key, fill in ((("tokens", "full"), PAD), (("masks", "all_attention_mask"), False),
                          (("masks", "all_assistant_mask"), False), (("log_probs", "full"), 0.0)):
            value = data[key]
            padded[key] = None
            padded.set(key, torch.cat([value, torch.full((n, 2), fill, dtype=value.dtype)], -1))
        for other in (loss(garbage), loss(padded)):
            for key in ("ratio_var", "ratio_sum", "num_tokens", "loss_objective",
                        "loss_ratio_var", "mean_ratio"):
                torch.testing.assert_close(other.get(key), out.get(key))

    def test_collector_mask_drops_whole_sequences_from_loss_and_statistics(self, actor):
        data = make_batch(actor)
        keep = torch.ones(data.shape[0], dtype=torch.bool)
        keep[1] = False
        data.set(("collector", "mask"), keep)
        loss = R2VPOLLMLoss(actor, lagrange_multiplier=1.0, masking_strategy="rlhf")
        out, reference = loss(data), loss(data[keep].exclude("collector"))
        for key in ("loss_objective", "loss_ratio_var", "ratio_var", "ratio_sum", "num_tokens",
                    "mean_ratio", "max_ratio"):
            torch.testing.assert_close(out.get(key), reference.get(key), msg=key)
        assert int(loss.count_tokens(data)) == int(reference.num_tokens)

    @pytest.mark.parametrize("aggregation", ["token_mean", "prompt_mean"])
    @pytest.mark.parametrize("lam", [0.0, 0.7, 4.0])
    def test_gradient_is_the_effective_advantage(self, actor, aggregation, lam):
        data = make_batch(actor)
        loss = LeafR2VPOLLMLoss(actor, lagrange_multiplier=lam, masking_strategy="rlhf",
                                entropy_bonus=False, aggregation=aggregation)
        total(loss(data)).backward()
        r, mask = ratio_and_mask(data, actor)
        advantage = data["advantage"].reshape(-1, 1)
        rbar = r[mask].mean()
        token_weight = 1.0 / mask.sum()  # the penalty is a token mean under every aggregation
        if aggregation == "token_mean":
            weight = torch.full_like(r, token_weight)
        else:
            weight = (1.0 / (mask.sum(-1, keepdim=True) * mask.shape[0])).expand_as(r)
        expected = -r * (weight * advantage - token_weight * 2 * lam * (r - rbar))
        expected = torch.where(mask, expected, 0.0)
        torch.testing.assert_close(loss.leaf.grad, expected)
        assert (loss.leaf.grad[~mask] == 0).all()

    @pytest.mark.parametrize("aggregation", ["token_mean", "prompt_mean"])
    def test_penalty_is_lambda_times_the_token_variance(self, actor, aggregation):
        # the multiplier prices the constraint the scheduler measures, whatever the
        # weighting of the objective
        out = R2VPOLLMLoss(actor, lagrange_multiplier=3.0, masking_strategy="rlhf",
                           aggregation=aggregation)(make_batch(actor))
        torch.testing.assert_close(out.loss_ratio_var, 3.0 * out.ratio_var)

    def test_last_ratio_stats_are_the_outputs_sums(self, actor):
        loss = R2VPOLLMLoss(actor, lagrange_multiplier=1.0, masking_strategy="rlhf")
        out = loss(make_batch(actor))
        stats = loss.last_ratio_stats
        assert int(stats.count) == int(out.num_tokens)
        torch.testing.assert_close(stats.ratio_sum, out.ratio_sum)
        torch.testing.assert_close(stats.ratio_sq_sum, out.ratio_sq_sum)
        torch.testing.assert_close(stats.variance("mean").float(), out.ratio_var)

    def test_squared_deviation_works_under_torch_func(self):
        from torchrl_r2vpo.objectives.ratio_variance import squared_deviation

        ratio, center = torch.rand(3, 4) + 0.5, torch.tensor(1.1)
        grad = torch.func.grad(lambda r: squared_deviation(r, center).sum())(ratio)
        torch.testing.assert_close(grad, 2 * (ratio - center))
        rows = torch.func.vmap(lambda r: squared_deviation(r, center))(ratio)
        torch.testing.assert_close(rows, (ratio - center) ** 2)

    def test_reduction_none_keeps_tokens(self, actor):
        data = make_batch(actor)
        out = R2VPOLLMLoss(actor, aggregation="none", masking_strategy="rlhf",
                           lagrange_multiplier=1.0)(data)
        mask = data["masks", "all_assistant_mask"]
        assert out.loss_ratio_var.shape == (*mask.shape, 1)
        assert (out.loss_ratio_var.squeeze(-1)[~mask] == 0).all()

    @pytest.mark.parametrize("name", list(LLM_LOSSES))
    def test_kl_to_ref_is_a_mean_over_the_valid_tokens_whatever_the_padding(self, actor, name):
        data = make_batch(actor)
        mask = data["masks", "all_assistant_mask"]
        data["next", "ref_log_probs", "full"] = torch.where(mask, data["log_probs", "full"] - 0.1, 0.0)
        with torch.no_grad():
            current = current_log_probs(actor, data)
        diff = (data["next", "ref_log_probs", "full"] - current)[mask]
        expected = (diff.expm1() - diff).mean()  # GRPO's k3, token mean
        # M2PO's mask drops tokens from every term: a threshold that keeps them all
        extra = {"m2_threshold": 1e9} if name == "m2po" else {}
        out = make_llm_loss(name, actor, kl_to_ref_coeff=0.5, masking_strategy="rlhf", **extra)(data)
        torch.testing.assert_close(out.kl_to_ref, expected)
        torch.testing.assert_close(out.loss_kl_to_ref, 0.5 * expected)
        # four more padding columns: the same terms (GRPOLoss's shrink with the padding)
        padded = pad_response(data, 4)
        again = make_llm_loss(name, actor, kl_to_ref_coeff=0.5, masking_strategy="rlhf", **extra)(padded)
        torch.testing.assert_close(again.loss_kl_to_ref, out.loss_kl_to_ref)
        grpo = GRPOLoss(actor, kl_to_ref_coeff=0.5, masking_strategy="rlhf")
        assert grpo(padded).kl_to_ref < 0.95 * grpo(data).kl_to_ref

    def test_non_finite_raises(self, actor):
        data = make_batch(actor)
        data["advantage"][1] = float("nan")
        with pytest.raises(ValueError, match="advantage"):
            R2VPOLLMLoss(actor, masking_strategy="rlhf")(data)

    def test_no_valid_token_gives_nan_statistic(self, actor):
        data = make_batch(actor)
        data["masks", "all_assistant_mask"] = torch.zeros_like(data["masks", "all_assistant_mask"])
        out = R2VPOLLMLoss(actor, masking_strategy="rlhf", entropy_bonus=False)(data)
        assert torch.isnan(out.ratio_var) and int(out.num_tokens) == 0
        assert torch.isfinite(out.loss_objective).all()

    def test_multiplier_written_in_place_is_never_used_out_of_bounds(self, actor):
        data = make_batch(actor)
        loss = R2VPOLLMLoss(actor, masking_strategy="rlhf", entropy_bonus=False)
        loss.lagrange_multiplier.fill_(-5.0)  # bypasses the check on assignment
        with pytest.raises(ValueError, match="lagrange_multiplier is -5.0.*fill_"):
            loss(data)
        loss.check_finite = False  # unchecked, it is read as 0
        out = loss(data)
        assert out.lagrange_multiplier == 0 and out.loss_ratio_var == 0 and out.ratio_var > 1e-3


STATISTICS = ("clip_fraction", "kl_approx", "ESS", "entropy", "kl_to_ref", "ratio_var",
              "mean_ratio", "max_ratio")


class TestBadInput:
    """Every loss of the package reads its input the same way."""

    @pytest.mark.parametrize("name", list(LLM_LOSSES))
    def test_non_finite_behaviour_log_probs_are_left_out_with_a_warning(self, actor, name):
        data = make_batch(actor)
        mask = data["masks", "all_assistant_mask"]
        n = int(mask.sum())
        data["log_probs", "full"][0, PROMPT_WIDTH] = float("inf")  # a ratio of 0, if kept
        data["log_probs", "full"][1, PROMPT_WIDTH] = float("-inf")
        loss = make_llm_loss(name, actor, masking_strategy="rlhf", entropy_bonus=False)
        with pytest.warns(UserWarning, match=rf"leaves out 2 of {n} tokens \({2 / n:.1%}\)"):
            out = loss(data)
        reference = data.clone()
        reference["masks", "all_assistant_mask"][:2, PROMPT_WIDTH] = False
        reference["log_probs", "full"][:2, PROMPT_WIDTH] = 0.0
        torch.testing.assert_close(out.loss_objective, loss(reference).loss_objective)

    @pytest.mark.parametrize("name", list(LLM_LOSSES))
    def test_no_token_left_raises(self, actor, name):
        data = make_batch(actor)
        mask = data["masks", "all_assistant_mask"]
        data["log_probs", "full"] = torch.where(mask, float("nan"), data["log_probs", "full"])
        loss = make_llm_loss(name, actor, masking_strategy="rlhf")
        with pytest.raises(ValueError, match=r"\('log_probs', 'full'\).* every one of the "
                                             rf"{int(mask.sum())} tokens .* no token is left"):
            loss(data)

    @pytest.mark.parametrize("name", list(LLM_LOSSES))
    def test_no_valid_token_gives_nan_for_every_statistic(self, actor, name):
        data = make_batch(actor)
        mask = data["masks", "all_assistant_mask"]
        data["next", "ref_log_probs", "full"] = data["log_probs", "full"] - 0.1
        data["masks", "all_assistant_mask"] = torch.zeros_like(mask)
        out = make_llm_loss(name, actor, masking_strategy="rlhf", kl_to_ref_coeff=0.1)(data)
        values = out.to_tensordict()
        for key in STATISTICS:
            if key in values.keys():
                assert torch.isnan(values[key]), key
        for key in values.keys():
            if key.startswith("loss_"):
                assert values[key] == 0, key
        if name == "r2vpo":
            assert out.num_tokens == 0 and out.ratio_sum == 0 and out.lagrange_multiplier == 0.5

    @pytest.mark.parametrize("name", ["r2vpo", "grpo"])
    @pytest.mark.parametrize("case, error, match", [
        ("empty", ValueError, r"empty batch \(batch size \(0,\)\)"),
        ("no action", KeyError, r"\('tokens', 'full'\) .*tensor_keys.action"),
        ("no advantage", KeyError, r"'advantage' .*tensor_keys.advantage: one value per sequence"),
        ("no log-prob", KeyError, r"\('log_probs', 'full'\) .*tensor_keys.sample_log_prob"),
        ("int assistant mask", TypeError, r"\('masks', 'all_assistant_mask'\) must be a bool"),
        ("int collector mask", TypeError, r"\('collector', 'mask'\) must be a bool"),
    ])
    def test_bad_input_names_the_entry(self, actor, name, case, error, match):
        data = make_batch(actor)
        if case == "empty":
            data = data[:0]
        elif case == "no action":
            data = data.exclude(("tokens", "full"))
        elif case == "no advantage":
            data = data.exclude("advantage")
        elif case == "no log-prob":
            data = data.exclude(("log_probs", "full"))
        elif case == "int assistant mask":
            data["masks", "all_assistant_mask"] = data["masks", "all_assistant_mask"].long()
        else:
            data["collector", "mask"] = torch.ones(data.shape, dtype=torch.long)
        with pytest.raises(error, match=match):
            make_llm_loss(name, actor, masking_strategy="rlhf")(data)


# ------------------------------------------------------------ gradient accumulation


SPLITS = [slice(0, 2), slice(2, 3), slice(3, 6)]


def accumulate(loss, data, **kw):
    outs = []
    for part in SPLITS:
        with loss.accumulation(**kw):
            out = loss(data[part])
        total(out).backward()
        outs.append(out)
    return outs


class TestAccumulation:
    @pytest.mark.parametrize(
        "name, kwargs",
        [
            ("r2vpo", dict(aggregation="token_mean")),
            ("r2vpo", dict(aggregation="prompt_mean")),
            ("r2vpo", dict(aggregation="token_mean", kl_to_ref_coeff=0.3)),
            ("grpo", dict(aggregation="prompt_mean", kl_to_ref_coeff=0.3)),
            ("r2vpo", dict(aggregation="token_mean", variance_center="one")),
            ("grpo", dict(aggregation="token_mean")),
            ("gppo", dict(aggregation="prompt_mean")),
        ],
    )
    def test_micro_batch_gradients_sum_to_full_batch(self, actor, name, kwargs):
        data = make_batch(actor)
        mask = data["masks", "all_assistant_mask"]
        data["next", "ref_log_probs", "full"] = torch.where(mask, data["log_probs", "full"] - 0.2, 0.0)
        if name == "r2vpo":
            kwargs = dict(lagrange_multiplier=2.0, **kwargs)
        loss = make_llm_loss(name, actor, masking_strategy="rlhf", **kwargs)
        full_out = loss(data)
        g_full = backward_grads(actor, lambda: total(full_out).backward())

        centre = None
        if name == "r2vpo":
            with torch.no_grad():  # the two-pass recipe for the global centre
                centre = merge_ratio_stats([loss(data[part]) for part in SPLITS])["ratio_mean"]
        acc = dict(num_tokens=loss.count_tokens(data), num_sequences=loss.count_sequences(data),
                   ratio_mean=centre)
        actor.zero_grad()
        outs = accumulate(loss, data, **acc)
        g_acc = grads(actor)
        for a, b in zip(g_acc, g_full):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(sum(total(o) for o in outs).detach(), total(full_out).detach())

        # without the global normaliser (a mean of micro-batch means) it differs
        actor.zero_grad()
        for part in SPLITS:
            (total(loss(data[part])) / len(SPLITS)).backward()
        assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(grads(actor), g_full))

    def test_prompt_mean_with_a_kl_term_needs_only_num_sequences(self, actor):
        data = make_batch(actor)
        mask = data["masks", "all_assistant_mask"]
        data["next", "ref_log_probs", "full"] = torch.where(mask, data["log_probs", "full"] - 0.2, 0.0)
        loss = make_llm_loss("grpo", actor, masking_strategy="rlhf", aggregation="prompt_mean",
                             kl_to_ref_coeff=0.3)
        full = loss(data).loss_kl_to_ref
        parts = []
        for part in SPLITS:
            with loss.accumulation(num_sequences=loss.count_sequences(data)):
                parts.append(loss(data[part]).loss_kl_to_ref)
        torch.testing.assert_close(sum(parts), full)

    def test_centre_matters(self, actor):
        data = make_batch(actor)
        loss = R2VPOLLMLoss(actor, lagrange_multiplier=5.0, masking_strategy="rlhf", entropy_bonus=False)
        g_full = backward_grads(actor, lambda: total(loss(data)).backward())
        actor.zero_grad()
        accumulate(loss, data, num_tokens=loss.count_tokens(data))  # each micro-batch centred on itself
        assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(grads(actor), g_full))

    def test_merged_variance_is_the_full_batch_variance(self, actor):
        data = make_batch(actor)
        loss = R2VPOLLMLoss(actor, masking_strategy="rlhf", entropy_bonus=False)
        full = loss(data)
        with torch.no_grad():
            parts = [loss(data[part]) for part in SPLITS]
        merged = merge_ratio_stats(parts)
        torch.testing.assert_close(merged["ratio_var"].float(), full.ratio_var)
        torch.testing.assert_close(merged["ratio_mean"].float(), full.mean_ratio)
        assert int(merged["num_tokens"]) == int(full.num_tokens)
        mean_of_means = torch.stack([p.ratio_var for p in parts]).mean()
        assert not torch.isclose(mean_of_means, full.ratio_var, rtol=1e-3)
        # with the global centre, the merge is unchanged
        with loss.accumulation(num_tokens=1, ratio_mean=merged["ratio_mean"]), torch.no_grad():
            again = merge_ratio_stats([loss(data[part]) for part in SPLITS])
        torch.testing.assert_close(again["ratio_var"], merged["ratio_var"])
        ones = merge_ratio_stats(parts, variance_center="one")
        full_one = R2VPOLLMLoss(actor, masking_strategy="rlhf", entropy_bonus=False,
                                variance_center="one")(data)
        torch.testing.assert_close(ones["ratio_var"].float(), full_one.ratio_var)

    def test_contract_errors(self, actor):
        loss = R2VPOLLMLoss(actor, masking_strategy="rlhf")
        with pytest.raises(ValueError, match="num_tokens"):
            with loss.accumulation(ratio_mean=1.0):
                pass
        with pytest.raises(ValueError, match="num_sequences"):
            with R2VPOLLMLoss(actor, aggregation="prompt_mean").accumulation(num_tokens=3):
                pass
        with pytest.raises(ValueError, match="kl_mask_threshold"):
            with R2VPOLLMLoss(actor, kl_mask_threshold=0.1).accumulation(num_tokens=3):
                pass
        with pytest.raises(ValueError, match="> 0"):
            with loss.accumulation(num_tokens=0):
                pass
        with loss.accumulation(num_tokens=3):
            with pytest.raises(RuntimeError, match="nested"):
                with loss.accumulation(num_tokens=3):
                    pass
        assert loss._accumulation is None


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    center=st.sampled_from(["mean", "one"]),
)
def test_merge_ratio_stats_any_split(sizes, seed, center):
    gen = torch.Generator().manual_seed(seed)
    ratios = [torch.rand(n, generator=gen, dtype=torch.float64) * 2 for n in sizes]
    stats = [{"ratio_sum": r.sum(), "ratio_sq_sum": (r**2).sum(), "num_tokens": torch.tensor(len(r))}
             for r in ratios]
    merged = merge_ratio_stats(stats, variance_center=center)
    allr = torch.cat(ratios)
    if allr.numel() == 0:
        assert torch.isnan(merged["ratio_var"])
        return
    rbar = allr.mean() if center == "mean" else 1.0
    torch.testing.assert_close(merged["ratio_var"], ((allr - rbar) ** 2).mean())
    torch.testing.assert_close(merged["ratio_mean"], allr.mean())


# ------------------------------------------------------------------------ baselines


def per_token(loss, ratios, advantages):
    """Value and d value / d log r of a loss's per-token objective at given ratios."""
    log_weight = torch.tensor(ratios).log().reshape(-1, 1, 1).requires_grad_(True)
    advantage = torch.tensor(advantages).reshape(-1, 1, 1)
    value, clip_fraction = loss._compute_policy_objective(log_weight, advantage)
    value.sum().backward()
    return value.detach().flatten(), log_weight.grad.flatten(), clip_fraction


RATIOS = [0.5, 0.5, 1.1, 1.1, 1.5, 1.5]
ADVANTAGES = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0]


class TestBaselines:
    def test_grpo_zero_gradient_where_clipped(self):
        value, grad, frac = per_token(GRPOLLMLoss(clip_epsilon=0.2), RATIOS, ADVANTAGES)
        torch.testing.assert_close(value, torch.tensor([-0.5, 0.8, -1.1, 1.1, -1.2, 1.5]))
        torch.testing.assert_close(grad, torch.tensor([-0.5, 0.0, -1.1, 1.1, 0.0, 1.5]))
        torch.testing.assert_close(frac, torch.tensor(4 / 6))

    def test_gppo_keeps_a_bounded_gradient_where_grpo_clips(self):
        grpo_value, _, _ = per_token(GRPOLLMLoss(clip_epsilon=0.2), RATIOS, ADVANTAGES)
        value, grad, frac = per_token(GPPOLLMLoss(clip_epsilon=0.2), RATIOS, ADVANTAGES)
        torch.testing.assert_close(value, grpo_value)  # the forward value is PPO-clip's
        # A < 0, r = 0.5 < 0.8: (1 - 0.2) * A;  A > 0, r = 1.5 > 1.2: (1 + 0.2) * A
        torch.testing.assert_close(grad, torch.tensor([-0.5, 0.8, -1.1, 1.1, -1.2, 1.5]))
        torch.testing.assert_close(frac, torch.tensor(2 / 6))
        _, scaled, _ = per_token(GPPOLLMLoss(clip_epsilon=0.2, beta_low=0.5, beta_high=0.25),
                                 RATIOS, ADVANTAGES)
        torch.testing.assert_close(scaled[[1, 4]], torch.tensor([0.4, -0.3]))

    def test_gppo_asymmetric_band(self):
        _, grad, _ = per_token(GPPOLLMLoss(clip_epsilon=(0.1, 0.28)), [1.5, 0.5], [1.0, -1.0])
        torch.testing.assert_close(grad, torch.tensor([-1.28, 0.9]))  # (1 + eps_high), (1 - eps_low)

    def test_topr_positive_unweighted_negative_truncated(self):
        value, grad, frac = per_token(TOPRLLMLoss(), RATIOS, ADVANTAGES)
        # A > 0: -A grad log pi whatever r;  A < 0: -min(r, 1) A grad log pi
        torch.testing.assert_close(grad, torch.tensor([-1.0, 0.5, -1.0, 1.0, -1.0, 1.0]))
        torch.testing.assert_close(value, grad)
        torch.testing.assert_close(frac, torch.tensor(2 / 6))
        _, weighted, _ = per_token(TOPRLLMLoss(positive_weight=0.5, negative_weight=2.0),
                                   RATIOS, ADVANTAGES)
        torch.testing.assert_close(weighted, torch.tensor([-0.5, 1.0, -0.5, 2.0, -0.5, 2.0]))

    def test_spo_formula_and_restoring_force(self):
        eps = 0.2
        value, grad, _ = per_token(SPOLLMLoss(clip_epsilon=eps), RATIOS, ADVANTAGES)
        r, a = torch.tensor(RATIOS), torch.tensor(ADVANTAGES)
        torch.testing.assert_close(value, -(r * a - a.abs() / (2 * eps) * (r - 1) ** 2))
        torch.testing.assert_close(grad, -r * (a - a.abs() * (r - 1) / eps))
        # stationary on the clip boundary, pulling back beyond it
        _, g, _ = per_token(SPOLLMLoss(clip_epsilon=eps), [1.2, 1.3, 0.8, 0.7], [1.0, 1.0, -1.0, -1.0])
        torch.testing.assert_close(g[[0, 2]], torch.zeros(2), atol=1e-6, rtol=0)
        assert g[1] > 0 and g[3] < 0

    def test_cispo_gradient_everywhere_unlike_torchrl(self):
        value, grad, _ = per_token(CISPOLLMLoss(clip_epsilon=0.2), RATIOS, ADVANTAGES)
        clipped = torch.tensor(RATIOS).clamp(0.8, 1.2) * torch.tensor(ADVANTAGES)
        torch.testing.assert_close(value, -clipped)
        torch.testing.assert_close(grad, -clipped)
        # TorchRL 0.14.1's CISPOLoss has the same value but no gradient where clipped
        tr_value, tr_grad, _ = per_token(CISPOLoss(clip_epsilon=0.2), RATIOS, ADVANTAGES)
        torch.testing.assert_close(tr_value, value)
        assert (tr_grad[[0, 1, 4, 5]] == 0).all()

    def test_cispo_default_bounds_the_weight_from_above_only(self):
        # MiniMax-M1 tunes only the upper bound; the default is ScaleRL's clip(r, 0, 5)
        value, grad, frac = per_token(CISPOLLMLoss(), [0.05, 0.5, 4.0, 7.0], [1.0, -1.0, 1.0, -1.0])
        weight = torch.tensor([0.05, 0.5, 4.0, 5.0])
        torch.testing.assert_close(value, -weight * torch.tensor([1.0, -1.0, 1.0, -1.0]))
        torch.testing.assert_close(grad, value)
        torch.testing.assert_close(frac, torch.tensor(1 / 4))
        with pytest.raises(ValueError, match=r"clip_epsilon low must be in \[0, 1\]"):
            CISPOLLMLoss(clip_epsilon=(1.5, 4.0))

    def test_spo_rejects_two_epsilons(self):
        with pytest.raises(ValueError, match="single epsilon"):
            SPOLLMLoss(clip_epsilon=(0.2, 0.28))

    @pytest.mark.parametrize("name", list(LLM_LOSSES))
    def test_every_loss_runs_on_the_sequence_batch(self, actor, name):
        data = make_batch(actor)
        loss = make_llm_loss(name, actor, masking_strategy="rlhf")
        out = loss(data)
        assert isinstance(loss, GRPOLoss)
        value = total(out)
        assert torch.isfinite(value)
        actor.zero_grad()
        value.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.parameters())

    @pytest.mark.parametrize("aggregation", ["token_mean", "prompt_mean"])
    @pytest.mark.parametrize("name", list(LLM_LOSSES))
    def test_a_dropped_sequence_is_as_if_absent_whatever_it_holds(self, actor, name, aggregation):
        data = make_batch(actor)
        mask = data["masks", "all_assistant_mask"]
        data["next", "ref_log_probs", "full"] = torch.where(mask, data["log_probs", "full"] - 0.2, 0.0)
        keep = torch.ones(data.shape[0], dtype=torch.bool)
        keep[1] = False
        reference = data[keep]
        data.set(("collector", "mask"), keep)
        data["advantage"][1] = float("nan")
        # a ratio of exp(200) overflows: inf where the loss multiplies by a zero weight
        data["log_probs", "full"][1] = torch.where(mask[1], -200.0, 0.0)
        loss = make_llm_loss(name, actor, masking_strategy="rlhf", aggregation=aggregation,
                             kl_to_ref_coeff=0.1)
        out = loss(data)
        g = backward_grads(actor, lambda: total(out).backward())
        reference_out = loss(reference)
        g_reference = backward_grads(actor, lambda: total(reference_out).backward())
        torch.testing.assert_close(total(out), total(reference_out))
        torch.testing.assert_close(out.kl_to_ref, reference_out.kl_to_ref)
        for a, b in zip(g, g_reference):
            torch.testing.assert_close(a, b)
        assert int(loss.count_sequences(data)) == int(keep.sum())

    @pytest.mark.parametrize("name", list(LLM_LOSSES))
    def test_kl_masked_tokens_stay_out_of_the_gradient(self, actor, name):
        data = make_batch(actor)
        mask = data["masks", "all_assistant_mask"]
        far = torch.zeros_like(mask)
        far[0, PROMPT_WIDTH] = True  # a response token with log-ratio 200: exp overflows
        reference = data.clone()
        reference["masks", "all_assistant_mask"] = mask & ~far
        data["log_probs", "full"] = torch.where(far, data["log_probs", "full"] - 200.0,
                                                data["log_probs", "full"])
        loss = make_llm_loss(name, actor, masking_strategy="rlhf", kl_mask_threshold=50.0,
                             entropy_bonus=False)
        out = loss(data)
        g = backward_grads(actor, lambda: total(out).backward())
        reference_out = loss(reference)
        g_reference = backward_grads(actor, lambda: total(reference_out).backward())
        torch.testing.assert_close(total(out), total(reference_out))
        for a, b in zip(g, g_reference):
            torch.testing.assert_close(a, b)

    def test_grpo_and_grpo_ch_are_torchrl(self, actor):
        data = make_batch(actor)
        pairs = [
            (make_llm_loss("grpo", actor, masking_strategy="rlhf"), GRPOLoss(actor, masking_strategy="rlhf")),
            (make_llm_loss("grpo-ch", actor, masking_strategy="rlhf"),
             DAPO(actor, masking_strategy="rlhf", clip_epsilon=(0.2, 0.28))),
        ]
        for ours, theirs in pairs:
            torch.manual_seed(0)
            a = ours(data)
            torch.manual_seed(0)
            b = theirs(data)
            assert type(a) is type(b)
            for key in ("loss_objective", "loss_entropy", "clip_fraction", "ESS"):
                torch.testing.assert_close(a.get(key), b.get(key))


# ------------------------------------------------------- registry, state, scheduler


class TestAPI:
    def test_registry(self):
        assert {name: type(make_llm_loss(name)) for name in LLM_LOSSES} == {
            "r2vpo": R2VPOLLMLoss, "grpo": GRPOLLMLoss, "grpo-ch": DAPOLLMLoss, "gppo": GPPOLLMLoss,
            "topr": TOPRLLMLoss, "spo": SPOLLMLoss, "cispo": CISPOLLMLoss,
            "grpo-decoupled": DecoupledGRPOLLMLoss, "grpo-tis": GRPOTISLLMLoss, "m2po": M2POLLMLoss}
        assert isinstance(make_llm_loss("GRPO_CH"), DAPOLLMLoss)
        assert isinstance(make_llm_loss("r2vpo", lagrange_multiplier=2.0), R2VPOLLMLoss)
        with pytest.raises(ValueError, match="Valid names: 'r2vpo', 'grpo', 'grpo-ch'"):
            make_llm_loss("ppo")
        with pytest.raises(TypeError):
            LLM_LOSSES["mine"] = GRPOLoss

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(lagrange_multiplier=-1.0), "lagrange_multiplier"),
            (dict(lagrange_multiplier=float("nan")), "lagrange_multiplier"),
            (dict(ratio_var_target=-0.1), "ratio_var_target"),
            (dict(kl_target=-0.1), "kl_target"),
            (dict(kl_target=0.01, ratio_var_target=0.02), "either"),
            (dict(variance_center="median"), "variance_center"),
            (dict(aggregation="sum"), "aggregation"),
            (dict(masking_strategy="prompt"), "masking_strategy"),
            (dict(diagnostic_clip_epsilon=1.5), "clip_epsilon"),
        ],
    )
    def test_bad_hyperparameters(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            R2VPOLLMLoss(**kwargs)

    def test_clip_epsilon_and_misspelt_arguments_are_refused(self):
        with pytest.raises(TypeError, match="diagnostic_clip_epsilon"):
            R2VPOLLMLoss(clip_epsilon=0.2)
        with pytest.raises(TypeError, match="R2VPOLLMLoss .* lagrange_multiplyer"):
            R2VPOLLMLoss(lagrange_multiplyer=5.0)
        with pytest.raises(TypeError, match="GPPOLLMLoss .* beta_hi"):
            GPPOLLMLoss(beta_hi=2.0)

    def test_negative_assignment_and_baseline_weights(self):
        loss = R2VPOLLMLoss()
        with pytest.raises(ValueError, match="lagrange_multiplier"):
            loss.lagrange_multiplier = -0.5
        with pytest.raises(ValueError, match="beta_low"):
            GPPOLLMLoss(beta_low=-1.0)
        with pytest.raises(ValueError, match="negative_weight"):
            TOPRLLMLoss(negative_weight=-1.0)

    def test_kl_target_sets_variance_target(self):
        torch.testing.assert_close(R2VPOLLMLoss(kl_target=0.03).ratio_var_target, torch.tensor(0.06))

    def test_state_dict_round_trip(self):
        loss = R2VPOLLMLoss(lagrange_multiplier=0.5, ratio_var_target=0.01)
        loss.lagrange_multiplier = 2.5  # in-place copy into the buffer
        state = loss.state_dict()
        assert {"lagrange_multiplier", "ratio_var_target"} <= set(state)
        assert "last_ratio_var" not in state
        other = R2VPOLLMLoss()
        other.load_state_dict(state)
        torch.testing.assert_close(other.lagrange_multiplier, torch.tensor(2.5))
        torch.testing.assert_close(other.ratio_var_target, torch.tensor(0.01))
        assert other.to(torch.float64).lagrange_multiplier.dtype == torch.float64
        loss.reset()
        torch.testing.assert_close(loss.lagrange_multiplier, torch.tensor(0.5))

    def test_scheduler_moves_lambda_the_right_way(self, actor):
        data = make_batch(actor)
        loss = R2VPOLLMLoss(actor, lagrange_multiplier=1.0, ratio_var_target=0.0,
                            masking_strategy="rlhf")
        scheduler = DualVariableScheduler(loss, lr=10.0)
        out = loss(data)
        assert isinstance(out, R2VPOLLMLossOutput)
        assert scheduler.step(out) > 1.0  # variance above target: lambda rises
        assert scheduler.step(out.ratio_var) > 1.0
        raised = float(loss.lagrange_multiplier)
        assert scheduler.step(merge_ratio_stats([out])) > raised
        assert scheduler.step() > raised  # reads loss.last_ratio_var
        loss.ratio_var_target = 10.0  # far below target: lambda falls, projected at 0
        before = float(loss.lagrange_multiplier)
        assert scheduler.step(out.to_tensordict()) < before
        for _ in range(100):
            scheduler.step(out.ratio_var)
        assert float(loss.lagrange_multiplier) == 0.0
        assert float(loss(data).lagrange_multiplier) == 0.0


# ------------------------------------------------------------------ stale data


def with_proximal(data, proximal):
    data = data.clone()
    data["proximal_log_probs", "full"] = torch.where(data["masks", "all_assistant_mask"], proximal, 0.0)
    return data


def token_mean(value, mask):
    return value[mask].sum() / mask.sum()


class TestStaleData:
    """The decoupled ratio (objectives.proximal) and the stale-data baselines."""

    @pytest.mark.parametrize("name, kwargs", [
        ("r2vpo", {}), ("r2vpo", {"weighted_variance": False}), ("grpo-decoupled", {}),
        ("grpo-tis", {})])
    def test_fresh_data_is_todays_loss(self, actor, name, kwargs):
        # pi_prox == pi_behaviour: values and gradients as without the proximal key, bit for bit
        data = make_batch(actor, staleness=0.3)
        fresh = with_proximal(data, data["log_probs", "full"])
        loss = make_llm_loss(name, actor, masking_strategy="rlhf", entropy_bonus=False, **kwargs)
        reference = make_llm_loss("r2vpo" if name == "r2vpo" else "grpo", actor,
                                  masking_strategy="rlhf", entropy_bonus=False)
        outs, gradients = [], []
        for module, batch in ((reference, data), (loss, fresh)):
            gradients.append(backward_grads(
                actor, lambda: outs.append(module(batch)) or total(outs[-1]).backward()))
        keys = ["loss_objective", "clip_fraction", "ESS"]
        if name == "r2vpo":
            keys += ["loss_ratio_var", "ratio_var", "mean_ratio"]
        for key in keys:
            assert torch.equal(outs[0].get(key), outs[1].get(key)), key
        assert all(torch.equal(a, b) for a, b in zip(*gradients))

    def test_first_step_penalty_has_no_gradient_whatever_the_behaviour(self, actor):
        data = make_batch(actor, staleness=0.5)  # behaviour far from the current policy
        mask = data["masks", "all_assistant_mask"]
        stale = with_proximal(data, current_log_probs(actor, data))  # pi_theta == pi_prox
        loss = LeafR2VPOLLMLoss(actor, masking_strategy="rlhf", entropy_bonus=False,
                                lagrange_multiplier=5.0, max_behaviour_weight=None)
        out = loss(stale)
        assert out.ratio_var.item() == 0.0
        (penalty_grad,) = torch.autograd.grad(out.loss_ratio_var, loss.leaf, retain_graph=True)
        assert torch.count_nonzero(penalty_grad) == 0
        # the objective's gradient is -w A / N per token: REINFORCE weighted by pi_prox / mu
        (objective_grad,) = torch.autograd.grad(out.loss_objective, loss.leaf)
        w = (stale["proximal_log_probs", "full"] - data["log_probs", "full"]).exp()
        expected = torch.where(mask, -w * data["advantage"].view(-1, 1) / mask.sum(), 0.0)
        torch.testing.assert_close(objective_grad, expected)
        # the behaviour-ratio form ignores the key: its penalty does pull
        literal = R2VPOLLMLoss(actor, masking_strategy="rlhf", entropy_bonus=False, ratio="behaviour")
        assert literal(stale).ratio_var.item() > 0
        assert torch.equal(literal(stale).loss_objective, literal(data).loss_objective)

    @pytest.mark.parametrize("bound", [1.0, 1.5, None])
    def test_truncation_bounds_the_behaviour_weight(self, actor, bound):
        data = make_batch(actor, staleness=0.8)
        mask = data["masks", "all_assistant_mask"]
        proximal = current_log_probs(actor, data)
        loss = R2VPOLLMLoss(actor, masking_strategy="rlhf", entropy_bonus=False,
                            max_behaviour_weight=bound)
        out = loss(with_proximal(data, proximal))
        w = (proximal - data["log_probs", "full"]).exp()
        if bound is not None:
            assert (w[mask] > bound).any()  # the bound bites
            w = w.clamp_max(bound)
        # r == 1 at the first step: the objective is -mean(min(w, c) A)
        expected = token_mean(-w * data["advantage"].view(-1, 1), mask)
        torch.testing.assert_close(out.loss_objective, expected)

    def test_weighted_variance_is_the_self_normalised_one_and_its_gradient(self, actor):
        data = make_batch(actor, staleness=0.8)
        mask = data["masks", "all_assistant_mask"]
        current = current_log_probs(actor, data)
        proximal = (current + data["log_probs", "full"]) / 2  # r != 1 and w != 1
        lam = 2.0
        loss = LeafR2VPOLLMLoss(actor, masking_strategy="rlhf", entropy_bonus=False,
                                lagrange_multiplier=lam, weighted_variance=True)
        out = loss(with_proximal(data, proximal))
        r = (current - proximal).exp()
        w = (proximal - data["log_probs", "full"]).exp().clamp_max(2.0)
        assert (w[mask] < 0.5).any() and (w[mask] == 2.0).any()  # the weights matter
        w_sum = w[mask].sum()
        mean = (w * r)[mask].sum() / w_sum
        var = (w * (r - mean) ** 2)[mask].sum() / w_sum
        torch.testing.assert_close(out.ratio_var, var)
        torch.testing.assert_close(out.loss_ratio_var, lam * var)
        torch.testing.assert_close(out.ratio_weight_sum.float(), w_sum)
        assert out.num_tokens == mask.sum()
        # d penalty / d log pi_t = 2 lambda w_t (r_t - rbar_w) r_t / sum w (the centre detached)
        (grad,) = torch.autograd.grad(out.loss_ratio_var, loss.leaf)
        expected = torch.where(mask, 2 * lam * w * (r - mean) * r / w_sum, 0.0)
        torch.testing.assert_close(grad, expected)
        unweighted = R2VPOLLMLoss(actor, masking_strategy="rlhf", entropy_bonus=False,
                                  lagrange_multiplier=lam, weighted_variance=False)(
            with_proximal(data, proximal))
        torch.testing.assert_close(unweighted.loss_objective, out.loss_objective)
        assert not torch.isclose(unweighted.ratio_var, out.ratio_var)

    def test_weighted_variance_accumulates_exactly(self, actor):
        data = make_batch(actor, staleness=0.8)
        proximal = (current_log_probs(actor, data) + data["log_probs", "full"]) / 2
        data = with_proximal(data, proximal)
        loss = R2VPOLLMLoss(actor, masking_strategy="rlhf", entropy_bonus=False,
                            lagrange_multiplier=2.0, weighted_variance=True)
        full_out = loss(data)
        g_full = backward_grads(actor, lambda: total(full_out).backward())
        with torch.no_grad():
            merged = merge_ratio_stats([loss(data[part]) for part in SPLITS])
        torch.testing.assert_close(merged["ratio_var"].float(), full_out.ratio_var)
        assert merged["num_tokens"] == full_out.num_tokens
        weight_sum = loss.count_weight(data)
        torch.testing.assert_close(weight_sum, full_out.ratio_weight_sum.float())
        actor.zero_grad()
        outs = accumulate(loss, data, num_tokens=loss.count_tokens(data),
                          ratio_mean=merged["ratio_mean"], ratio_weight_sum=weight_sum)
        torch.testing.assert_close(sum(o.loss_ratio_var for o in outs), full_out.loss_ratio_var)
        for a, b in zip(grads(actor), g_full):
            torch.testing.assert_close(a, b)
        with pytest.raises(ValueError, match="needs ratio_weight_sum"):
            with loss.accumulation(num_tokens=loss.count_tokens(data)):
                loss(data)

    def test_decoupled_grpo_masks_heavy_weights_and_clips_the_step(self, actor):
        data = make_batch(actor, staleness=0.8)
        mask = data["masks", "all_assistant_mask"]
        # the proximal policy half-way between the behaviour and the current one
        current = current_log_probs(actor, data)
        proximal = (current + data["log_probs", "full"]) / 2
        loss = make_llm_loss("grpo-decoupled", actor, masking_strategy="rlhf", entropy_bonus=False,
                             max_behaviour_weight=1.5)
        out = loss(with_proximal(data, proximal))
        w = (proximal - data["log_probs", "full"]).exp()
        w = torch.where(w > 1.5, 0.0, w)  # AReaL drops the token
        r = (current - proximal).exp()
        advantage = data["advantage"].view(-1, 1)
        per_token = -w * torch.minimum(r * advantage, r.clamp(0.8, 1.2) * advantage)
        torch.testing.assert_close(out.loss_objective, token_mean(per_token, mask))

    def test_bad_arguments_name_themselves(self, actor):
        with pytest.raises(ValueError, match="ratio must be one of"):
            R2VPOLLMLoss(actor, ratio="prox")
        with pytest.raises(ValueError, match="max_behaviour_weight must be None .* >= 1, got 0.5"):
            R2VPOLLMLoss(actor, max_behaviour_weight=0.5)
        with pytest.raises(ValueError, match="behaviour_weight_mode must be one of"):
            make_llm_loss("grpo-decoupled", actor, behaviour_weight_mode="clip")
        with pytest.raises(ValueError, match="m2_threshold must be > 0"):
            make_llm_loss("m2po", actor, m2_threshold=0.0)
        data = make_batch(actor)
        data["proximal_log_probs", "full"] = torch.zeros(6, 3)
        with pytest.raises(ValueError, match="proximal log-probabilities .* have shape"):
            R2VPOLLMLoss(actor, masking_strategy="rlhf")(data)

    def test_bad_proximal_inputs_are_refused(self, actor):
        data = make_batch(actor)
        mask = data["masks", "all_assistant_mask"]
        proximal = current_log_probs(actor, data)
        loss = make_llm_loss("grpo-decoupled", actor, masking_strategy="rlhf")
        broken = with_proximal(data, proximal)
        broken["proximal_log_probs", "full"][mask.nonzero()[0].tolist()] = float("nan")
        with pytest.raises(ValueError, match="proximal log-probabilities .* hold NaN or inf"):
            loss(broken)
        flat = with_proximal(data, proximal)  # an advantage per sequence as [N]: refused, not broadcast
        flat["advantage"] = data["advantage"].view(-1)
        with pytest.raises(ValueError, match="dimensions"):
            loss(flat)

    def test_the_proximal_key_routes_through_set_keys(self, actor):
        data = make_batch(actor, staleness=0.5)
        proximal = current_log_probs(actor, data)
        moved = data.clone()
        moved["prox"] = torch.where(data["masks", "all_assistant_mask"], proximal, 0.0)
        loss = R2VPOLLMLoss(actor, masking_strategy="rlhf", entropy_bonus=False)
        expected = loss(with_proximal(data, proximal)).loss_objective
        loss.set_keys(proximal_log_prob="prox")
        assert torch.equal(loss(moved).loss_objective, expected)

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.floats(-3, 3), min_size=1, max_size=40), st.floats(0.001, 1.0))
    def test_m2po_mask_meets_its_threshold_minimally(self, log_ratios, threshold):
        from torchrl_r2vpo.objectives.llm.baselines import second_moment_mask

        log_ratio = torch.tensor(log_ratios, dtype=torch.float64)
        # every third token invalid, in batches large enough to keep some
        mask = (torch.arange(len(log_ratios)) % 3 != 0) | (len(log_ratios) < 3)
        kept = second_moment_mask(log_ratio, mask, threshold)
        assert not (kept & ~mask).any()
        if not mask.any():
            return
        m2 = log_ratio.pow(2)
        # under the threshold, or down to the single smallest token
        assert m2[kept].mean() <= threshold + 1e-12 or kept.sum() == 1
        dropped = mask & ~kept
        if dropped.any():  # the largest were dropped, and one fewer would not do
            assert m2[dropped].min() >= m2[kept].max()
            back = kept.clone()  # one dropped token back: the mean is over the threshold
            back[(dropped & (m2 == m2[dropped].min())).nonzero()[0]] = True
            assert m2[back].mean() > threshold

    def test_m2po_trains_unclipped_on_the_kept_tokens(self, actor):
        data = make_batch(actor, staleness=0.6)
        ratio, mask = ratio_and_mask(data, actor)
        loss = make_llm_loss("m2po", actor, masking_strategy="rlhf", entropy_bonus=False)
        out = loss(data)
        from torchrl_r2vpo.objectives.llm.baselines import second_moment_mask

        kept = second_moment_mask(ratio.log(), mask, 0.04)
        assert 0 < kept.sum() < mask.sum()
        torch.testing.assert_close(out.loss_objective,
                                   token_mean(-ratio * data["advantage"].view(-1, 1), kept))
        torch.testing.assert_close(out.clip_fraction, (mask & ~kept).sum() / mask.sum())
        with pytest.raises(ValueError, match="not exact with M2POLLMLoss"):
            loss.accumulation(10)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=4), st.integers(0, 1000))
def test_staleness_statistics_are_exact_across_chunks(sizes, seed):
    from torchrl_r2vpo.data import merge_staleness_sums, staleness_sums, staleness_table

    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    ratio = torch.exp(0.3 * torch.randn(n, 5, generator=gen))
    weight = torch.exp(0.5 * torch.randn(n, 5, generator=gen))
    mask = torch.rand(n, 5, generator=gen) < 0.7
    age = torch.randint(0, 3, (n,), generator=gen)
    whole = staleness_table(staleness_sums(ratio, age, mask, weight))
    parts = [staleness_sums(*(t.split(sizes)[i] for t in (ratio, age, mask, weight)))
             for i in range(len(sizes))]
    merged = staleness_table(merge_staleness_sums(parts))
    assert merged.keys() == whole.keys()
    for k, row in whole.items():
        selected = mask & (age == k)[:, None]
        r, w = ratio[selected].double(), weight[selected].double()
        assert row["tokens"] == selected.sum() and row["weight_max"] == pytest.approx(w.max().item())
        assert row["ratio_var"] == pytest.approx(r.var(correction=0).item(), abs=1e-12)
        assert row["weight_ESS"] == pytest.approx((w.sum() ** 2 / (len(w) * w.pow(2).sum())).item())
        assert row["clip_fraction"] == pytest.approx(((r - 1).abs() > 0.2).double().mean().item())
        for field, value in row.items():
            assert merged[k][field] == pytest.approx(value, rel=1e-12, abs=1e-15), field
