"""Supervised warm start of a math language model on prompt -> answer pairs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from torchrl_r2vpo.math_task.lm import format_prompt, format_target
from torchrl_r2vpo.math_task.problems import MathProblem

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["sft_loss", "warm_start"]


def _encode_examples(
    tokenizer: PreTrainedTokenizerBase, problems: Sequence[MathProblem]
) -> list[tuple[list[int], list[int]]]:
    """Prompt ids and target ids (answer then eos) of each problem."""
    prompts = tokenizer([format_prompt(p.question) for p in problems], add_special_tokens=False)["input_ids"]
    targets = tokenizer([format_target(p.answer) for p in problems], add_special_tokens=False)["input_ids"]
    return [(prompt, target + [tokenizer.eos_token_id]) for prompt, target in zip(prompts, targets)]


def _collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input ids, attention mask, position ids and labels (answer tokens only)."""
    length = max(len(p) + len(t) for p, t in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, target) in enumerate(examples):
        ids = prompt + target
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        labels[row, length - len(target) :] = torch.tensor(target)
        attention_mask[row, length - len(ids) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
    }


def sft_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[MathProblem]
) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (and eos) given the prompts.

    Examples:
        >>> from torchrl_r2vpo.math_task import generate_problems, load_math_lm
        >>> model, tokenizer = load_math_lm()
        >>> problems = generate_problems(4, difficulty=1, seed=0)
        >>> bool(sft_loss(model, tokenizer, problems) < math.log(len(tokenizer)))
        True
    """
    batch = _collate(_encode_examples(tokenizer, problems), tokenizer.pad_token_id)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    return model(**batch).loss


def warm_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[MathProblem],
    *,
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    warmup: int = 50,
    seed: int = 0,
    progress: bool = True,
    stop_when: Callable[[int], bool] | None = None,
    check_every: int = 100,
) -> dict[str, float | list[float]]:
    """Supervised fine-tuning on prompt -> answer pairs; the loss covers the answer and eos.

    AdamW with a linear warm-up then cosine decay to 10 % of ``lr``; batches are drawn
    uniformly with replacement from ``problems`` by a generator seeded with ``seed``.
    The model is left in eval mode.

    Args:
        model: a causal LM (e.g. from :func:`build_math_lm`); trained in place.
        tokenizer: its tokenizer.
        problems: training problems.
        steps: optimiser steps.
        batch_size: problems per step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup: linear warm-up steps.
        seed: seeds the batch sampling.
        progress: show a tqdm progress bar.
        stop_when: called with the number of steps done every ``check_every`` steps (the
            model in eval mode); training stops early when it returns ``True``.
        check_every: steps between calls of ``stop_when``.

    Returns:
        ``{"losses": per-step losses, "final_loss": mean of the last 10 %, "steps": steps
        done, "seconds": wall time}``.

    Examples:
        >>> from torchrl_r2vpo.math_task import build_math_lm, build_math_tokenizer, generate_problems
        >>> tokenizer = build_math_tokenizer()
        >>> model = build_math_lm(tokenizer, hidden_size=32, num_layers=1)
        >>> problems = generate_problems(64, difficulty=1)
        >>> stats = warm_start(model, tokenizer, problems, steps=10, batch_size=8, warmup=2, progress=False)
        >>> stats["final_loss"] < stats["losses"][0]
        True
    """
    if not problems or steps < 1 or batch_size < 1:
        raise ValueError(
            f"need problems, steps >= 1 and batch_size >= 1; got {len(problems)} problems, "
            f"steps={steps}, batch_size={batch_size}"
        )
    examples = _encode_examples(tokenizer, problems)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="warm start", disable=not progress)
    for step in bar:
        index = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        batch = _collate([examples[i] for i in index], tokenizer.pad_token_id)
        loss = model(**{k: v.to(model.device) for k, v in batch.items()}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if stop_when is not None and (step + 1) % check_every == 0:
            model.eval()
            if stop_when(step + 1):
                break
            model.train()
    bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {"losses": losses, "final_loss": sum(tail) / len(tail), "steps": len(losses),
            "seconds": time.perf_counter() - start}
