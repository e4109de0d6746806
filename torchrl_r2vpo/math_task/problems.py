"""Math problems for RL fine-tuning: an offline seeded generator and Hugging Face loaders.

:func:`generate_problems` needs no network: arithmetic (difficulty 1 and 2) and short
word problems (difficulty 3) with exact answers. A question belongs to the train or test
split by a stable SHA-256 hash (80/20) of a key that its near-twins share: for arithmetic
the multiset of its numbers and operators (``a + b`` and ``b + a``, ``a * b + c`` and
``b * a + c``), for word problems the text without the name. So, whatever the seed, no test
question and no commuted or renamed twin of it is in the train split, and held-out accuracy
measures facts the model was not trained on. :func:`load_hf_math` reads GSM8K or MATH with the
``datasets`` package; their completions are best scored with
:func:`~torchrl_r2vpo.math_task.math_verify_reward`.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from torchrl_r2vpo.math_task.reward import extract_answer

__all__ = ["EVAL_SEED", "MathProblem", "generate_problems", "generate_reversed_addition", "load_hf_math"]

_TRAIN_PERCENT = 80

EVAL_SEED = 1_000_003
"""Seed of the held-out stream of :func:`generate_reversed_addition` in the warm start, the
example and the benchmarks (training streams are seeded by the run's seed)."""
_NAMES = ("Alice", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro")


@dataclass(frozen=True)
class MathProblem:
    """A question with its canonical answer (``"42"``, ``"-7"``, ``"3/4"``) and difficulty."""

    question: str
    answer: str
    difficulty: int


def generate_problems(
    n: int,
    *,
    split: Literal["train", "test"] = "train",
    difficulty: int | Sequence[int] = (1, 2, 3),
    seed: int = 0,
) -> list[MathProblem]:
    """Generates ``n`` problems of one split, deterministically for given arguments.

    Difficulty 1 is one operation on numbers up to 20 (division may give a fraction),
    2 is two operations on numbers up to 50 with precedence or parentheses, 3 is a
    short word problem with an integer answer. Questions may repeat within a split.

    Examples:
        >>> problems = generate_problems(3, difficulty=1, seed=0)
        >>> len(problems), problems == generate_problems(3, difficulty=1, seed=0)
        (3, True)
        >>> problems[0].question.startswith("What is "), problems[0].difficulty
        (True, 1)
    """
    levels = (difficulty,) if isinstance(difficulty, int) else tuple(difficulty)
    if n < 0 or split not in ("train", "test") or not levels or set(levels) - {1, 2, 3}:
        raise ValueError(f"bad arguments: n={n}, split={split!r}, difficulty={difficulty!r}")
    rng = random.Random(seed)
    problems: list[MathProblem] = []
    while len(problems) < n:
        level = rng.choice(levels)
        question, answer = _GENERATORS[level](rng)
        if _split_of(question) == split:
            problems.append(MathProblem(question, _canonical(answer), level))
    return problems


def generate_reversed_addition(
    n: int,
    *,
    split: Literal["train", "test"] = "train",
    digits: int = 2,
    terms: int = 2,
    seed: int = 0,
) -> list[MathProblem]:
    """Draws ``n`` fresh sums of ``terms`` numbers of ``digits`` digits, answered reversed.

    The question is ``"47+38="`` and the answer is the sum written least significant digit
    first (``"58"`` for 85): the carry algorithm then runs in the order the answer is
    written, so a small model can learn the skill itself rather than memorise facts. Each
    draw is uniform over the operands; a set of operands belongs to the train or the test
    split by a stable hash of its multiset (80/20), so neither order of a held-out pair is
    ever trained on, and the two splits follow the same distribution otherwise. Sums that
    end in 0 are redrawn: their reversed form would start with a 0 that a numeric
    comparison (:func:`~torchrl_r2vpo.math_task.math_reward`) ignores.

    The generator is a stream: every call with another ``seed`` draws other problems, so a
    run can draw fresh ones for each iteration; the difficulty knobs are ``digits`` (the
    longer the numbers, the longer the carry chains) and ``terms``. ``difficulty`` of each
    problem is ``digits``.

    Examples:
        >>> problems = generate_reversed_addition(2, seed=0)
        >>> [(p.question, p.answer) for p in problems]
        [('69+29=', '89'), ('59+88=', '741')]
        >>> problems == generate_reversed_addition(2, seed=0)
        True
    """
    if n < 0 or split not in ("train", "test") or digits < 1 or terms < 2:
        raise ValueError(f"bad arguments: n={n}, split={split!r}, digits={digits}, terms={terms}")
    rng = random.Random(f"reversed-addition {seed}")
    low, high = 10 ** (digits - 1), 10**digits - 1
    problems: list[MathProblem] = []
    while len(problems) < n:
        operands = [rng.randint(low, high) for _ in range(terms)]
        total = sum(operands)
        key = f"reversed-addition {sorted(operands)}"
        if total % 10 == 0 or _bucket_split(key) != split:
            continue
        question = "+".join(map(str, operands)) + "="
        problems.append(MathProblem(question, str(total)[::-1], digits))
    return problems


def _bucket_split(key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    return "train" if bucket < _TRAIN_PERCENT else "test"


def _split_of(question: str) -> str:
    return _bucket_split(_split_key(question))


def _split_key(question: str) -> str:
    if question.startswith("What is "):  # arithmetic: order-free, so commuted twins share a key
        numbers = sorted(map(int, re.findall(r"\d+", question)))
        return f"arithmetic {numbers} {sorted(re.findall(r'[-+*/]', question))}"
    return re.sub("|".join(_NAMES), "<name>", question)


def _canonical(value: Fraction | int) -> str:
    value = Fraction(value)
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _apply(a: Fraction | int, op: str, b: Fraction | int) -> Fraction:
    a, b = Fraction(a), Fraction(b)
    return {"+": a + b, "-": a - b, "*": a * b}[op] if op != "/" else a / b


def _level1(rng: random.Random) -> tuple[str, Fraction]:
    a, b, op = rng.randint(1, 20), rng.randint(1, 20), rng.choice("+-*/")
    return f"What is {a} {op} {b}?", _apply(a, op, b)


def _level2(rng: random.Random) -> tuple[str, Fraction]:
    a, b, c = (rng.randint(2, 50) for _ in range(3))
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    if rng.random() < 0.3:
        return f"What is ({a} {op1} {b}) {op2} {c}?", _apply(_apply(a, op1, b), op2, c)
    if op2 == "*" and op1 != "*":  # precedence: a + b * c
        value = _apply(a, op1, b * c)
    else:
        value = _apply(_apply(a, op1, b), op2, c)
    return f"What is {a} {op1} {b} {op2} {c}?", value


def _level3(rng: random.Random) -> tuple[str, int]:
    name, kind = rng.choice(_NAMES), rng.randrange(4)
    if kind == 0:
        has, bought = rng.randint(3, 40), rng.randint(1, 30)
        sold = rng.randint(1, has + bought)
        question = f"{name} has {has} apples, buys {bought} more and then sells {sold}."
        return f"{question} How many apples does {name} have now?", has + bought - sold
    if kind == 1:
        speed, hours = rng.randint(20, 120), rng.randint(2, 9)
        question = f"A train travels at {speed} km/h for {hours} hours."
        return f"{question} How many kilometres does it travel?", speed * hours
    if kind == 2:
        friends, each = rng.randint(2, 12), rng.randint(1, 25)
        question = f"{name} shares {friends * each} marbles equally among {friends} friends."
        return f"{question} How many marbles does each friend get?", each
    count, price = rng.randint(1, 12), rng.randint(1, 15)
    bill = next(b for b in (10, 20, 50, 100, 200) if b >= count * price)
    question = f"{name} buys {count} pens at ${price} each and pays with a ${bill} bill."
    return f"{question} How many dollars of change does {name} get?", bill - count * price


_GENERATORS = {1: _level1, 2: _level2, 3: _level3}


def load_hf_math(name: Literal["gsm8k", "math"], split: str = "train") -> list[MathProblem]:
    """Loads GSM8K (``openai/gsm8k``) or MATH (``DigitalLearningGmbH/MATH-lighteval``).

    Needs network access and ``pip install datasets``. GSM8K answers are the text after
    ``####`` (difficulty 0: unrated); MATH answers are the last ``\\boxed{}`` of the
    solution and the difficulty is its level (1-5). MATH rows without one are skipped.

    Score completions of these problems with
    :func:`~torchrl_r2vpo.math_task.math_verify_reward` (or ``score_batch(...,
    verifier="math-verify")``; ``pip install "torchrl_r2vpo[math-verify]"``): on GSM8K- and
    MATH-style answers it agrees with hand labels more often than the builtin
    :func:`~torchrl_r2vpo.math_task.math_reward` (sets, intervals, lists, matrices, units),
    as ``benchmarks/verifier_compare.py`` measures; the generated arithmetic problems need
    only the builtin stages.

    Example (with network access)::

        problems = load_hf_math("gsm8k", split="test")
        problems[0].answer  # '18'
        math_verify_reward(r"... \\boxed{18}", problems[0].answer)  # 1.0
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError("load_hf_math needs the `datasets` package: pip install datasets") from err
    if name == "gsm8k":
        rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
        return [MathProblem(r["question"], _gsm8k_answer(r["answer"]), 0) for r in rows]
    if name != "math":
        raise ValueError(f"unknown dataset {name!r}; expected 'gsm8k' or 'math'")
    rows = datasets.load_dataset("DigitalLearningGmbH/MATH-lighteval", split=split)
    problems = []
    for row in rows:
        answer, level = extract_answer(row["solution"]), re.search(r"\d+", str(row.get("level", "")))
        if answer is not None and re.search(r"\\(?:boxed|fbox)\s*\{", row["solution"]):
            problems.append(MathProblem(row["problem"], answer, int(level[0]) if level else 0))
    return problems


def _gsm8k_answer(solution: str) -> str:
    return solution.split("####")[-1].strip().replace(",", "")
