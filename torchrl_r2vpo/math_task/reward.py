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

Safety: model text is never evaluated as code. No ``eval``/``exec`` and no
``sympify``/``parse_expr`` (which call ``eval``). Text is tokenised against a
whitelist, parsed with :func:`ast.parse` and turned into sympy objects node by node;
anything else is rejected (no match). Integer exponents are limited to
``|e| <= 16`` and numeric powers to 4096 bits. Inputs over 200 characters are not
parsed symbolically, and the sympy step runs under a ``SIGALRM`` timer. Outside the
main thread (or without ``SIGALRM``, e.g. on Windows) the symbolic stage is skipped,
so only string and numeric matches count there. No public function raises on string input.
"""

from __future__ import annotations

import ast
import operator
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import TypeVar

import sympy

__all__ = ["answers_match", "extract_answer", "math_reward", "normalize_answer"]

_T = TypeVar("_T")
_MAX_SYMBOLIC_LEN = 200
_MAX_EXPONENT = 16
_MAX_POWER_BITS = 4096
_BOX_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|\{|\}")
_HASH_LINE = re.compile(r"^[ \t]*####[ \t]*(\S.*?)[ \t]*$", re.MULTILINE)
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])-)?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+|/[0-9]+)?"
)
_PLAIN = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:/[0-9]+)?")
_FRAC = re.compile(r"([-+]?)\\frac(?:\{([^{}]+)\}|([0-9]))(?:\{([^{}]+)\}|([0-9]))")
_TOKEN = re.compile(r"\s*(?:([0-9]+(?:\.[0-9]+)?)|([A-Za-z]+)|(\*\*|[-+*/()]))")
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
    ``<answer>...</answer>`` tag, then the last number (``-3``, ``2.5``, ``1,234``, ``3/4``).
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
    question restated) is not an answer. Other references are compared symbolically.
    Never raises; the symbolic stage is skipped outside the main thread (see module
    docstring) and gives up after ``timeout`` seconds.

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
        pred, ref = normalize_answer(prediction), normalize_answer(reference)
        if not pred or not ref:
            return False
        if pred == ref:
            return True
        pred_num, ref_num = _to_fraction(pred), _to_fraction(ref)
        if ref_num is not None:  # a number is answered by a number, not by an expression
            return pred_num == ref_num  # to evaluate (e.g. the question restated: 17 * 13)
        if max(len(pred), len(ref)) > _MAX_SYMBOLIC_LEN:
            return False
        return bool(_run_with_timeout(lambda: _symbolic_equal(pred, ref), timeout))
    except (Exception, _Timeout):  # noqa: BLE001 - any failure on untrusted text means "no match"
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
    try:
        answer = extract_answer(completion)
    except Exception:  # noqa: BLE001
        return 0.0
    if answer is None:
        return 0.0
    return correct if answers_match(answer, reference, timeout=timeout) else formatted


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


class _Timeout(BaseException):
    """Raised by the SIGALRM handler of :func:`_run_with_timeout`; not an ``Exception``, so
    that the ``except Exception`` of the code it interrupts does not catch it."""


_RETRY_S = 0.05  # a timeout that was swallowed is raised again this much later


def _run_with_timeout(fn: Callable[[], _T], timeout: float) -> _T | None:
    """Runs ``fn`` under a SIGALRM timer; None on timeout or where no timer can be set.

    An enclosing timer (e.g. pytest-timeout) is re-armed with its remaining time. A signal
    handler that runs inside a finaliser (a ``__del__`` or a garbage-collector callback in the
    middle of ``fn``) cannot raise out of it, so until ``fn`` has stopped the timeout is raised
    again every ``_RETRY_S`` seconds; the one lost there is not reported as unraisable.
    """
    in_main = threading.current_thread() is threading.main_thread()
    if not in_main or not hasattr(signal, "setitimer") or timeout <= 0:
        return None
    if signal.getsignal(signal.SIGALRM) is None:  # a handler set outside Python: leave it be
        return None
    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    running = True

    def _raise(signum: int, frame: object) -> None:
        if running:
            signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
            raise _Timeout

    outer_hook = sys.unraisablehook

    def _quiet(unraisable) -> None:  # a timeout lost in a finaliser is raised again, not lost
        if not isinstance(unraisable.exc_value, _Timeout):
            outer_hook(unraisable)

    old_handler = signal.signal(signal.SIGALRM, _raise)
    sys.unraisablehook = _quiet
    try:
        signal.setitimer(signal.ITIMER_REAL, min(timeout, outer_delay) if outer_delay > 0 else timeout)
        try:
            return fn()
        finally:
            running = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Timeout:
        return None
    finally:
        running = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        sys.unraisablehook = outer_hook
        if outer_delay > 0:
            left = max(outer_delay - (time.monotonic() - start), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


def _symbolic_equal(a: str, b: str) -> bool:
    diff = _to_sympy(a) - _to_sympy(b)
    if diff.has(sympy.zoo, sympy.nan, sympy.oo):
        return False
    return sympy.expand(diff) == 0 or sympy.simplify(diff) == 0


def _to_sympy(text: str) -> sympy.Expr:
    """Whitelisted LaTeX/ASCII math -> sympy, via tokens and ``ast`` (never ``eval``)."""
    tokens = _tokenize(_latex_to_python(text))
    return _build(ast.parse(" ".join(tokens), mode="eval").body)


def _latex_to_python(s: str) -> str:
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", " pi ")
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i):
            num, i = _latex_arg(s, i + 5)
            den, i = _latex_arg(s, i)
            out.append(f"(({_latex_to_python(num)})/({_latex_to_python(den)}))")
        elif s.startswith("\\sqrt", i):
            arg, i = _latex_arg(s, i + 5)
            out.append(f" sqrt({_latex_to_python(arg)})")
        elif s[i] == "^":  # a digit run is one exponent: 2^10 is 1024, as in plain text
            digits = re.match(r" *([0-9]+)", s[i + 1 :])
            arg, i = (digits[1], i + 1 + digits.end()) if digits else _latex_arg(s, i + 1)
            out.append(f"**({_latex_to_python(arg)})")
        elif s[i] == "\\":
            raise ValueError("unsupported LaTeX command")
        else:
            out.append({"{": "(", "}": ")"}.get(s[i], s[i]))
            i += 1
    return "".join(out)


def _latex_arg(s: str, i: int) -> tuple[str, int]:
    """The braced group or single character at ``s[i:]`` and the index after it."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s) or s[i] in "\\}[":
        raise ValueError("missing LaTeX argument")
    if s[i] != "{":
        return s[i], i + 1
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1 : j], j + 1
    raise ValueError("unbalanced braces")


