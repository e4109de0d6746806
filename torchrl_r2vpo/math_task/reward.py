"""Rule-based rewards for language models solving math problems.

:func:`extract_answer` reads a final answer from a completion (last ``\\boxed{}``
or ``\\fbox{}``, else a GSM8K ``#### answer`` line, else ``<answer>...</answer>``,
else the last number). :func:`answers_match` compares two answers in three stages:
equal strings after :func:`normalize_answer`; equal numbers (exact rational
arithmetic with :class:`fractions.Fraction`: ``0.5 == 1/2 == \\frac{1}{2} == \\frac12``);
equal expressions for sympy. The symbolic stage accepts numbers, single-letter
variables, ``+ - * / ^ **``, unary signs, parentheses or braces, ``\\frac``,
``\\sqrt{}``, ``\\cdot``, ``\\times``, ``\\pi`` and implicit multiplication (``2x``);
an unbraced exponent is a whole digit run (``2^10`` is 1024, as in plain text).
:func:`math_reward` scores one completion, :func:`score_batch` many at once, and
:func:`math_verify_reward` (or ``score_batch(..., verifier="math-verify")``) adds Hugging
Face's ``math_verify`` as a last stage, for GSM8K and MATH.

Safety: model text is never evaluated as code. No ``eval``/``exec`` and no
``sympify``/``parse_expr`` (which call ``eval``). Text is tokenised against a
whitelist, parsed with :func:`ast.parse` and turned into sympy objects node by node;
anything else is rejected (no match). Integer exponents are limited to
``|e| <= 16`` and numeric powers to 4096 bits. Inputs over 200 characters are not
parsed symbolically, and the sympy step stops after ``timeout`` seconds: under a
``SIGALRM`` timer on the main thread, and elsewhere (other threads, platforms without
``SIGALRM``, and every :func:`score_batch`) in worker processes of a
:class:`~torchrl_r2vpo.math_task.VerifierPool`, each under its own timer and killed if
it overruns. math-verify (whose number extraction calls sympy's ``parse_expr`` on
digits and operators) runs only in those workers. No public function raises on string
input, except for the documented errors of :func:`score_batch` and :func:`math_verify_reward`.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal

from torchrl_r2vpo.math_task._symbolic import can_time_out_here, run_with_timeout, symbolic_equal
from torchrl_r2vpo.math_task.verifier_pool import default_pool, VERIFIERS, VerifierPool, WorkerStartError

__all__ = ["answers_match", "extract_answer", "math_reward", "math_verify_reward", "normalize_answer", "score_batch"]

_MAX_SYMBOLIC_LEN = 200
_BOX_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|\{|\}")
_HASH_LINE = re.compile(r"^[ \t]*####[ \t]*(\S.*?)[ \t]*$", re.MULTILINE)
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])-)?"
    r"(?:(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+|/[0-9]+)?|(?<![\w.])\.[0-9]+)"
)
_UNIT_WORDS = re.compile(r"(.*[0-9])\s*[A-Za-z]{2,}(?: [A-Za-z]+)*")  # "60km", "3apples per box"
_PLAIN = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:/[0-9]+)?")
_FRAC = re.compile(r"([-+]?)\\frac(?:\{([^{}]+)\}|([0-9]))(?:\{([^{}]+)\}|([0-9]))")
_UNITS = re.compile(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\{[^{}]*\}$")
_UNWRAP = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_MAX_BRACKETS = 4  # levels of brackets around a number that are peeled
_WRAPPED = re.compile(r"([-+]?)(?:\((.*)\)|\{(.*)\})")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-"})  # minus, dashes
_ASSIGN = re.compile(r"^\\?[A-Za-z]+(?:_\{?\w+\}?)?\s*=(?!=)\s*(?=\S)")


def extract_answer(text: str) -> str | None:
    """Returns the final answer of a completion, or None when there is none.

    Priority: the last closed ``\\boxed{}``/``\\fbox{}`` (nested braces allowed; an
    unclosed one does not count), the last ``#### answer`` line, the last
    ``<answer>...</answer>`` tag, then the last number (``-3``, ``2.5``, ``.5``, ``1,234``, ``3/4``).
    The Unicode minus sign and figure and en dashes are read as ``-``.

    Examples:
        >>> extract_answer(r"so \\boxed{1} or rather \\boxed{\\frac{1}{2}}")
        '\\\\frac{1}{2}'
        >>> extract_answer("Total: 5 + 7\\n#### 12")
        '12'
        >>> extract_answer("<answer> x = 3 </answer>")
        'x = 3'
        >>> extract_answer("It costs 1,234 dollars, not 3/4 of -5.5")
        '-5.5'
        >>> extract_answer("no idea") is None
        True
    """
    text = text.translate(_MINUS_SIGNS)
    for finder in (_last_boxed, _last_hash_line, _last_answer_tag, _last_number):
        answer = finder(text)
        if answer:
            return answer
    return None


def _last_boxed(text: str) -> str | None:
    stack: list[int | None] = []  # content start of a boxed opener, None for a plain "{"
    best: tuple[int, int] | None = None
    for match in _BOX_TOKEN.finditer(text):
        token = match.group()
        if token == "}":
            start = stack.pop() if stack else None
            if start is not None and (best is None or start > best[0]):
                best = (start, match.start())
        else:
            stack.append(match.end() if token != "{" else None)
    return text[best[0] : best[1]].strip() if best else None


def _last_hash_line(text: str) -> str | None:
    matches = _HASH_LINE.findall(text)
    return matches[-1] if matches else None


def _last_answer_tag(text: str) -> str | None:
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, max(end, 0))
    return text[start + len("<answer>") : end].strip() if start >= 0 else None


def _last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


def normalize_answer(answer: str) -> str:
    """Canonicalises the surface form of an answer for string comparison.

    Removes ``$``, ``\\left``/``\\right``, thin spaces (``\\!``, ``\\,``, ``\\;``),
    trailing ``\\text{...}`` units (other ``\\text{}`` are unwrapped), degree signs,
    thousands separators, a leading ``x =`` and a trailing period, maps
    ``\\dfrac``/``\\tfrac`` to ``\\frac`` and Unicode minus signs and dashes to ``-``, and
    drops spaces not between letters.
    The percent sign is dropped (``50\\%`` matches ``50``, not ``0.5``): references
    in GSM8K and MATH state percentages without it.

    Examples:
        >>> normalize_answer(r" $x = \\dfrac{1}{2}$. ")
        '\\\\frac{1}{2}'
        >>> normalize_answer(r"1,234\\text{ cm}")
        '1234'
        >>> normalize_answer(r"45^\\circ"), normalize_answer(r"50\\%"), normalize_answer("2 x + 1")
        ('45', '50', '2x+1')
    """
    s = answer.translate(_MINUS_SIGNS).strip().replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])|\\[!,;: ]|\\displaystyle", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree|\\%|%", "", s)
    s = _UNWRAP.sub(r"\1", _UNITS.sub("", s.strip()))
    s = _ASSIGN.sub("", s.strip())
    s = re.sub(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))", "", s)
    s = re.sub(r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])", "", re.sub(r"\s+", " ", s))
    return s.removesuffix(".").strip()


def answers_match(prediction: str, reference: str, *, timeout: float = 1.0) -> bool:
    """True when two answers are equal as strings, numbers or sympy expressions.

    A numeric reference (``221``, ``-3/4``, ``\\frac{3}{4}``, ``0.5``) is matched only by
    a number of the same value: an expression that evaluates to it (``17 * 13``, the
    question restated) is not an answer. Other references are compared symbolically, for at
    most ``timeout`` seconds: in this process on the main thread, in a worker process of the
    shared :class:`~torchrl_r2vpo.math_task.VerifierPool` elsewhere (see the module
    docstring). Never raises. To compare many answers, :func:`score_batch` runs the symbolic
    comparisons in parallel.

    Examples:
        >>> answers_match("0.5", r"\\frac12"), answers_match("$1,000$", "1000")
        (True, True)
        >>> answers_match("x^2-1", "(x-1)(x+1)"), answers_match("2", "3")
        (True, False)
        >>> answers_match("17 * 13", "221"), answers_match("221", "221.0")
        (False, True)
        >>> answers_match("__import__('os').system('ls')", "0")
        False
    """
    try:
        verdict = _fast_match(prediction, reference)
        if isinstance(verdict, bool):
            return verdict
        if can_time_out_here():
            return bool(run_with_timeout(lambda: symbolic_equal(*verdict), timeout))
        return _in_workers([verdict], timeout, None)[0]
    except Exception:  # noqa: BLE001 - any failure on untrusted text means "no match"
        return False


def math_reward(
    completion: str, reference: str, *, correct: float = 1.0, formatted: float = 0.0, timeout: float = 1.0
) -> float:
    """Reward of a completion: ``correct`` if right, ``formatted`` if wrong, 0 if no answer.

    Examples:
        >>> math_reward(r"... so the answer is \\boxed{42}.", "42")
        1.0
        >>> math_reward(r"\\boxed{41}", "42", formatted=0.1), math_reward("I give up", "42")
        (0.1, 0.0)
    """
    answer = _extract(completion)
    if answer is None:
        return 0.0
    return correct if answers_match(answer, reference, timeout=timeout) else formatted


def score_batch(
    completions: Sequence[str],
    references: Sequence[str],
    *,
    correct: float = 1.0,
    formatted: float = 0.0,
    timeout: float = 1.0,
    verifier: Literal["builtin", "math-verify"] = "builtin",
    pool: VerifierPool | None = None,
) -> list[float]:
    """Rewards of many completions, with the slow comparisons run in parallel.

    With ``verifier="builtin"`` the scores equal ``[math_reward(c, r, ...) for c, r in ...]``.
    Extraction and the string and numeric stages run in this process (a numeric reference,
    as in the arithmetic task and GSM8K, never needs more); the pairs that need the symbolic
    stage go to the worker processes of ``pool`` (default: one shared per verifier), which
    compare them in parallel, each for at most ``timeout`` seconds. So a batch costs about one
    timeout however many of its completions are slow to compare, and works from any thread.

    With ``verifier="math-verify"`` a completion is right when its extracted answer equals
    the reference as a string or number (the in-process stages above), or else, unless that
    answer is a plain number (an integer, decimal or fraction, which exact arithmetic has
    already judged: ``0.3333333`` is not ``\\frac{1}{3}``, ``2.83`` is not ``2\\sqrt{2}``), when
    Hugging Face's ``math_verify`` says so (``verify(parse("$reference$"), parse(completion))``,
    in the workers, under the same timeout). It reads the sets, intervals, tuples, matrices,
    mixed numbers, lists and scientific notation that the builtin stages do not; see
    ``benchmarks/verifier_compare.py``. It needs ``pip install "torchrl_r2vpo[math-verify]"``.
    ``formatted`` goes to a wrong completion whose answer :func:`extract_answer` finds.

    Raises:
        ValueError: the two sequences differ in length, or an unknown ``verifier``.
        ImportError: ``verifier="math-verify"`` without the ``math-verify`` package.
        RuntimeError: ``verifier="math-verify"`` and its worker processes cannot start.

    Examples:
        >>> completions = [r"\\boxed{\\frac12}", "#### 7", r"\\boxed{(x-1)(x+1)}", "no answer"]
        >>> score_batch(completions, ["0.5", "8", "x^2-1", "1"], formatted=0.1)
        [1.0, 0.1, 1.0, 0.0]
    """
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r}; expected one of {VERIFIERS}")
    if pool is not None and pool.verifier != verifier:
        raise ValueError(f"the pool runs {pool.verifier!r}, not {verifier!r}")
    if verifier == "math-verify" and importlib.util.find_spec("math_verify") is None:
        raise ImportError('verifier="math-verify" needs the math-verify package: '
                          'pip install "torchrl_r2vpo[math-verify]"')
    scores = [0.0] * len(completions)
    slow: dict[int, tuple[str, str]] = {}  # index -> the pair the workers compare
    for i, (completion, reference) in enumerate(zip(completions, references)):
        answer = _extract(completion)
        try:
            verdict = False if answer is None else _fast_match(answer, reference)
        except Exception:  # noqa: BLE001
            verdict = False
        if verdict is True:
            scores[i] = correct
            continue
        if answer is not None:
            scores[i] = formatted
        if verifier == "math-verify":
            if isinstance(completion, str) and isinstance(reference, str) and not _is_number(answer):
                slow[i] = (completion, reference)
        elif isinstance(verdict, tuple):
            slow[i] = verdict
    if slow:
        verdicts = _in_workers(list(slow.values()), timeout, pool, verifier)
        for i, right in zip(slow, verdicts):
            if right:
                scores[i] = correct
    return scores


def math_verify_reward(
    completion: str, reference: str, *, correct: float = 1.0, formatted: float = 0.0, timeout: float = 1.0
) -> float:
    """:func:`math_reward` with Hugging Face's ``math_verify`` as the last stage: the reward
    for GSM8K and MATH (:func:`~torchrl_r2vpo.math_task.load_hf_math`), as
    ``score_batch([completion], [reference], verifier="math-verify", ...)[0]``.

    math-verify runs in a worker process, so this works from any thread; score a batch at
    once with :func:`score_batch` to compare in parallel. Needs
    ``pip install "torchrl_r2vpo[math-verify]"``.

    Example (with math-verify installed)::

        math_verify_reward(r"so the answer is \\boxed{\\{3, 2, 1\\}}", r"\\{1, 2, 3\\}")  # 1.0
    """
    return score_batch([completion], [reference], correct=correct, formatted=formatted, timeout=timeout,
                       verifier="math-verify")[0]


def _extract(completion: str) -> str | None:
    try:
        return extract_answer(completion)
    except Exception:  # noqa: BLE001
        return None


def _is_number(answer: str | None) -> bool:
    try:
        return answer is not None and _to_fraction(normalize_answer(answer)) is not None
    except Exception:  # noqa: BLE001
        return False


def _fast_match(prediction: str, reference: str) -> bool | tuple[str, str]:
    """The string and numeric stages of :func:`answers_match`: its verdict, or the
    normalised pair when only the symbolic stage can decide."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:
        return False
    if pred == ref:
        return True
    pred_num, ref_num = _to_fraction(pred), _to_fraction(ref)
    if ref_num is not None:  # a number is answered by a number, not by an expression
        if pred_num is None and (unit := _UNIT_WORDS.fullmatch(pred)):  # or by one with a unit
            pred_num = _to_fraction(unit[1])
        return pred_num == ref_num  # to evaluate (e.g. the question restated: 17 * 13)
    if max(len(pred), len(ref)) > _MAX_SYMBOLIC_LEN:
        return False
    return pred, ref


