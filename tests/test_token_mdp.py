"""Token-generation MDP, whole-completion rollouts and their agreement."""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs, step_mdp
from torchrl.modules.llm import TransformersWrapper
from torchrl.objectives.llm import GRPOLoss

from torchrl_r2vpo.collectors import collect_batch, stop_token_ids, TransformersBackend
from torchrl_r2vpo.data import group_advantages, STALENESS_FIELDS, staleness_stats
from torchrl_r2vpo.envs import next_token_actor, sequences_from_rollout, TokenGenerationEnv
from torchrl_r2vpo.math_task import (
    build_math_lm,
    build_math_tokenizer,
    format_prompt,
    generate_problems,
    load_math_lm,
    math_reward,
    score_batch,
)

MAX_NEW = 6


@pytest.fixture(scope="module")
def tokenizer():
    return build_math_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return build_math_lm(tokenizer, hidden_size=32).eval()


def make_env(tokenizer, n=12, num_prompts=3, group_size=2, **kwargs):
    problems = generate_problems(n, difficulty=(1, 2, 3), seed=0)
    return TokenGenerationEnv([format_prompt(p.question) for p in problems],
                              [p.answer for p in problems], tokenizer, num_prompts=num_prompts,
                              group_size=group_size, max_new_tokens=MAX_NEW, **kwargs)


def force(env, tokens: list[str]):
    """Steps every sequence of a fresh batch through the same tokens; returns the last state."""
    td = env.reset()
    for token in tokens:
        td["action"] = torch.full(env.batch_size, env.tokenizer.convert_tokens_to_ids(token))
        td = env.step(td)["next"]
    return td


def test_specs_and_random_rollout(tokenizer):
    env = make_env(tokenizer)
    check_env_specs(env, seed=0)
    rollout = env.rollout(MAX_NEW, break_when_any_done=False, break_when_all_done=True)
    assert rollout.batch_size[0] == 6 and rollout.batch_size[1] <= MAX_NEW
    assert rollout[:, -1]["next", "done"].all()


def test_groups_repeat_prompts(tokenizer):
    td = make_env(tokenizer, num_prompts=3, group_size=4).reset()
    tokens = td["tokens"].view(3, 4, -1)
    assert (tokens == tokens[:, :1]).all() and not (tokens[0, 0] == tokens[1, 0]).all()
    assert td["group"].view(-1).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    width = td["tokens"].shape[-1] - MAX_NEW
    assert (td["attention_mask"][:, :width].sum(-1, keepdim=True) == td["prompt_length"]).all()
    assert not td["attention_mask"][:, width:].any()


def test_reward_only_at_the_end(tokenizer):
    env = make_env(tokenizer, group_size=1)
    td = env.reset()
    answers = [env.answers[i] for i in td["problem_index"].view(-1).tolist()]
    for step in range(MAX_NEW):
        # row 0 writes the right answer then EOS; the others repeat "7" until truncated
        answer = answers[0] + "<eos>"
        token = answer[step] if step < len(answers[0]) else "<eos>"
        action = torch.full(env.batch_size, tokenizer.convert_tokens_to_ids("7"))
        if step <= len(answers[0]):
            action[0] = tokenizer.convert_tokens_to_ids(token)
        td["action"] = action
        td = env.step(td)["next"]
        if step < len(answers[0]):
            assert (td["reward"] == 0).all() and not td["done"].any()
        if step == len(answers[0]):
            assert td["terminated"][0] and td["reward"][0] == 1.0
            break
    assert td["generated"][0].item() == len(answers[0]) + 1  # EOS is part of the completion


def test_truncation_and_finished_rows_ignore_actions(tokenizer):
    env = make_env(tokenizer, group_size=1)
    td = force(env, ["1", "<eos>"])
    frozen = td["tokens"].clone()
    td["action"] = torch.full(env.batch_size, tokenizer.convert_tokens_to_ids("9"))
    after = env.step(td)["next"]
    assert (after["tokens"] == frozen).all() and after["reward"].eq(0).all()
    td = force(env, ["1"] * MAX_NEW)
    assert td["truncated"].all() and not td["terminated"].any()


