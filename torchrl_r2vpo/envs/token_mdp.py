"""Token generation as an MDP: one environment step appends one token to a completion.

The state is a fixed-width token buffer per sequence: the prompt, left-padded to
``max_prompt_length``, followed by ``max_new_tokens`` slots that fill one per step. The
action is the next token (categorical over the vocabulary); the reward is 0 until the
sequence ends (EOS or ``max_new_tokens``), then the verifier's score of the decoded
completion. Each batch holds ``num_prompts`` prompts repeated ``group_size`` times in a
row, so group-relative advantages can be taken over the repeats of one prompt.

Any TorchRL policy rolls it out token by token (:func:`next_token_actor` wraps a causal
language model); :mod:`torchrl_r2vpo.collectors.llm` generates whole completions
in one call and writes the same sequence layout (:mod:`torchrl_r2vpo.data.llm`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import InteractionType, TensorDictModule
from torch import nn
from torchrl.data import Binary, Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase
from torchrl.modules import ProbabilisticActor

from torchrl_r2vpo.data.llm import sequence_batch
from torchrl_r2vpo.math_task.reward import math_reward, math_verify_reward, score_batch

__all__ = ["TokenGenerationEnv", "next_token_actor", "sequences_from_rollout"]


class TokenGenerationEnv(EnvBase):
    """Batched token-by-token generation of completions to prompts, scored at the end.

    Observation: ``"tokens"`` ``[N, L]`` (prompt left-padded to ``max_prompt_length``,
    then the completion so far, then padding), ``"attention_mask"`` ``[N, L]``,
    ``"prompt_length"`` and ``"generated"`` ``[N, 1]`` (valid prompt tokens and tokens
    generated so far), ``"group"`` ``[N, 1]`` (index of the prompt in the batch) and
    ``"problem_index"`` ``[N, 1]`` (index into ``prompts``). Action: ``"action"``, one
    token id per sequence. ``N = num_prompts * group_size``; ``L = max_prompt_length +
    max_new_tokens``. A sequence terminates on a stop token (the tokenizer's EOS, or
    ``stop_token_ids``) and is truncated after
    ``max_new_tokens``; it then receives ``reward_fn(completion_text, answer)``. A finished
    sequence ignores further actions, so ``rollout(..., break_when_all_done=True)`` runs
    the batch until every completion has ended.

    Prompts are drawn without replacement in a seeded random order, reshuffled after
    each pass; the position in that order is part of ``state_dict()``, so a restored
    environment continues with the same prompts.

    Args:
        prompts: the prompt texts (already formatted for the model).
        answers: the reference answer of each prompt, passed to ``reward_fn``.
        tokenizer: a Hugging Face tokenizer with ``pad_token_id`` and ``eos_token_id``.
        num_prompts: distinct prompts per batch.
        group_size: repeats of each prompt (the group for group-relative advantages).
        max_new_tokens: completion length limit.
        max_prompt_length: prompt buffer width; defaults to the longest prompt. Longer
            prompts raise.
        reward_fn: ``(completion_text, answer) -> float``, called once per completion;
            a value that is not a real number (``None``, a string, ...) raises a
            ``TypeError``.
        vocab_size: size of the action space; defaults to ``len(tokenizer)`` (pass the
            model's vocabulary size when its embedding is padded).
        seed: seed of the prompt order.
        stop_token_ids: the ids that end a completion; the tokenizer's EOS by default.
            Pass :func:`~torchrl_r2vpo.collectors.stop_token_ids` of a model whose
            generation config lists several EOS ids (chat models).

    Examples:
        >>> from torchrl_r2vpo.math_task import build_math_tokenizer
        >>> tokenizer = build_math_tokenizer()
        >>> env = TokenGenerationEnv(["1 + 1 = "], ["2"], tokenizer, num_prompts=1, group_size=2,
        ...                          max_new_tokens=3)
        >>> td = env.reset()
        >>> td["tokens"].shape, env.action_spec.n
        (torch.Size([2, 11]), 100)
        >>> for token in ("2", "<eos>"):
        ...     td["action"] = torch.full((2,), tokenizer.convert_tokens_to_ids(token))
        ...     td = env.step(td)["next"]
        >>> td["done"].squeeze(-1).tolist(), td["reward"].squeeze(-1).tolist()
        ([True, True], [1.0, 1.0])
    """

    def __init__(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        tokenizer,
        *,
        num_prompts: int,
        group_size: int = 1,
        max_new_tokens: int = 16,
        max_prompt_length: int | None = None,
        reward_fn: Callable[[str, str], float] = math_reward,
        vocab_size: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ):
        if len(prompts) != len(answers) or not prompts:
            raise ValueError(f"need as many answers as prompts (>0), got {len(prompts)} "
                             f"prompts and {len(answers)} answers")
        if min(num_prompts, group_size, max_new_tokens) < 1:
            raise ValueError(f"num_prompts, group_size and max_new_tokens must be >= 1, got "
                             f"{num_prompts}, {group_size}, {max_new_tokens}")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad token and an EOS token")
        if stop_token_ids is not None and not len(stop_token_ids):
            raise ValueError("stop_token_ids must name at least one token")
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        longest = max(len(ids) for ids in encoded)
        width = longest if max_prompt_length is None else max_prompt_length
        if longest > width or min(len(ids) for ids in encoded) == 0:
            raise ValueError(f"prompts must have 1 to max_prompt_length={width} tokens; the "
                             f"longest has {longest}")
        self.prompt_tokens = torch.full((len(prompts), width), tokenizer.pad_token_id)
        for i, ids in enumerate(encoded):
            self.prompt_tokens[i, width - len(ids):] = torch.tensor(ids)
        self.prompt_lengths = torch.tensor([len(ids) for ids in encoded])
        self.answers = list(answers)
        self.tokenizer, self.reward_fn = tokenizer, reward_fn
        self.num_prompts, self.group_size = num_prompts, group_size
        self.max_prompt_length, self.max_new_tokens = width, max_new_tokens
        self.pad_token_id, self.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.stop_token_ids = torch.tensor(
            [tokenizer.eos_token_id] if stop_token_ids is None else list(stop_token_ids))
        self.vocab_size = len(tokenizer) if vocab_size is None else vocab_size
        super().__init__(batch_size=torch.Size([num_prompts * group_size]), device=device)
        # the prompt order: the position in a seeded permutation per pass (state_dict-able)
        self.register_buffer("prompt_seed", torch.tensor(seed))
        self.register_buffer("prompt_pass", torch.tensor(0))
        self.register_buffer("prompt_cursor", torch.tensor(0))
        self._make_specs()

    def _make_specs(self) -> None:
        n, width = self.batch_size[0], self.max_prompt_length + self.max_new_tokens
        count = dict(shape=(n, 1), dtype=torch.long, device=self.device)
        self.observation_spec = Composite(
            tokens=Bounded(0, self.vocab_size - 1, shape=(n, width), dtype=torch.long,
                           device=self.device),
            attention_mask=Binary(shape=(n, width), dtype=torch.bool, device=self.device),
            prompt_length=Unbounded(**count), generated=Unbounded(**count),
            group=Unbounded(**count), problem_index=Unbounded(**count),
            shape=self.batch_size, device=self.device)
        self.action_spec = Categorical(self.vocab_size, shape=(n,), device=self.device)
        self.reward_spec = Unbounded(shape=(n, 1), device=self.device)
        flag = dict(shape=(n, 1), dtype=torch.bool, device=self.device)
        self.done_spec = Composite(done=Categorical(2, **flag), terminated=Categorical(2, **flag),
                                   truncated=Categorical(2, **flag), shape=self.batch_size,
                                   device=self.device)

    def _set_seed(self, seed: int | None) -> None:
        self.prompt_seed = torch.tensor(0 if seed is None else seed)
        self.prompt_pass, self.prompt_cursor = torch.tensor(0), torch.tensor(0)

    def _next_problems(self) -> torch.Tensor:
        taken, need = [], self.num_prompts
        while need:
            generator = torch.Generator().manual_seed(
                int(self.prompt_seed) * 1_000_003 + int(self.prompt_pass))
            order = torch.randperm(len(self.answers), generator=generator)
            cursor = int(self.prompt_cursor)
            taken.append(order[cursor:cursor + need])
            need -= len(taken[-1])
            # new tensors, not in-place updates: a state_dict taken earlier stays as it was
            if cursor + len(taken[-1]) == len(order):
                self.prompt_pass, self.prompt_cursor = self.prompt_pass + 1, torch.tensor(0)
            else:
                self.prompt_cursor = self.prompt_cursor + len(taken[-1])
        return torch.cat(taken)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        if tensordict is not None and "_reset" in tensordict.keys() and not tensordict["_reset"].all():
            raise NotImplementedError(
                "TokenGenerationEnv resets the whole batch (the completions of a group must "
                "answer the same prompt), not some rows: roll it out until every row is done, "
                "e.g. env.rollout(env.max_new_tokens, policy, break_when_any_done=False, "
                "break_when_all_done=True), or use collect_batch.")
        index = self._next_problems().repeat_interleave(self.group_size)
        n, slots = self.batch_size[0], self.max_new_tokens
        tokens = torch.cat([self.prompt_tokens[index],
                            torch.full((n, slots), self.pad_token_id)], dim=-1)
        mask = tokens != self.pad_token_id
        mask[:, :self.max_prompt_length] = (
            torch.arange(self.max_prompt_length)
            >= self.max_prompt_length - self.prompt_lengths[index, None])
        group = torch.arange(self.num_prompts).repeat_interleave(self.group_size)
        return TensorDict(
            tokens=tokens, attention_mask=mask,
            prompt_length=self.prompt_lengths[index, None], generated=torch.zeros(n, 1).long(),
            group=group[:, None], problem_index=index[:, None],
            done=torch.zeros(n, 1, dtype=torch.bool), terminated=torch.zeros(n, 1, dtype=torch.bool),
            truncated=torch.zeros(n, 1, dtype=torch.bool),
            batch_size=self.batch_size, device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        # rows already finished (or left out by a partial step) keep their state
        active = ~tensordict.get("done", torch.zeros(self.batch_size[0], 1, dtype=torch.bool))
        if "_step" in tensordict.keys():
            active = active & tensordict["_step"].view(-1, 1)
        tokens, mask = tensordict["tokens"].clone(), tensordict["attention_mask"].clone()
        generated = tensordict["generated"]
        column = self.max_prompt_length + generated.clamp_max(self.max_new_tokens - 1)
        action = tensordict["action"].view(-1, 1)
        tokens.scatter_(1, column, torch.where(active, action, tokens.gather(1, column)))
        mask.scatter_(1, column, mask.gather(1, column) | active)
        generated = generated + active.long()
        stop = torch.isin(action, self.stop_token_ids.to(action.device))
        terminated = tensordict.get("terminated", active & False) | (active & stop)
        truncated = ~terminated & (generated >= self.max_new_tokens)
        done = terminated | truncated
        reward = torch.zeros_like(generated, dtype=torch.float32)
        newly_done = (done & active).squeeze(-1).nonzero().squeeze(-1).tolist()
        if newly_done:
            responses = tokens[newly_done, self.max_prompt_length:]
            texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            index = tensordict["problem_index"].squeeze(-1)
            answers = [self.answers[int(index[row])] for row in newly_done]
            reward[newly_done] = torch.tensor(self._rewards(texts, answers)).view(-1, 1)
        return TensorDict(
            tokens=tokens, attention_mask=mask, prompt_length=tensordict["prompt_length"],
            generated=generated, group=tensordict["group"],
            problem_index=tensordict["problem_index"], reward=reward, done=done,
            terminated=terminated, truncated=truncated,
            batch_size=self.batch_size, device=self.device)

    def score(self, response_tokens: torch.Tensor, problem_index: torch.Tensor) -> torch.Tensor:
        """The rewards ``[N, 1]`` of completions ``[N, T]`` (padding and EOS are skipped)."""
        texts = self.tokenizer.batch_decode(response_tokens, skip_special_tokens=True)
        answers = [self.answers[int(i)] for i in problem_index.view(-1)]
        return torch.tensor(self._rewards(texts, answers)).view(-1, 1)

    def _rewards(self, texts: list[str], answers: list[str]) -> list[float]:
        """``reward_fn`` of each completion; ``math_reward`` and ``math_verify_reward`` score
        the batch at once (:func:`~torchrl_r2vpo.math_task.score_batch`: slow comparisons in
        parallel)."""
        if self.reward_fn in (math_reward, math_verify_reward):
            verifier = "builtin" if self.reward_fn is math_reward else "math-verify"
            return score_batch(texts, answers, verifier=verifier)
        return [self._reward(text, answer) for text, answer in zip(texts, answers)]

    def _reward(self, text: str, answer: str) -> float:
        """``reward_fn(text, answer)`` as a float; a ``TypeError`` if it is not a number."""
        value = self.reward_fn(text, answer)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise TypeError(
                f"reward_fn must return a number (float) per completion; it returned "
                f"{type(value).__name__} ({value!r:.80}) for the completion {text!r:.80}."
            )
        return float(value)


class _NextTokenLogits(nn.Module):
    """Logits of the token that follows the last attended position of each row."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(-1)
        logits = self.model(input_ids=tokens, attention_mask=attention_mask.long()).logits
        return logits[torch.arange(len(tokens), device=logits.device), last].float()


def next_token_actor(model: nn.Module, env: TokenGenerationEnv, *, temperature: float = 1.0) -> ProbabilisticActor:
    """A TorchRL policy sampling the next token from a causal LM: ``action``, ``action_log_prob``.

    The model sees the whole buffer (future slots are masked out), so the log-probability
    of a token equals the one of a single forward pass over the finished sequence, as the
    loss computes it.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = _NextTokenLogits(model)
    module = TensorDictModule(
        lambda tokens, mask: logits(tokens, mask) / temperature,
        in_keys=["tokens", "attention_mask"], out_keys=["logits"])
    actor = ProbabilisticActor(module, in_keys=["logits"], spec=env.action_spec,
                               distribution_class=torch.distributions.Categorical,
                               return_log_prob=True, default_interaction_type=InteractionType.RANDOM)
    actor.language_model = model  # keeps the parameters visible as the actor's
    return actor


def sequences_from_rollout(rollout: TensorDictBase, env: TokenGenerationEnv) -> TensorDict:
    """Turns a token-by-token rollout ``[N, steps]`` into the sequence layout ``[N]``.

    The layout is the one TorchRL's LLM losses read (``("tokens", "full")``,
    ``("masks", "all_attention_mask")``, ``("log_probs", "full")``, ...); see
    :func:`torchrl_r2vpo.data.sequence_batch`. Each row's reward is
    the one of the step that ended it (``env.rollout(..., break_when_all_done=True)``
    repeats a finished row's last transition, reward included, until all are done).

    Raises:
        ValueError: a completion has not ended at the last step (TorchRL's default
            ``break_when_any_done=True`` stops at the first one that ends).
    """
    done = rollout["next", "done"].reshape(rollout.shape)
    if not done[:, -1].all():
        raise ValueError(
            f"{int((~done[:, -1]).sum())} of {len(done)} completions have not ended at the last "
            "step of the rollout: roll out with break_when_any_done=False and "
            "break_when_all_done=True, for up to env.max_new_tokens steps.")
    ended_at = done.long().argmax(1)  # the first done step of each row
    reward = rollout["next", "reward"][torch.arange(len(done)), ended_at]
    last = rollout[:, -1]["next"]
    width = env.max_prompt_length
    response = last["tokens"][:, width:]
    response_mask = last["attention_mask"][:, width:]
    steps = rollout.shape[1]
    log_probs = torch.zeros_like(response, dtype=torch.float)
    log_probs[:, :steps] = rollout["action_log_prob"][:, : env.max_new_tokens]
    return sequence_batch(
        prompt=last["tokens"][:, :width], prompt_mask=last["attention_mask"][:, :width],
        response=response, response_mask=response_mask,
        response_log_probs=log_probs * response_mask, reward=reward,
        group=last["group"].squeeze(-1), problem_index=last["problem_index"].squeeze(-1))
