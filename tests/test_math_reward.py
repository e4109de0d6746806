from __future__ import annotations

import builtins
import signal
import sys
import threading
import time

import pytest
import sympy
import sympy.parsing.sympy_parser
from hypothesis import given, settings, strategies as st

from torchrl_r2vpo.math_task._symbolic import run_with_timeout as _run_with_timeout
from torchrl_r2vpo.math_task.reward import (
    answers_match,
    extract_answer,
    math_reward,
    normalize_answer,
)

SLOW_PAIR = ("(a+b+c+d+e+f+g+h)^16", "(a+b+c+d+e+f+g+h+1)^16")  # unbounded expand takes seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"Thus \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{1} no wait \boxed{ 2 } or \fbox{\sqrt{3}}", r"\sqrt{3}"),
        (r"first \fbox{7}, then 9", "7"),
        ("#### 5\n" + r"\boxed{7", "5"),  # the unclosed box does not count
        (r"\boxed{3} but \boxed{4", "3"),
        ("#### 5\n<answer>6</answer> 8 " + r"\boxed{x+1}", "x+1"),
        ("step 12 * 3 = 36\n#### 36\n#### 1,234\n", "1,234"),
        ("I think 3. <answer>\n 42 \n</answer> then 7", "42"),
        ("We get 3 then 5.", "5"),
        ("a loss of -7 dollars", "-7"),
        ("1,234,567 people", "1,234,567"),
        ("the ratio is 3/4", "3/4"),
        ("x-5", "5"),
        ("it is 2.75 m long", "2.75"),
        ("The answer is .75.", ".75"),
        ("version 1.2.3", "3"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["", "no numbers here", r"\boxed{}", "<answer></answer>", r"\boxed{abc"])
def test_extract_answer_none(text):
    assert extract_answer(text) is None


def test_extract_answer_is_linear_on_long_inputs():
    for text in (r"\boxed{" * 3000, "{" * 10000 + "}" * 10000, "<answer>" * 2000, "1," * 5000):
        start = time.perf_counter()
        extract_answer(text)
        assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" 42. ", "42"),
        ("$1,234,567$", "1234567"),
        (r"\$5", "5"),
        (r"x = \dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\tfrac{3}{4}", r"\frac{3}{4}"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"1\!000\,000", "1000000"),
        (r"12\text{ cm}", "12"),
        (r"\text{yes}", "yes"),
        (r"30^\circ", "30"),
        (r"30^{\circ}", "30"),
        ("30°", "30"),
        (r"25\%", "25"),
        ("2 x + 1", "2x+1"),
        (r"\pi r^2", r"\pi r^2"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("0.5", "1/2"),
        ("1/2", r"\frac{1}{2}"),
        (r"\frac12", "0.5"),
        (r"\dfrac{3}{4}", "0.75"),
        ("-0.25", r"-\frac{1}{4}"),
        ("2.50", "2.5"),
        ("1,000", "1000"),
        ("$5$", "5"),
        ("x = 3", "3"),
        (r"10\text{ cm}", "10"),
        (r"90^\circ", "90"),
        ("2x+1", "1+2x"),
        ("x^2-1", "(x-1)(x+1)"),
        (r"\sqrt{8}", r"2\sqrt{2}"),
        (r"2\pi r", r"r \cdot 2 \times \pi"),
        (r"\frac{x}{2}", "0.5x"),
        (r"\frac{1}{x}+\frac1y", r"\frac{x+y}{xy}"),
        (r"\sqrt{2}+\sqrt{3}", r"\sqrt{5+2\sqrt{6}}"),
    ],
)
def test_answers_match_equivalent(prediction, reference):
    assert answers_match(prediction, reference)
    assert answers_match(reference, prediction)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [("2", "3"), ("1/3", "0.333"), ("x+1", "x+2"), ("x", "y"), ("", ""), ("1/0", "2"), ("0.5", "50")],
)
def test_answers_match_different(prediction, reference):
    assert not answers_match(prediction, reference)