def _tokenize(s: str) -> list[str]:
    """Whitelisted tokens with explicit ``*`` for implicit products; decimals -> ratios."""
    tokens, pos = [], 0
    for match in _TOKEN.finditer(s):
        if match.start() != pos:
            raise ValueError("unexpected character")
        pos = match.end()
        number, word, op = match.groups()
        if word is not None and word not in ("pi", "sqrt") and len(word) > 2:
            raise ValueError("words are not math")
        parts = [word] if word in ("pi", "sqrt") else list(word or "") or [number or op]
        for part in parts:
            ends_operand = tokens and (tokens[-1] == ")" or tokens[-1][0].isalnum())
            if ends_operand and tokens[-1] != "sqrt" and (part == "(" or part[0].isalnum()):
                if tokens[-1][0].isdigit() and part[0].isdigit():
                    raise ValueError("two adjacent numbers")
                tokens.append("*")
            tokens.append(part)
    if s[pos:].strip():
        raise ValueError("unexpected character")
    return [_decimal_to_ratio(t) if "." in t else t for t in tokens]


def _decimal_to_ratio(token: str) -> str:
    whole, frac = token.split(".")
    return f"({int(whole + frac)}/{10 ** len(frac)})"


_BIN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _build(node: ast.AST) -> sympy.Expr:
    """Sympy expression from a whitelisted AST node; ValueError for anything else."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return sympy.Integer(node.value)
    if isinstance(node, ast.Name) and (len(node.id) == 1 or node.id == "pi"):
        return sympy.pi if node.id == "pi" else sympy.Symbol(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _build(node.operand)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        return _BIN_OPS[type(node.op)](_build(node.left), _build(node.right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return _power(_build(node.left), _build(node.right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt":
        if len(node.args) == 1 and not node.keywords:
            return sympy.sqrt(_build(node.args[0]))
    raise ValueError(f"disallowed syntax: {type(node).__name__}")


def _power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    if not exponent.is_Integer or abs(int(exponent)) > _MAX_EXPONENT:
        raise ValueError("exponent must be a small integer")
    if base.is_Rational:
        bits = max(int(base.p).bit_length(), int(base.q).bit_length())
        if bits * abs(int(exponent)) > _MAX_POWER_BITS:
            raise ValueError("power too large")
    return base ** exponent
