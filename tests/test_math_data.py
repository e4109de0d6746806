from __future__ import annotations

import ast
import operator
import re
import sys
from fractions import Fraction

import pytest

from hypothesis import given, settings, strategies as st

from torchrl_r2vpo.math_task import generate_reversed_addition, math_reward
from torchrl_r2vpo.math_task.problems import _NAMES, MathProblem, _split_of, generate_problems, load_hf_math

ARITHMETIC = re.compile(r"What is ([-+*/() 0-9]+)\?")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expression: str) -> Fraction:
    """Independent exact evaluator for the generated arithmetic (ints, + - * /, parentheses)."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(ast.dump(node))

    return walk(ast.parse(expression, mode="eval").body)


def test_deterministic_and_seed_dependent():
    first = generate_problems(50, seed=3)
    assert first == generate_problems(50, seed=3)
    assert first != generate_problems(50, seed=4)
    assert generate_problems(50, split="test", seed=3) == generate_problems(50, split="test", seed=3)
    assert generate_problems(20, seed=3) == first[:20]
    assert all(isinstance(p, MathProblem) for p in first)


def test_train_and_test_are_disjoint():
    train = {p.question for p in generate_problems(500, split="train", seed=0)}
    test = {p.question for p in generate_problems(500, split="test", seed=0)}
    other_seed_test = {p.question for p in generate_problems(500, split="test", seed=1)}
    assert len(train) > 200 and len(test) > 200
    assert train.isdisjoint(test)
    assert train.isdisjoint(other_seed_test)


def test_split_is_a_stable_80_20_hash():
    splits = [_split_of(f"What is {i} + 1?") for i in range(5000)]
    assert 0.77 < splits.count("train") / len(splits) < 0.83
    assert _split_of("What is 1 + 1?") == _split_of("What is 1 + 1?")
    for problem in generate_problems(100, split="test", seed=9):
        assert _split_of(problem.question) == "test"


def _twins(question: str) -> set[str]:
    """The question renamed, and with the operands of its first ``+`` or ``*`` pair swapped where that
    keeps its value (one operation, or inside parentheses)."""
    twins = {re.sub("|".join(_NAMES), name, question) for name in _NAMES}
    twins.add(re.sub(r"^What is (\d+) ([+*]) (\d+)\?$", r"What is \3 \2 \1?", question))
    twins.add(re.sub(r"\((\d+) ([+*]) (\d+)\)", r"(\3 \2 \1)", question))
    return twins - {question}


def test_no_commuted_or_renamed_twin_crosses_the_split():
    train = {p.question for p in generate_problems(4096, seed=0)}
    test = generate_problems(1024, split="test", seed=0)
    twins = {twin for problem in test for twin in _twins(problem.question)}
    assert len(twins) > 1000
    assert {_split_of(twin) for twin in twins} == {"test"}
    assert train.isdisjoint(twins)


@pytest.mark.parametrize("difficulty", [1, 2, 3, (1, 3)])
def test_difficulty_filter(difficulty):
    allowed = {difficulty} if isinstance(difficulty, int) else set(difficulty)
    problems = generate_problems(100, difficulty=difficulty, seed=1)
    assert {p.difficulty for p in problems} == allowed


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"n": 3, "difficulty": 4}, {"n": 3, "difficulty": ()}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        generate_problems(**kwargs)


@pytest.mark.parametrize("split", ["train", "test"])
def test_arithmetic_answers_are_correct(split):
    problems = generate_problems(300, split=split, difficulty=(1, 2), seed=5)
    operators = {p.difficulty: set() for p in problems}
    for problem in problems:
        expression = ARITHMETIC.fullmatch(problem.question)[1]
        expected = evaluate(expression)
        assert Fraction(problem.answer) == expected, problem
        assert problem.answer == (str(expected.numerator) if expected.denominator == 1 else str(expected))
        operators[problem.difficulty].add(len(re.findall(r"(?<=[\d)]) [-+*/] ", expression)))
    assert operators == {1: {1}, 2: {2}}
    assert any("/" in p.answer for p in problems)  # some division gives a fraction
    assert any(p.answer.startswith("-") for p in problems)


def test_word_problem_answers_are_correct():
    for problem in generate_problems(200, difficulty=3, seed=2):
        numbers = [int(x) for x in re.findall(r"\d+", problem.question)]
        if "apples" in problem.question:
            expected = numbers[0] + numbers[1] - numbers[2]
        elif "km/h" in problem.question:
            expected = numbers[0] * numbers[1]
        elif "marbles" in problem.question:
            expected = numbers[0] // numbers[1]
            assert numbers[0] % numbers[1] == 0
        else:
            expected = numbers[2] - numbers[0] * numbers[1]
        assert int(problem.answer) == expected >= 0, problem


def test_answers_round_trip_through_reward():
    for problem in generate_problems(200, seed=7) + generate_problems(200, split="test", seed=7):
        assert math_reward(f"The answer is \\boxed{{{problem.answer}}}", problem.answer) == 1.0
        wrong = Fraction(problem.answer) + 1
        assert math_reward(f"\\boxed{{{wrong}}}", problem.answer, formatted=0.5) == 0.5


def test_load_hf_math_without_datasets_raises_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf_math("gsm8k")


def operands(problem: MathProblem) -> list[int]:
    assert problem.question.endswith("=")
    return [int(x) for x in problem.question[:-1].split("+")]


def test_reversed_addition_is_seeded_and_fresh_per_seed():
    assert generate_reversed_addition(64, seed=3) == generate_reversed_addition(64, seed=3)
    assert generate_reversed_addition(64, seed=3) != generate_reversed_addition(64, seed=4)
    assert generate_reversed_addition(5, seed=3) == generate_reversed_addition(64, seed=3)[:5]


def test_reversed_addition_streams_share_no_operand_set():
    train = {tuple(sorted(operands(p))) for p in generate_reversed_addition(20_000, seed=0)}
    test = {tuple(sorted(operands(p))) for p in generate_reversed_addition(5_000, split="test", seed=1)}
    assert not train & test
    # the same distribution otherwise: every 2-digit pair is in one split, about 1 in 5 in test
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.25
    assert len(train) + len(test) > 3_500  # nearly all of the 4095 pairs, less those summing to x0


@pytest.mark.parametrize("digits", [1, 2, 3, 4])
@pytest.mark.parametrize("terms", [2, 3])
def test_reversed_addition_answers_are_scored_by_the_verifier(digits, terms):
    for problem in generate_reversed_addition(200, digits=digits, terms=terms, seed=digits + terms):
        numbers = operands(problem)
        assert len(numbers) == terms and all(len(str(x)) == digits for x in numbers)
        assert problem.answer == str(sum(numbers))[::-1] and problem.difficulty == digits
        assert math_reward(problem.answer, problem.answer) == 1.0
        assert math_reward(f"{problem.answer}<eos>", problem.answer) == 1.0
        wrong = str(int(problem.answer) + 1)  # one more in the lowest written digit place
        assert math_reward(wrong, problem.answer) == 0.0


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), digits=st.integers(1, 5), terms=st.integers(2, 4),
       split=st.sampled_from(["train", "test"]))
def test_reversed_addition_round_trips(seed, digits, terms, split):
    (problem,) = generate_reversed_addition(1, split=split, digits=digits, terms=terms, seed=seed)
    numbers = operands(problem)
    assert "+".join(map(str, numbers)) + "=" == problem.question
    assert int(problem.answer[::-1]) == sum(numbers)
    assert not problem.answer.startswith("0")  # a numeric match would not see a leading zero
    mirrored = generate_reversed_addition(1, split="train" if split == "test" else split,
                                          digits=digits, terms=terms, seed=seed)
    assert split == "train" or sorted(operands(mirrored[0])) != sorted(numbers)


def test_reversed_addition_rejects_bad_arguments():
    for kwargs in ({"n": -1}, {"n": 1, "digits": 0}, {"n": 1, "terms": 1}, {"n": 1, "split": "dev"}):
        with pytest.raises(ValueError, match="bad arguments"):
            generate_reversed_addition(**kwargs)
