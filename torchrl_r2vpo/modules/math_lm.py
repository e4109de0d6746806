"""A tiny character-level math language model that runs offline on a CPU.

The offline default policy for math RL is a small :class:`~transformers.LlamaForCausalLM`
built from a config, with a character-level tokenizer built in code
(:func:`build_math_tokenizer`), brought to a non-trivial starting accuracy by a short
supervised warm start (:func:`warm_start`). A warm-started checkpoint ships in the package
(:data:`DEFAULT_MODEL_PATH`); :func:`load_math_lm` loads it, any local Hugging Face model
directory or a hub id.

Prompt and completion format, shared by training, evaluation and RL::

    prompt     = format_prompt(question)   # "What is 3 + 4?\\nA: "
    completion = format_target(answer)     # "7", then the eos token

:func:`~torchrl_r2vpo.envs.math_reward.math_reward` reads the completion's last number,
so ``math_reward(completion, answer)`` scores it directly. Generated answers are at most
6 characters, so :data:`DEFAULT_MAX_NEW_TOKENS` new tokens hold any answer and the eos token.

The shipped checkpoint (505k parameters, float32, 2 MB) was made with::

    python -m torchrl_r2vpo.modules.math_lm --out torchrl_r2vpo/assets/math-lm-tiny

that is 800 AdamW steps on batches of 64 difficulty-1 train problems, single-threaded
(about 1.5 min on a 2-core CPU; a rerun on the same machine gives identical weights).
It is deliberately under-trained. Accuracy on 500 problems per set (the command prints
it; sampling is at temperature 1 without top-k/top-p truncation)::

    set                          greedy   sampled
    train split, difficulty 1     0.772     0.646
    test split, difficulty 1      0.472     0.446
    test split, difficulty 2      0.002     0.002
    test split, difficulty 3      0.000     0.000

A randomly initialised model scores about 0.01 on every set. Difficulty 1 (train split
for RL, test split for evaluation) is the task the checkpoint is meant to be improved
on; difficulties 2 and 3 are out of its reach.
"""

from __future__ import annotations

import argparse
import math
import os
import string
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from torchrl_r2vpo.collectors.llm_rollout import stop_token_ids
from torchrl_r2vpo.envs.math_data import MathProblem, generate_problems
from torchrl_r2vpo.envs.math_reward import math_reward

if TYPE_CHECKING:  # transformers is an optional dependency, imported where used
    from transformers import (
        LlamaForCausalLM,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_MODEL_PATH",
    "build_math_lm",
    "build_math_tokenizer",
    "evaluate_accuracy",
    "format_prompt",
    "format_target",
    "generate_completions",
    "left_padding_shift",
    "load_math_lm",
    "sft_loss",
    "warm_start",
]

DEFAULT_MODEL_PATH = str(Path(__file__).resolve().parent.parent / "assets" / "math-lm-tiny")
"""The warm-started checkpoint shipped with the package (a Hugging Face model directory)."""

DEFAULT_MAX_NEW_TOKENS = 8
"""Generation budget: any generated answer (at most 6 characters) and the eos token."""

_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
_CHARACTERS = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")  # ASCII 32-126 and "\n"


def format_prompt(question: str) -> str:
    """The prompt the model completes for ``question``.

    Examples:
        >>> format_prompt("What is 3 + 4?")
        'What is 3 + 4?\\nA: '
    """
    return f"{question}\nA: "


def format_target(answer: str) -> str:
    """The supervised completion for a canonical answer (the eos token follows it).

    Examples:
        >>> format_target("-3/4")
        '-3/4'
    """
    return answer


