"""A tiny character-level math language model that runs offline on a CPU.

The offline default policy for math RL is a small :class:`~transformers.LlamaForCausalLM`
built from a config (:func:`build_math_lm`), with a character-level tokenizer built in code
(:func:`build_math_tokenizer`), brought to a non-trivial starting accuracy by a short
supervised warm start (:mod:`torchrl_r2vpo.math_task.sft`, rebuilt by ``python -m torchrl_r2vpo.math_task``). A warm-started checkpoint
ships in the package (:data:`DEFAULT_MODEL_PATH`); :func:`load_math_lm` loads it, any local
Hugging Face model directory or a hub id.

Prompt and completion format, shared by training, evaluation and RL::

    prompt     = format_prompt(question)   # "What is 3 + 4?\\nA: "
    completion = format_target(answer)     # "7", then the eos token

:func:`~torchrl_r2vpo.math_task.math_reward` reads the completion's last number,
so ``math_reward(completion, answer)`` scores it directly. Generated answers are at most
6 characters, so :data:`DEFAULT_MAX_NEW_TOKENS` new tokens hold any answer and the eos token.
"""

from __future__ import annotations

import os
import string
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is an optional dependency, imported where used
    from transformers import (
        LlamaForCausalLM,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

__all__ = [
    "ADDITION_MODEL_PATH",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_MODEL_PATH",
    "build_math_lm",
    "build_math_tokenizer",
    "format_prompt",
    "format_target",
    "left_padding_shift",
    "load_math_lm",
]

_ASSETS = Path(__file__).resolve().parent.parent / "assets"

DEFAULT_MODEL_PATH = str(_ASSETS / "math-lm-tiny")
"""The warm-started checkpoint for :func:`~torchrl_r2vpo.math_task.generate_problems`, shipped
with the package (a Hugging Face model directory)."""

ADDITION_MODEL_PATH = str(_ASSETS / "math-lm-add2")
"""The warm-started checkpoint for 2-digit
:func:`~torchrl_r2vpo.math_task.generate_reversed_addition`, shipped with the package."""

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
