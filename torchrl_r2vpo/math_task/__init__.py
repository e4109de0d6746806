"""The math-reasoning task: problem generators and loaders, the answer verifier (the reward),
the tiny offline language model with its tokenizer, its warm start, and evaluation."""

from __future__ import annotations

from torchrl_r2vpo.math_task.evaluation import evaluate_accuracy, evaluate_pass_at_k, generate_completions
from torchrl_r2vpo.math_task.lm import (
    ADDITION_MODEL_PATH,
    build_math_lm,
    build_math_tokenizer,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL_PATH,
    format_prompt,
    format_target,
    left_padding_shift,
    load_math_lm,
)
from torchrl_r2vpo.math_task.problems import (
    EVAL_SEED,
    generate_problems,
    generate_reversed_addition,
    load_hf_math,
    MathProblem,
)
from torchrl_r2vpo.math_task.reward import (
    answers_match,
    extract_answer,
    math_reward,
    math_verify_reward,
    normalize_answer,
    score_batch,
)
from torchrl_r2vpo.math_task.sft import sft_loss, warm_start
from torchrl_r2vpo.math_task.verifier_pool import VerifierPool

__all__ = [
    "ADDITION_MODEL_PATH",
    "EVAL_SEED",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_MODEL_PATH",
    "MathProblem",
    "VerifierPool",
    "answers_match",
    "build_math_lm",
    "build_math_tokenizer",
    "evaluate_accuracy",
    "evaluate_pass_at_k",
    "extract_answer",
    "format_prompt",
    "format_target",
    "generate_completions",
    "generate_problems",
    "generate_reversed_addition",
    "left_padding_shift",
    "load_hf_math",
    "load_math_lm",
    "math_reward",
    "math_verify_reward",
    "normalize_answer",
    "score_batch",
    "sft_loss",
    "warm_start",
]