@pytest.mark.parametrize(("completion", "reference"), [
    ("#### 17 * 13", "221"), (r"\boxed{36 - 7 * 12}", "-48"), ("<answer>(12 - 7) * 4</answer>", "20"),
    (r"\boxed{2^{10}}", "1024"), (r"\boxed{\frac{6}{2} + 1}", "4"),
])
def test_restating_the_question_does_not_answer_it(completion, reference):
    # the generated questions are expressions: a model copying one must not be rewarded
    assert math_reward(completion, reference) == 0.0
    answer = extract_answer(completion)
    assert not answers_match(answer, reference)
    assert answers_match(reference, answer)  # the value is right: the form is refused


@pytest.mark.parametrize("prediction, reference", [
    ("(-3)", "-3"), ("{-3}", "-3"), ("(3)", "3"), ("-(3)", "-3"), (r"\left(-3\right)", "-3"),
    ("-(-3)", "3"), ("((4))", "4"), ("(1/2)", "0.5"),
])
def test_a_number_in_brackets_is_a_number(prediction, reference):
    assert answers_match(prediction, reference) and answers_match(reference, prediction)


@pytest.mark.parametrize("minus", ["\u2212", "\u2012", "\u2013"])
def test_a_unicode_minus_keeps_the_sign(minus):
    assert math_reward(f"The answer is {minus}5.", "5") == 0.0
    assert math_reward(f"The answer is {minus}5.", "-5") == 1.0
    assert math_reward(f"\\boxed{{{minus}5}}", "-5") == 1.0
    assert answers_match(f"{minus}3/4", "-0.75")


@pytest.mark.parametrize(("completion", "reference", "reward"), [
    ("#### 18 dollars", "18", 1.0), ("#### 60 miles per hour", "60", 1.0), ("#### 60kg", "60", 1.0),
    ("#### 3/4 cup", "0.75", 1.0), ("#### 19 dollars", "18", 0.0), ("#### 3 x", "3", 0.0),
    ("#### 5 and 6", "5", 0.0), ("#### 17 * 13 apples", "221", 0.0),
])
def test_a_number_with_a_unit_answers_a_numeric_reference(completion, reference, reward):
    assert math_reward(completion, reference) == reward


def test_division_by_zero_does_not_raise():
    assert answers_match("1/0", "x") is False
    assert math_reward(r"\boxed{\frac{1}{0}}", "0") == 0.0


def test_math_reward_values():
    assert math_reward(r"so \boxed{\frac{1}{2}}", "0.5") == 1.0
    assert math_reward("The answer is\n#### 1,000", "1000", correct=2.0) == 2.0
    assert math_reward(r"\boxed{3}", "4", formatted=0.1) == 0.1
    assert math_reward(r"\boxed{3}", "4") == 0.0
    assert math_reward("no answer at all", "4", formatted=0.1) == 0.0


ADVERSARIAL = [
    "__import__('os').system('echo hi')",
    "__import__('builtins').setattr(__import__('sys'), 'pwned', 1)",
    "open('/etc/passwd').read()",
    "lambda: 1",
    "(lambda x: x)(1)",
    "x.real",
    "().__class__.__bases__[0].__subclasses__()",
    "9**9**9**9",
    "10^10^10",
    "2^{2^{2^{2^{2}}}}",
    "((2^16)^16)^16",
    "x**100000",
    "1" * 10000,
    "x+" * 5000 + "1",
    "(" * 5000 + "1" + ")" * 5000,
    r"\frac{" * 3000,
    r"\sqrt{" * 100 + "2" + "}" * 100,
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_inputs_are_rejected_quickly(text):
    for reference in ("0", "1", "x"):
        start = time.perf_counter()
        assert answers_match(text, reference) is False
        assert math_reward(rf"\boxed{{{text}}}", reference) == 0.0
        assert time.perf_counter() - start < 1.0
    assert not hasattr(sys, "pwned")


def test_model_text_is_never_evaluated(monkeypatch):
    calls = []

    def spy(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called")

        return fail

    monkeypatch.setattr(builtins, "eval", spy("eval"))
    monkeypatch.setattr(builtins, "exec", spy("exec"))
    monkeypatch.setattr(sympy, "sympify", spy("sympify"))
    monkeypatch.setattr(sympy.parsing.sympy_parser, "parse_expr", spy("parse_expr"))
    assert answers_match("x^2-1", "(x-1)(x+1)")
    assert answers_match(r"\sqrt{8}+\pi", r"\pi + 2\sqrt{2}")
    assert not answers_match("__import__('os')", "0")
    assert calls == []


def test_timeout_bounds_slow_symbolic_comparison():
    start = time.perf_counter()
    assert answers_match(*SLOW_PAIR, timeout=0.2) is False
    assert time.perf_counter() - start < 1.0


def test_symbolic_step_works_outside_main_thread():
    results = {}

    def worker():
        results["symbolic"] = answers_match("2x+1", "1+2x")
        results["different"] = answers_match("2x+1", "1+3x")
        results["numeric"] = answers_match("0.5", r"\frac12")
        start = time.perf_counter()
        results["slow"] = answers_match(*SLOW_PAIR, timeout=0.3)
        results["elapsed"] = time.perf_counter() - start

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=60)
    assert results["symbolic"] is True  # compared in a worker process
    assert results["different"] is False and results["numeric"] is True
    assert results["slow"] is False and results["elapsed"] < 3.0  # timed out, not hung


@pytest.fixture
def own_alarm():
    """Replaces any enclosing SIGALRM timer (pytest-timeout's) for the test, then restores it."""
    saved_handler = signal.getsignal(signal.SIGALRM)
    saved_timer = signal.getitimer(signal.ITIMER_REAL)
    fired = []
    signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    yield fired
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, saved_handler)
    if saved_timer[0] > 0:
        signal.setitimer(signal.ITIMER_REAL, *saved_timer)