def test_prompt_order_state_dict_round_trip(tokenizer):
    env = make_env(tokenizer, n=10, num_prompts=4, group_size=1)
    env.reset()
    state = env.state_dict()
    expected = [env.reset()["problem_index"].view(-1).tolist() for _ in range(4)]
    other = make_env(tokenizer, n=10, num_prompts=4, group_size=1, seed=123)
    other.load_state_dict(state)
    assert [other.reset()["problem_index"].view(-1).tolist() for _ in range(4)] == expected
    fresh = make_env(tokenizer, n=10, num_prompts=4, group_size=1)
    seen = sum((fresh.reset()["problem_index"].view(-1).tolist() for _ in range(3)), [])
    assert sorted(seen[:10]) == list(range(10)) and seen[:10] != list(range(10))  # one shuffled pass


def test_bad_arguments(tokenizer):
    # a partial reset would give a group's rows different prompts
    env = make_env(tokenizer)
    partial = env.reset()
    partial["_reset"] = torch.arange(6).eq(0).unsqueeze(-1)
    with pytest.raises(NotImplementedError, match="whole batch"):
        env.reset(partial)
    with pytest.raises(ValueError, match="as many answers"):
        TokenGenerationEnv(["a"], [], tokenizer, num_prompts=1)
    with pytest.raises(ValueError, match="max_prompt_length=2"):
        TokenGenerationEnv(["What is 1 + 1?"], ["2"], tokenizer, num_prompts=1, max_prompt_length=2)
    with pytest.raises(ValueError, match=">= 1"):
        TokenGenerationEnv(["1+1"], ["2"], tokenizer, num_prompts=1, group_size=0)


@pytest.mark.parametrize("returned, name", [(None, "NoneType"), ("1.0", "str"), ([1.0], "list")])
def test_a_reward_fn_that_returns_no_number_is_named(tokenizer, returned, name):
    env = make_env(tokenizer, reward_fn=lambda text, answer: returned)
    with pytest.raises(TypeError, match=f"reward_fn must return a number .* returned {name} "):
        force(env, ["<eos>"])  # every completion ends: the environment scores them
    response = torch.full((2, MAX_NEW), tokenizer.eos_token_id)
    with pytest.raises(TypeError, match=f"reward_fn .* returned {name} "):
        env.score(response, torch.tensor([0, 1]))  # the whole-completion rollouts' path
    # numbers of any type are read as floats
    env = make_env(tokenizer, reward_fn=lambda text, answer: torch.tensor(1))
    assert force(env, ["<eos>"])["reward"].eq(1.0).all()


@pytest.fixture(scope="module")
def shipped():
    return load_math_lm()[0]  # warm-started: its completions end at different steps


def test_token_by_token_and_fast_path_agree(tokenizer, shipped):
    model = shipped
    env = make_env(tokenizer, n=48, num_prompts=8, group_size=4)
    torch.manual_seed(1)
    fast = collect_batch(env, TransformersBackend(model, tokenizer, max_new_tokens=MAX_NEW))
    lengths = fast["masks", "all_assistant_mask"][:, env.max_prompt_length:].sum(-1)
    # rows that end early, with rewards, are what a misalignment would show on
    assert len(set(lengths.tolist())) > 1 and fast["next", "reward"].sum() > 0
    # replay the fast path's tokens through the MDP: the actor's log-probs of those tokens
    env.load_state_dict({k: torch.zeros_like(v) for k, v in env.state_dict().items()})
    actor = next_token_actor(model, env)
    width = env.max_prompt_length
    response = fast["tokens", "response"]
    td, steps = env.reset(), []
    assert (td["tokens"][:, :width] == fast["tokens", "prompt"]).all()
    for t in range(MAX_NEW):
        with torch.no_grad():
            dist = actor.get_dist(td)
        td["action"] = response[:, t]
        td["action_log_prob"] = dist.log_prob(response[:, t])
        td = env.step(td)
        steps.append(td.clone())
        td = step_mdp(td)
        if td["done"].all():
            break
    slow = sequences_from_rollout(torch.stack(steps, 1), env)
    assert set(slow.keys(True, True)) == set(fast.keys(True, True))
    for key in slow.keys(True, True):
        assert slow[key].shape == fast[key].shape and slow[key].dtype == fast[key].dtype, key
        if key != ("log_probs", "full"):
            assert (slow[key] == fast[key]).all(), key
    torch.testing.assert_close(slow["log_probs", "full"], fast["log_probs", "full"], atol=1e-5, rtol=0)