def _in_workers(
    pairs: list[tuple[str, str]], timeout: float, pool: VerifierPool | None, verifier: str = "builtin"
) -> list[bool]:
    """``pool.compare``; where no worker can start, the builtin verifier warns once and
    compares in this process (main thread) or not at all (other threads)."""
    try:
        return (pool or default_pool(verifier)).compare(pairs, timeout=timeout)
    except WorkerStartError as err:
        if verifier != "builtin":
            raise
        if not _WARNED:
            _WARNED.append(True)
            warnings.warn(f"{err}; the symbolic stage of the verifier runs in this process, and is "
                          "skipped outside the main thread", RuntimeWarning, stacklevel=3)
        if not can_time_out_here():
            return [False] * len(pairs)
        return [bool(run_with_timeout(lambda p=p: symbolic_equal(*p), timeout)) for p in pairs]


_WARNED: list[bool] = []


def _to_fraction(s: str) -> Fraction | None:
    """Exact value of a plain number, ``a/b`` or ``\\frac{a}{b}``, possibly signed and in
    up to 4 levels of parentheses or braces (``-(3)``, ``{-3}``); None otherwise."""
    try:
        for _ in range(_MAX_BRACKETS):  # peel brackets, keeping an outer sign
            wrapped = _WRAPPED.fullmatch(s)
            if wrapped is None:
                break
            inner = wrapped[2] if wrapped[2] is not None else wrapped[3]
            if wrapped[1] == "-":
                inner = inner[1:] if inner.startswith("-") else "-" + inner.removeprefix("+")
            s = inner
        if _PLAIN.fullmatch(s):
            return Fraction(s)
        match = _FRAC.fullmatch(s)
        if match and _PLAIN.fullmatch(num := match[2] or match[3]):
            if _PLAIN.fullmatch(den := match[4] or match[5]):
                value = Fraction(num) / Fraction(den)
                return -value if match[1] == "-" else value
    except (ValueError, ZeroDivisionError):
        pass
    return None