def build_math_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII and newline, built in code.

    Every character is one token, so :meth:`decode` inverts :meth:`encode` exactly
    (spaces included). Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then the
    characters. No special token is added when encoding, and text that spells one
    (``"<eos>"``) is read as its characters; padding is on the left.

    Returns:
        A :class:`~transformers.PreTrainedTokenizerFast` with 100 tokens.

    Examples:
        >>> tokenizer = build_math_tokenizer()
        >>> len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id
        (100, 0, 2)
        >>> ids = tokenizer("What is 3 / 4?")["input_ids"]
        >>> len(ids), tokenizer.decode(ids)
        (14, 'What is 3 / 4?')
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*_SPECIAL_TOKENS, *_CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    pad, bos, eos, unk = _SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
        model_max_length=model_max_length,
    )


def build_math_lm(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int | None = 0,
) -> LlamaForCausalLM:
    """A small randomly initialised Llama causal LM for ``tokenizer``'s vocabulary.

    Embeddings are tied and attention uses SDPA. The generation config samples at
    temperature 1 with no top-k/top-p truncation and stops at the eos token. The
    architecture is Llama rather than Qwen2 because ``AutoTokenizer`` loads the tokenizer
    of a ``qwen2`` model directory as ``Qwen2Tokenizer``, which would not keep this vocabulary.

    Args:
        tokenizer: gives the vocabulary size and the pad/bos/eos ids.
        hidden_size: model width.
        num_layers: transformer blocks.
        num_heads: attention heads (``hidden_size`` must be a multiple).
        num_kv_heads: key/value heads (grouped-query attention).
        intermediate_size: MLP width; ``4 * hidden_size`` by default.
        max_position_embeddings: longest sequence the RoPE is configured for.
        seed: seeds the initialisation without touching the global RNG; None uses it.

    Examples:
        >>> model = build_math_lm(build_math_tokenizer())
        >>> type(model).__name__, sum(p.numel() for p in model.parameters())
        ('LlamaForCausalLM', 504960)
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):  # the model is built on the CPU
        if seed is not None:
            torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return model


def load_math_lm(
    name_or_path: str | os.PathLike = DEFAULT_MODEL_PATH,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer: the shipped checkpoint, a local directory or a hub id.

    The tokenizer pads on the left; a tokenizer without a pad token pads with its eos token.
    The model is in eval mode and its generation config knows the pad and eos ids. A model
    whose predictions move when a prompt is left-padded (learned absolute positions, e.g.
    GPT-2) gets a warning: see :func:`left_padding_shift`.

    Args:
        name_or_path: a Hugging Face model directory or hub id (hub ids need network
            access or a filled local cache).
        device: where to put the model; it stays on the CPU by default.
        dtype: parameter dtype; the checkpoint's own by default (float32 for the shipped one).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: a local path that does not exist or has no ``config.json``.

    Examples:
        >>> model, tokenizer = load_math_lm()
        >>> type(model).__name__, tokenizer.padding_side, model.training
        ('LlamaForCausalLM', 'left', False)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~", "\\")) or name.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        reason = "does not exist" if not path.exists() else "has no config.json"
        raise FileNotFoundError(f"{name!r} is not a Hugging Face model directory: it {reason}")
    source = str(path) if looks_local else name
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, **({"dtype": dtype} if dtype is not None else {}))
    if device is not None:
        model.to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    shift = left_padding_shift(model.eval(), tokenizer.pad_token_id)
    low_precision = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    if shift > (5e-2 if low_precision else 1e-3):  # above the rounding of the dtype
        warnings.warn(
            f"{name}: left-padding a prompt moves this model's next-token log-probabilities by "
            f"up to {shift:.3g} nats (learned absolute positions). Generation places each prompt "
            "after its padding, but the log-probabilities of the rollouts and of TorchRL's "
            "TransformersWrapper count the padding: the ratio refers to a slightly different "
            "policy than the one sampled. Models with rotary or relative positions (Llama, "
            "Qwen, ...) are unaffected.",
            stacklevel=2,
        )
    return model, tokenizer


@torch.no_grad()
def left_padding_shift(model: PreTrainedModel, pad_token_id: int, pad: int = 3) -> float:
    """The largest change of the next-token log-probabilities of a short prompt when ``pad``
    padding tokens are put before it (attention-masked, positions not given, as a scorer
    of a left-padded batch runs the model): float rounding for rotary or relative
    positions, a sizeable number for learned absolute ones.

    Examples:
        >>> model, tokenizer = load_math_lm()
        >>> left_padding_shift(model, tokenizer.pad_token_id) < 1e-4  # rotary positions
        True
    """
    device = next(model.parameters()).device
    prompt = torch.arange(5, device=device) % model.config.vocab_size
    prompt = torch.where(prompt == pad_token_id, (pad_token_id + 1) % model.config.vocab_size, prompt)
    padded = torch.cat([torch.full((pad,), pad_token_id, device=device), prompt])
    mask = (torch.arange(len(padded), device=device) >= pad).long()
    plain = model(input_ids=prompt[None]).logits[0, -1].float().log_softmax(-1)
    shifted = model(input_ids=padded[None], attention_mask=mask[None]).logits[0, -1]
    return (shifted.float().log_softmax(-1) - plain).abs().max().item()


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

    Returns:
        ``{"losses": per-step losses, "final_loss": mean of the last 10 %, "seconds": wall time}``.

    Examples:
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
    for _ in bar:
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
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return {"losses": losses, "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - start}


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
    """Fraction of ``problems`` whose completion :func:`math_reward` scores as correct.

    Arguments are those of :func:`generate_completions`.

    Examples:
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
    return sum(math_reward(c, p.answer) for c, p in zip(completions, problems)) / len(problems)