def test_a_rollout_gives_each_row_the_reward_it_ended_with(tokenizer, shipped):
    env = make_env(tokenizer, n=48, num_prompts=8, group_size=4)
    actor = next_token_actor(shipped, env)
    torch.manual_seed(2)
    with torch.no_grad():
        rollout = env.rollout(MAX_NEW, actor, break_when_any_done=False, break_when_all_done=True)
    seq = sequences_from_rollout(rollout, env)
    expected = env.score(seq["tokens", "response"], seq["problem_index"])
    assert (seq["next", "reward"] == expected).all() and expected.sum() > 0
    ended = rollout["next", "done"].squeeze(-1).sum(-1)
    assert ended.max() > 1  # finished rows were stepped again (TorchRL repeats them): not counted
    with torch.no_grad():  # TorchRL's default stops at the first completion that ends
        early = env.rollout(MAX_NEW, actor)
    assert not early["next", "done"][:, -1].all()
    with pytest.raises(ValueError, match="have not ended at the last step"):
        sequences_from_rollout(early, env)


def test_model_generation_config_does_not_change_what_is_sampled(tokenizer, model):
    # a hub model's generation config may set a repetition penalty, top-k, ...: sampling must
    # still follow the tempered softmax whose log-probabilities are recorded
    configured = copy.deepcopy(model)
    config = configured.generation_config
    config.repetition_penalty, config.no_repeat_ngram_size, config.top_k = 5.0, 1, 2
    batches = []
    for m in (model, configured):
        torch.manual_seed(3)
        batches.append(collect_batch(make_env(tokenizer),
                                     TransformersBackend(m, tokenizer, max_new_tokens=MAX_NEW)))
    assert (batches[0]["tokens", "response"] == batches[1]["tokens", "response"]).all()
    assert configured.generation_config is config and config.top_k == 2  # left as it was


def test_every_eos_id_of_the_generation_config_ends_a_completion(tokenizer, model):
    # chat models list several EOS ids (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>); vLLM
    # stops on each, so the transformers backend, the mask and the MDP must too
    torch.manual_seed(5)
    plain = collect_batch(make_env(tokenizer), TransformersBackend(model, tokenizer, max_new_tokens=MAX_NEW))
    response = plain["tokens", "response"]
    extra = int(response[0, 0])  # a token the model samples: now also a stop token
    assert extra != tokenizer.eos_token_id
    chat = copy.deepcopy(model)
    chat.generation_config.eos_token_id = [tokenizer.eos_token_id, extra]
    assert stop_token_ids(chat, tokenizer) == [tokenizer.eos_token_id, extra]
    torch.manual_seed(5)  # the same draws: each completion is the plain one cut at its first stop
    cut = collect_batch(make_env(tokenizer), TransformersBackend(chat, tokenizer, max_new_tokens=MAX_NEW))
    stop = (response == extra) | (response == tokenizer.eos_token_id)
    expected = (stop.long().cumsum(-1) - stop.long()) == 0
    width = cut["tokens", "prompt"].shape[-1]
    mask = cut["masks", "all_assistant_mask"][:, width:]
    assert mask.eq(expected).all() and not mask[0, 1:].any()
    assert (cut["tokens", "response"][mask] == response[mask]).all()
    assert (cut["tokens", "response"][~mask] == tokenizer.pad_token_id).all()
    torch.testing.assert_close(cut["log_probs", "full"][:, width:][mask],
                               plain["log_probs", "full"][:, width:][mask])
    # the token MDP terminates on it too when told
    env = make_env(tokenizer, stop_token_ids=stop_token_ids(chat, tokenizer))
    td = force(env, [tokenizer.convert_ids_to_tokens(extra)])
    assert td["terminated"].all() and not td["truncated"].any()
    assert not force(make_env(tokenizer), [tokenizer.convert_ids_to_tokens(extra)])["done"].any()


