"""Greedy or sampled completions of math prompts, and the accuracy the verifier gives them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from torchrl_r2vpo.collectors.llm import stop_token_ids
from torchrl_r2vpo.math_task.lm import DEFAULT_MAX_NEW_TOKENS, format_prompt
from torchrl_r2vpo.math_task.problems import MathProblem
from torchrl_r2vpo.math_task.reward import score_batch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["evaluate_accuracy", "evaluate_pass_at_k", "generate_completions"]


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 256,
    seed: int | None = 0,
) -> list[str]:
    """Completions of :func:`format_prompt` prompts, decoded without special tokens.

    Greedy decoding, or sampling at ``temperature`` with no top-k/top-p truncation.
    Prompts are batched by length with left padding. A completion ends at the first of
    :func:`~torchrl_r2vpo.collectors.stop_token_ids`.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (padding on the left).
        questions: the questions, in order.
        greedy: greedy decoding instead of sampling.
        temperature: sampling temperature.
        max_new_tokens: generation budget per completion.
        batch_size: prompts per ``generate`` call.
        seed: seeds sampling without touching the global RNG; None uses it.

    Examples:
        >>> from torchrl_r2vpo.math_task import load_math_lm
        >>> model, tokenizer = load_math_lm()
        >>> completions = generate_completions(model, tokenizer, ["What is 2 + 3?"])
        >>> len(completions), isinstance(completions[0], str)
        (1, True)
    """
    order = sorted(range(len(questions)), key=lambda i: len(questions[i]))
    stops = stop_token_ids(model, tokenizer)
    texts: list[str] = [""] * len(questions)
    sampling = {"do_sample": False}
    if not greedy:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            inputs = tokenizer(
                [format_prompt(questions[i]) for i in chunk],
                add_special_tokens=False,
                padding=True,
                return_tensors="pt",
            ).to(model.device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
                **sampling,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(chunk, decoded):
                texts[i] = text
    model.train(was_training)
    return texts


def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[MathProblem],
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 256,
    seed: int | None = 0,
) -> float:
    """Fraction of ``problems`` whose completion :func:`~torchrl_r2vpo.math_task.math_reward` scores
    as correct (scored at once with :func:`~torchrl_r2vpo.math_task.score_batch`).

    Arguments are those of :func:`generate_completions`.

    Examples:
        >>> from torchrl_r2vpo.math_task import generate_problems, load_math_lm
        >>> model, tokenizer = load_math_lm()
        >>> problems = generate_problems(64, split="test", difficulty=1, seed=0)
        >>> 0.0 <= evaluate_accuracy(model, tokenizer, problems) <= 1.0
        True
    """
    if not problems:
        raise ValueError("no problems to evaluate")
    completions = generate_completions(
        model,
        tokenizer,
        [p.question for p in problems],
        greedy=greedy,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    return sum(score_batch(completions, [p.answer for p in problems])) / len(problems)


def evaluate_pass_at_k(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[MathProblem],
    k: int = 8,
    *,
    temperature: float = 1.0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 256,
    seed: int | None = 0,
) -> float:
    """Fraction of ``problems`` that at least one of ``k`` sampled completions gets right.

    pass@k above pass@1 (the sampled accuracy) measures what sampling can discover and RL
    can then reinforce. Arguments are those of :func:`generate_completions`.

    Examples:
        >>> from torchrl_r2vpo.math_task import generate_problems, load_math_lm
        >>> model, tokenizer = load_math_lm()
        >>> problems = generate_problems(32, split="test", difficulty=1, seed=0)
        >>> evaluate_pass_at_k(model, tokenizer, problems, k=4) >= 0.0
        True
    """
    if not problems or k < 1:
        raise ValueError(f"need problems and k >= 1, got {len(problems)} problems and k={k}")
    completions = generate_completions(
        model,
        tokenizer,
        [p.question for p in problems for _ in range(k)],
        greedy=False,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    scores = score_batch(completions, [p.answer for p in problems for _ in range(k)])
    solved = [any(scores[i * k:(i + 1) * k]) for i in range(len(problems))]
    return sum(solved) / len(problems)