def _report(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eval_sets: dict[str, list[MathProblem]]
) -> str:
    """Greedy and sampled accuracy on each evaluation set, one line per set."""
    rows = []
    for name, problems in eval_sets.items():
        greedy = evaluate_accuracy(model, tokenizer, problems, greedy=True)
        sampled = evaluate_accuracy(model, tokenizer, problems, greedy=False)
        rows.append(f"  {name}: greedy {greedy:.3f}, sampled (T=1) {sampled:.3f}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    """Builds, warm-starts, evaluates and saves the tiny math model (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m torchrl_r2vpo.modules.math_lm",
        description="Warm-start the tiny character-level math LM and save it as a Hugging Face directory.",
    )
    parser.add_argument("--out", required=True, help="output directory (model, tokenizer, generation config)")
    parser.add_argument("--steps", type=int, default=800, help="supervised optimiser steps")
    parser.add_argument("--batch-size", type=int, default=64, help="problems per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--difficulty", type=int, nargs="+", default=[1], help="training difficulties")
    parser.add_argument("--train-size", type=int, default=50_000, help="training problems generated")
    parser.add_argument("--eval-size", type=int, default=500, help="problems per evaluation set")
    parser.add_argument("--hidden-size", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation, data and batches")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--device", default="cpu", help="where to train (cpu, cuda)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        _build_checkpoint(args)
    finally:
        torch.set_num_threads(threads)


def _build_checkpoint(args: argparse.Namespace) -> None:
    tokenizer = build_math_tokenizer()
    model = build_math_lm(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed)
    model.to(args.device)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    levels = tuple(args.difficulty)
    train = generate_problems(args.train_size, split="train", difficulty=levels, seed=args.seed)
    name = f"train split, difficulty {','.join(map(str, levels))}"
    eval_sets = {name: generate_problems(args.eval_size, difficulty=levels, seed=1)}
    for level in (1, 2, 3):
        test = generate_problems(args.eval_size, split="test", difficulty=level, seed=1)
        eval_sets[f"test split, difficulty {level}"] = test
    print("before:\n" + _report(model, tokenizer, eval_sets))
    stats = warm_start(
        model, tokenizer, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    print(f"warm start: {stats['seconds']:.0f} s, final loss {stats['final_loss']:.3f}")
    print("after:\n" + _report(model, tokenizer, eval_sets))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