def test_actor_rollout_gives_the_sequence_layout(tokenizer, model):
    env = make_env(tokenizer)
    rollout = env.rollout(MAX_NEW, next_token_actor(model, env), break_when_any_done=False,
                          break_when_all_done=True)
    seq = sequences_from_rollout(rollout, env)
    width = env.max_prompt_length
    mask = seq["masks", "all_assistant_mask"][:, width:]
    # the mask covers the completion up to and including its EOS, nothing after
    eos = seq["tokens", "response"] == tokenizer.eos_token_id
    assert ((eos.cumsum(-1) - eos.long()) == 0).eq(mask).all()
    assert (seq["log_probs", "full"][:, width:][mask] < 0).all()
    assert (seq["log_probs", "full"][:, width:][~mask] == 0).all()


@pytest.mark.parametrize("strategy", ["sft", "rlhf"])
def test_grpo_loss_reads_the_layout_on_policy(tokenizer, model, strategy):
    env = make_env(tokenizer)
    batch = collect_batch(env, TransformersBackend(model, tokenizer, max_new_tokens=MAX_NEW))
    batch["advantage"] = group_advantages(batch["next", "reward"] + torch.rand(6, 1), 2)
    scorer = TransformersWrapper(model, tokenizer=tokenizer, input_mode="tokens", generate=False,
                                 return_log_probs=True, pad_output=True)
    loss = GRPOLoss(scorer, masking_strategy=strategy, entropy_bonus=False)
    log_weight, _, _, mask = loss._log_weight(batch.copy(), adv_shape=batch["advantage"].shape[1:])
    assert (mask.squeeze(-1) == batch["masks", "all_assistant_mask"]).all()
    assert log_weight.abs().max() < 1e-5  # the behaviour log-probs are the loss's own


def test_group_advantages():
    reward = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    adv = group_advantages(reward, 3)
    assert adv.shape == (6, 1, 1)
    grouped = adv.view(2, 3)
    torch.testing.assert_close(grouped.mean(-1), torch.zeros(2))
    torch.testing.assert_close(grouped[0].std(correction=0), torch.tensor(1.0))
    assert (group_advantages(torch.ones(4), 2) == 0).all()


def test_staleness_stats_respects_the_mask():
    ratio = torch.tensor([[1.0, 9.0], [0.5, 1.5]])
    mask = torch.tensor([[True, False], [True, True]])
    stats = staleness_stats(ratio, torch.tensor([0, 2]), mask)
    assert stats["stale0/ratio_var"] == 0.0 and stats["stale0/ESS"] == 1.0
    assert stats["stale2/ratio_mean"] == 1.0 and stats["stale2/ratio_var"] == 0.25
    assert stats["stale2/tokens"] == 2 and stats["stale2/weight_mean"] == 1.0  # no weights: w = 1
    assert set(stats) == {f"stale{k}/{s}" for k in (0, 2) for s in STALENESS_FIELDS}


def test_sequence_batch_keys_are_what_torchrl_llm_losses_read(tokenizer, model):
    batch = collect_batch(make_env(tokenizer), TransformersBackend(model, tokenizer, max_new_tokens=MAX_NEW))
    assert isinstance(batch, TensorDict)
    for key in (("tokens", "full"), ("masks", "all_attention_mask"), ("masks", "all_assistant_mask"),
                ("log_probs", "full")):
        assert batch[key].shape == batch["tokens", "full"].shape
    assert batch["policy_version"].eq(0).all() and batch["next", "done"].all()


def test_math_reward_scores_a_batch_at_once(tokenizer, monkeypatch):
    import torchrl_r2vpo.envs.token_mdp as token_mdp

    calls = []

    def counted(texts, answers, **kwargs):
        calls.append(len(texts))
        return score_batch(texts, answers, **kwargs)

    monkeypatch.setattr(token_mdp, "score_batch", counted)
    env = make_env(tokenizer)
    texts = [f"{env.answers[0]}", f"{env.answers[1]}1", "", f"{env.answers[3]}"]
    width = max(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts) + 1
    response = torch.full((len(texts), width), tokenizer.eos_token_id)
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text, add_special_tokens=False)
        response[row, :len(ids)] = torch.tensor(ids)
    rewards = env.score(response, torch.arange(len(texts)))
    assert calls == [len(texts)]
    expected = [math_reward(text, env.answers[i]) for i, text in enumerate(texts)]
    assert rewards.view(-1).tolist() == expected and expected[0] == 1.0 and expected[1] == 0.0
