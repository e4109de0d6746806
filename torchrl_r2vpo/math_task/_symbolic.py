"""The symbolic stage of the verifier, and the worker process that runs it.

:func:`symbolic_equal` compares two normalised answers with sympy without evaluating text as
code: the text is tokenised against a whitelist (numbers, single-letter variables,
``+ - * / ^ **``, unary signs, parentheses or braces, ``\\frac``, ``\\sqrt{}``, ``\\cdot``,
``\\times``, ``\\pi``, implicit multiplication), parsed with :func:`ast.parse` and turned into
sympy objects node by node; anything else is rejected. Integer exponents are limited to
``|e| <= 16`` and numeric powers to 4096 bits. :func:`math_verify_equal` compares a completion
with a reference with Hugging Face's ``math_verify`` (imported on first use).

:func:`run_with_timeout` bounds a call with a ``SIGALRM`` timer, so it works on the main thread
of a process that has ``SIGALRM``. Everywhere else the comparison runs in a worker process: this
module, run as a script (``python _symbolic.py builtin``), imports only the standard library and
sympy (and ``math_verify`` for ``math-verify``), reads one JSON request a line from stdin
(``[job, a, b, timeout]``), runs it under :func:`run_with_timeout` on its own main thread and
writes ``[job, verdict]`` (true, false, or null for a timeout or an error) to stdout. It writes
``["ready"]`` once it has warmed up, ignores ``SIGINT`` (the parent handles Ctrl-C) and exits when
stdin closes. See :class:`~torchrl_r2vpo.math_task.VerifierPool`.
"""

from __future__ import annotations

import ast
import json
import operator
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import sympy

_T = TypeVar("_T")
_MAX_EXPONENT = 16
_MAX_POWER_BITS = 4096
_TOKEN = re.compile(r"\s*(?:([0-9]+(?:\.[0-9]+)?)|([A-Za-z]+)|(\*\*|[-+*/()]))")


class _Timeout(BaseException):
    """Raised by the SIGALRM handler of :func:`run_with_timeout`; not an ``Exception``, so
    that the ``except Exception`` of the code it interrupts does not catch it."""


_RETRY_S = 0.05  # a timeout that was swallowed is raised again this much later


def can_time_out_here() -> bool:
    """True where :func:`run_with_timeout` can set its timer: the main thread, with ``SIGALRM``,
    and no ``SIGALRM`` handler installed outside Python."""
    return (
        threading.current_thread() is threading.main_thread()
        and hasattr(signal, "setitimer")
        and signal.getsignal(signal.SIGALRM) is not None
    )


def run_with_timeout(fn: Callable[[], _T], timeout: float) -> _T | None:
    """Runs ``fn`` under a SIGALRM timer; None on timeout or where no timer can be set.

    An enclosing timer (e.g. pytest-timeout) is re-armed with its remaining time. A signal
    handler that runs inside a finaliser (a ``__del__`` or a garbage-collector callback in the
    middle of ``fn``) cannot raise out of it, so until ``fn`` has stopped the timeout is raised
    again every ``_RETRY_S`` seconds; the one lost there is not reported as unraisable.
    """
    if timeout <= 0 or not can_time_out_here():
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


def symbolic_equal(a: str, b: str) -> bool:
    """True when two normalised answers are equal sympy expressions; raises on text outside
    the whitelist. Unbounded in time: call it under :func:`run_with_timeout`."""
    diff = _to_sympy(a) - _to_sympy(b)
    if diff.has(sympy.zoo, sympy.nan, sympy.oo):
        return False
    return sympy.expand(diff) == 0 or sympy.simplify(diff) == 0


def math_verify_equal(completion: str, reference: str) -> bool:
    """``math_verify``'s verdict on a completion against a reference (written as in the
    dataset; it is parsed as ``$reference$``). math-verify's own ``signal.alarm`` timeouts are
    off: call it under :func:`run_with_timeout`."""
    from math_verify import parse, verify

    gold = parse(f"${reference}$", parsing_timeout=None)
    return bool(verify(gold, parse(completion, parsing_timeout=None), timeout_seconds=None))


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


COMPARERS: dict[str, Callable[[str, str], bool]] = {"builtin": symbolic_equal, "math-verify": math_verify_equal}
"""What a worker runs for each verifier: ``builtin`` takes two normalised answers, ``math-verify``
a completion and a reference."""

_WARM_UP = {  # the first comparisons of each kind import more of sympy: done before "ready"
    "builtin": [(r"\frac{x^2-1}{x+1}", r"\sqrt{4}x-x-1"), (r"\sqrt{2}+\sqrt{3}", r"\sqrt{5+2\sqrt{6}}")],
    "math-verify": [
        (r"\boxed{0.5}", r"\frac{1}{2}"), (r"\boxed{\{3, 2\sqrt{2}\}}", r"\{2\sqrt{2}, 3\}"),
        (r"\boxed{(1, \infty) \cup (-\infty, -1]}", r"(-\infty, -1] \cup (1, \infty)"),
        (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
        (r"\boxed{y = 2x+3\pi}", r"3\pi+2x"), (r"#### 1,200 km", "1200"), (r"\boxed{3+4i}", r"4i+3"),
    ],
}


def _serve(verifier: str) -> None:
    """The worker's loop; see the module docstring."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="ascii")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr, not the protocol
    if verifier == "math-verify":
        import logging

        logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": ours is on
    compare = COMPARERS[verifier]
    for a, b in _WARM_UP[verifier]:
        run_with_timeout(lambda: compare(a, b), 30.0)
    out.write('["ready"]\n')
    out.flush()
    for line in sys.stdin:
        job, a, b, timeout = json.loads(line)
        try:
            verdict = run_with_timeout(lambda: compare(a, b), timeout)
        except Exception:  # noqa: BLE001 - any failure on untrusted text means "no verdict"
            verdict = None
        out.write(json.dumps([job, None if verdict is None else bool(verdict)]) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve(sys.argv[-1])