def test_enclosing_alarm_is_restored(own_alarm):
    handler = signal.getsignal(signal.SIGALRM)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    assert answers_match("2x+1", "1+2x")
    assert 4.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 5.0
    assert signal.getsignal(signal.SIGALRM) is handler
    assert own_alarm == []


def test_enclosing_alarm_deadline_is_respected(own_alarm):
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    start = time.perf_counter()
    assert answers_match(*SLOW_PAIR, timeout=10.0) is False
    assert time.perf_counter() - start < 3.0
    time.sleep(0.05)
    assert own_alarm == [signal.SIGALRM]


def test_a_swallowed_timeout_is_raised_again():
    def stubborn():
        try:  # the first timeout lands here and is lost, as in a finaliser the GC runs
            while True:
                pass
        except BaseException:  # noqa: BLE001
            pass
        while True:
            pass

    start = time.perf_counter()
    assert _run_with_timeout(stubborn, 0.1) is None
    assert time.perf_counter() - start < 1.0


def test_a_timeout_lost_in_a_finaliser_is_retried_without_an_unraisable_report(monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    class Spinning:
        def __del__(self):  # the timeout lands here: Python cannot raise it out of __del__
            while True:
                pass

    def fn():
        Spinning()  # finalised at once
        while True:
            pass

    start = time.perf_counter()
    assert _run_with_timeout(fn, 0.1) is None
    assert time.perf_counter() - start < 1.0
    assert reported == [] and sys.unraisablehook == reported.append


LATEX_FRAGMENTS = [
    r"\boxed{", r"\fbox{", r"\frac{", r"\frac", r"\sqrt{", r"\sqrt", r"\text{", r"\left(", r"\right)",
    r"\pi", r"\cdot", r"\dfrac", "{", "}", "^", "**", "(", ")", "x", "y", "-", "+", "*", "/", ".", ",",
    " ", "=", "$", "%", "\n#### ", "<answer>", "</answer>", "9", "16", "0",
]  # fmt: skip
latexish = st.lists(
    st.one_of(st.sampled_from(LATEX_FRAGMENTS), st.text("0123456789", min_size=1, max_size=4)), max_size=60
).map("".join)
texts = st.one_of(st.text(max_size=300), latexish)


@settings(deadline=None, max_examples=200, database=None)
@given(texts, texts)
def test_fuzz_never_raises_and_is_fast(text, other):
    for call in (
        lambda: math_reward(text, other, timeout=0.5),
        lambda: answers_match(text, other, timeout=0.5),
        lambda: answers_match(other, text, timeout=0.5),
    ):
        start = time.perf_counter()
        result = call()
        assert time.perf_counter() - start < 1.0
        assert result in (0.0, 1.0)
    assert answers_match(text, text) == bool(normalize_answer(text))
    if extract_answer(text) is None:
        assert math_reward(text, other) == 0.0
