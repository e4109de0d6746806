"""Agreement and speed of the math-answer verifiers on labelled GSM8K/MATH-style pairs.

Each pair is a model completion, the dataset's reference answer and a label (is the completion
right?) set by hand. Completions end the way the datasets' solutions do: GSM8K-style ones reason
in words and end with ``#### answer`` or a closing sentence, MATH-style ones end with
``\\boxed{answer}`` (in one template after a first, wrong box). The answers cover integers,
decimals, thousands separators, fractions (``3/4``, ``\\frac``, ``\\dfrac``, mixed numbers),
units and currency, percentages, degrees, roots and ``\\pi``, polynomials and rational
functions, equations, lists and sets of solutions, intervals and unions, points, matrices,
complex numbers, multiple-choice letters and words, each with equivalent forms (label True) and
wrong answers (label False), among them decimal approximations of exact answers (``0.3333333``
for ``\\frac{1}{3}``: wrong, as MATH grades them).

Verifiers:

* ``builtin``: :func:`torchrl_r2vpo.math_task.math_reward`, one completion at a time;
* ``builtin-batch``: :func:`torchrl_r2vpo.math_task.score_batch` (symbolic stage in worker
  processes; same verdicts);
* ``math-verify``: Hugging Face's ``math_verify`` alone, as its README uses it
  (``verify(parse("$reference$"), parse(completion))``), one at a time, in this process;
* ``math-verify-batch``: ``score_batch(..., verifier="math-verify")``: the builtin string and
  numeric stages, then math-verify in worker processes for what they do not accept.

Agreement is the share of pairs a verifier scores as labelled, over all pairs and per style and
per kind. Speed is pairs per second over the whole set, median over ``--repeats`` passes (the
first pass also warms caches and starts the worker processes, and is not counted). Run it with::

    python benchmarks/verifier_compare.py --out benchmarks/results/verifier
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import sympy

from torchrl_r2vpo.math_task import generate_problems, math_reward, score_batch, VerifierPool


class Pair(NamedTuple):
    completion: str
    reference: str
    label: bool
    style: str  # "gsm8k" or "math"
    kind: str


# GSM8K: (reference, kind, right answers, wrong answers); references are what follows "####"
GSM8K = [
    ("18", "integer", ["18", "18.0", "18.00", "$18", "18 dollars", r"\$18"], ["17", "-18", "81", "1.8", "180"]),
    ("72", "integer", ["72", "72 clips", "72.0"], ["48", "27", "7.2"]),
    ("5", "integer", ["5", "5 hours", "+5", "05"], ["6", "-5", "0.5"]),
    ("1200", "thousands", ["1,200", "1200", "$1,200", "1200.00", "1 200"], ["120", "12000", "1,201"]),
    ("1000000", "thousands", ["1,000,000", "1000000", "$1,000,000"], ["100000", "1,000,001"]),
    ("35000", "thousands", ["35,000", "35000", "$35,000.00"], ["3500", "35"]),
    ("-5", "negative", ["-5", "\u22125", "-5.0"], ["5", "-6"]),
    ("-12", "negative", ["-12", "-12.00"], ["12", "-21"]),
    ("2.5", "decimal", ["2.5", "2.50", "5/2"], ["25", "2.05", "2"]),
    ("0.75", "decimal", ["0.75", ".75", "3/4"], ["75", "0.7", "7.5"]),
    ("12.25", "decimal", ["12.25", "$12.25", "49/4"], ["12.5", "1225"]),
    ("25", "percent", ["25%", "25 %", "25 percent"], ["20%", "2.5%", "0.25"]),
    ("60", "unit", ["60 km", "60 miles per hour", "60 minutes", "60kg"], ["6 km", "600 m"]),
    ("3", "unit", ["3 apples", "3 m", "3 cups"], ["4 apples", "30 m"]),
    ("8", "integer", ["8", "8 cookies", "eight (8)"], ["9", "16"]),
]
GSM8K_TEMPLATES = [
    "She starts with 3 bags of 12 items, so 3 * 12 = 36 items. Then she gives away some.\n#### {}",
    "First, 20 + 15 = 35. Then 35 - 10 = 25. So the final answer is {}.",
    "Each box holds 4. With 7 boxes that is 28, minus the 2 broken ones.\nThe answer is {}",
]

# MATH: (reference, kind, right answers, wrong answers); references are what the solution boxes
MATH = [
    (r"\frac{3}{4}", "fraction",
     [r"\frac{3}{4}", r"\dfrac{3}{4}", "3/4", "0.75", r"\frac{6}{8}", r"\tfrac34", r"\frac34"],
     [r"\frac{4}{3}", "0.7", r"\frac{3}{5}", "34"]),
    (r"\frac{1}{2}", "fraction", [r"\frac12", "0.5", "1/2", r"\frac{2}{4}", r"\dfrac{1}{2}"],
     [r"\frac{1}{3}", "2", "0.05"]),
    (r"-\frac{7}{3}", "fraction", [r"-\frac{7}{3}", r"\frac{-7}{3}", "-7/3", r"-\dfrac{7}{3}"],
     [r"\frac{7}{3}", r"-\frac{3}{7}", "-2.33"]),
    (r"\frac{1}{3}", "fraction", [r"\frac13", r"\frac{2}{6}", "1/3"], ["0.333", "0.3333333", "3"]),
    (r"\frac{9}{4}", "fraction", [r"\frac94", "2.25", r"2\frac{1}{4}"], [r"\frac{4}{9}", "2.5"]),
    ("12", "integer", ["12", "12.0", r"12.", r"{12}"], ["13", "-12", "21"]),
    ("-4", "integer", ["-4", r"-4.0", "(-4)"], ["4", "-3"]),
    ("1024", "integer", ["1024", "1,024", r"1{,}024"], ["1042", "2048"]),
    ("0.6", "decimal", ["0.6", "0.60", r"\frac{3}{5}", r".6"], ["0.06", "6"]),
    (r"2\sqrt{2}", "root", [r"2\sqrt{2}", r"\sqrt{8}", r"2\sqrt2", r"\sqrt{2}\cdot 2", r"\sqrt{2} \times 2"],
     [r"\sqrt{2}", "4", r"2\sqrt{3}", "2.83", "2.8284271"]),
    (r"\frac{\sqrt{3}}{2}", "root",
     [r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}", r"\frac{1}{2}\sqrt{3}", r"\sqrt{3}/2", r"\frac{3}{2\sqrt{3}}"],
     [r"\frac{\sqrt{2}}{2}", r"\frac{1}{2}", r"\sqrt{3}", "0.8660254"]),
    (r"5\sqrt{3}", "root", [r"5\sqrt{3}", r"\sqrt{75}", r"5 \sqrt 3"], [r"3\sqrt{5}", r"\sqrt{15}"]),
    (r"1+\sqrt{5}", "root", [r"1+\sqrt{5}", r"\sqrt{5}+1", r"\sqrt5 + 1"], [r"1-\sqrt{5}", r"\sqrt{6}"]),
    (r"2\pi", "pi", [r"2\pi", r"\pi \cdot 2", r"2 \pi", r"\pi\times2"], [r"\pi", "6.28", r"4\pi", "6.283185307"]),
    (r"\frac{\pi}{4}", "pi", [r"\frac{\pi}{4}", r"\pi/4", r"\frac14\pi", r"0.25\pi", r"\frac{1}{4}\pi"],
     [r"\frac{\pi}{2}", "45", r"4\pi"]),
    (r"36\pi", "pi", [r"36\pi", r"36 \pi", r"\pi \cdot 36"], [r"12\pi", "36"]),
    ("x^2-1", "polynomial", ["(x-1)(x+1)", "x^2 - 1", "-1+x^2", "x^{2}-1"], ["x^2+1", "(x-1)^2", "x^2"]),
    ("3x+2", "polynomial", ["2+3x", "3x + 2", r"x\cdot 3+2", "3 x+2"], ["3x-2", "3x", "2x+3"]),
    ("x^2+7x+10", "polynomial", ["(x+2)(x+5)", "x^2+7x+10", "10+7x+x^2"], ["(x+2)(x-5)", "x^2+10"]),
    ("2a-3b", "polynomial", ["2a-3b", "-3b+2a", "2a - 3b"], ["3b-2a", "2a+3b"]),
    (r"\frac{x+1}{x-1}", "rational", [r"\frac{x+1}{x-1}", "(x+1)/(x-1)", r"\frac{1+x}{x-1}", r"\dfrac{x+1}{x-1}"],
     [r"\frac{x-1}{x+1}", r"\frac{x+1}{x}"]),
    (r"\frac{1}{x}", "rational", [r"\frac1x", "1/x", "x^{-1}"], ["x", r"-\frac{1}{x}"]),
    ("y=2x+3", "equation", ["y = 2x+3", "y=3+2x", "2x+3"], ["y=2x-3", "y=3x+2"]),
    ("x=5", "equation", ["x=5", "5", "x = 5"], ["x=-5", "x=6"]),
    ("-3, 2", "list", ["-3, 2", "2, -3", "-3,2", r"2,\ -3"], ["2", "3, -2", "-3", "-3, 2, 4"]),
    ("1, 2, 3", "list", ["1,2,3", "3, 2, 1", "1, 3, 2"], ["1, 2", "1, 2, 4"]),
    (r"\{1, 2, 3\}", "set", [r"\{1,2,3\}", r"\{3, 2, 1\}", r"\{1, 3, 2\}", r"\left\{1,2,3\right\}"],
     [r"\{1, 2\}", r"\{1,2,4\}"]),
    (r"(-\infty, 2]", "interval", [r"(-\infty,2]", r"(-\infty, 2]", r"\left(-\infty, 2\right]"],
     [r"(-\infty, 2)", r"[2, \infty)", r"(-\infty,3]"]),
    ("[1, 5)", "interval", ["[1,5)", r"\left[1, 5\right)", "[1, 5)"], ["(1,5)", "[1,5]", "[1, 6)"]),
    (r"(-\infty, -1) \cup (1, \infty)", "interval",
     [r"(-\infty,-1)\cup(1,\infty)", r"(1, \infty) \cup (-\infty, -1)", r"(-\infty, -1)\cup (1,\infty)"],
     [r"(-1, 1)", r"(-\infty,-1]\cup[1,\infty)"]),
    ("(0, 3]", "interval", ["(0,3]", r"\left(0,3\right]"], ["[0,3]", "(0,3)"]),
    ("(1, -2)", "point", ["(1,-2)", r"\left(1, -2\right)", "(1, -2)"], ["(-2, 1)", "(1, 2)", r"\{1, -2\}"]),
    (r"\left(\frac{1}{2}, 3\right)", "point", ["(0.5, 3)", r"\left(\frac12, 3\right)", r"(\frac{1}{2},3)"],
     ["(2,3)", "(3, 0.5)"]),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "matrix",
     [r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"],
     [r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 3 \end{pmatrix}"]),
    (r"\begin{pmatrix} 2 & 0 \\ 0 & 2 \end{pmatrix}", "matrix",
     [r"\begin{pmatrix}2&0\\0&2\end{pmatrix}"], [r"\begin{pmatrix} 2 & 0 \\ 0 & 1 \end{pmatrix}"]),
    (r"30^\circ", "degrees", ["30", r"30^{\circ}", "30°", r"30^\circ"], ["60", r"60^\circ"]),
    ("45", "degrees", [r"45^\circ", "45", "45°"], ["135", r"30^\circ"]),
    (r"12\text{ cm}", "unit", ["12", r"12 \text{cm}", r"12\mbox{ cm}", r"12\text{ cm}"], [r"13\text{ cm}", "1.2"]),
    (r"\$5.40", "unit", ["5.40", r"\$5.4", "5.4", r"\$5.40"], ["5.04", "540"]),
    ("25\\%", "percent", ["25", r"25\%"], [r"2.5\%", "75"]),
    ("1500", "scientific", [r"1.5\times 10^3", "1,500", "1500"], ["150", r"1.5\times 10^2"]),
    ("3+4i", "complex", ["3+4i", "4i+3"], ["3-4i", "4+3i"]),
    (r"\text{(C)}", "choice", ["C", "(C)", r"\text{(C)}", r"\textbf{(C)}"], ["B", r"\text{(A)}"]),
    (r"\text{even}", "word", [r"\text{even}", "even", r"\text{ even }"], [r"\text{odd}", "neither"]),
    (r"\infty", "infinity", [r"\infty"], [r"-\infty", "0"]),
    ("1011_2", "base", ["1011_2", "1011_{2}"], ["1101_2", "1111_2"]),
    (r"\sqrt{5}-1", "root", [r"-1+\sqrt{5}", r"\sqrt{5} - 1"], [r"1-\sqrt{5}", r"\sqrt{4}"]),
    (r"\frac{5}{2}", "fraction", [r"2\frac{1}{2}", "2.5", r"\frac{10}{4}"], [r"\frac{2}{5}", "2.4"]),
    ("7", "integer", ["7", r"\text{7}", "7.0"], ["8", "-7"]),
]
MATH_TEMPLATES = [
    "We substitute and simplify, so the answer is $\\boxed{{{}}}$.",
    "A first try gives $\\boxed{{0}}$, which fails the check; redoing it, \\[\\boxed{{{}}}\\] as required.",
]


def pairs() -> list[Pair]:
    """The labelled set: every answer of each row in each template of its style."""
    out = []
    for rows, templates, style in ((GSM8K, GSM8K_TEMPLATES, "gsm8k"), (MATH, MATH_TEMPLATES, "math")):
        for reference, kind, right, wrong in rows:
            for template in templates:
                out += [Pair(template.format(a), reference, True, style, kind) for a in right]
                out += [Pair(template.format(a), reference, False, style, kind) for a in wrong]
    return out


def math_verify_one() -> Callable[[str, str], bool]:
    """math-verify's recommended use: the reference in ``$...$``, the completion as written."""
    from math_verify import parse, verify

    return lambda completion, reference: bool(verify(parse(f"${reference}$"), parse(completion)))


def run(data: list[Pair], repeats: int, timeout: float) -> dict:
    completions, references = [p.completion for p in data], [p.reference for p in data]
    verifiers: dict[str, Callable[[], list[bool]]] = {
        "builtin": lambda: [math_reward(c, r, timeout=timeout) == 1.0 for c, r in zip(completions, references)],
    }
    pool = VerifierPool()
    verifiers["builtin-batch"] = lambda: [
        s == 1.0 for s in score_batch(completions, references, timeout=timeout, pool=pool)]
    try:
        one = math_verify_one()
    except ImportError:
        print("math-verify is not installed: pip install math-verify")
    else:
        verifiers["math-verify"] = lambda: [one(c, r) for c, r in zip(completions, references)]
        mv_pool = VerifierPool(verifier="math-verify")
        verifiers["math-verify-batch"] = lambda: [
            s == 1.0 for s in score_batch(completions, references, timeout=timeout, verifier="math-verify",
                                          pool=mv_pool)]
    report: dict = {"pairs": len(data), "verifiers": {}}
    try:
        for name, verify in verifiers.items():
            passes = [verify()]  # warm-up pass: caches, worker processes
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                passes.append(verify())
                seconds.append(time.perf_counter() - start)
            verdicts = passes[-1]
            report["verifiers"][name] = {
                "verdicts": verdicts,
                "changed": sum(len(set(v)) > 1 for v in zip(*passes)),  # e.g. a timeout under load
                "median_s": statistics.median(seconds),
                "pairs_per_s": len(data) / statistics.median(seconds),
                "seconds": seconds,
            }
            print(f"{name}: agreement {agreement(data, verdicts):.3f}, "
                  f"{len(data) / statistics.median(seconds):.0f} pairs/s", flush=True)
        report["slow"] = time_slow(pool, timeout, repeats=3)
        report["arithmetic"] = time_arithmetic(repeats)
    finally:
        pool.close()
        if "math-verify-batch" in verifiers:
            mv_pool.close()
    return report


def time_arithmetic(repeats: int, n: int = 2000) -> dict:
    """Milliseconds to score ``n`` completions of the generated arithmetic task (numeric answers,
    half of them wrong) one at a time and with ``score_batch``, and the workers it started."""
    problems = generate_problems(n, seed=0)
    completions = [f"#### {p.answer}" if i % 2 else f"The answer is {i}." for i, p in enumerate(problems)]
    references = [p.answer for p in problems]
    one, batch = [], []
    with VerifierPool() as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            expected = [math_reward(c, r) for c, r in zip(completions, references)]
            one.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert score_batch(completions, references, pool=pool) == expected
            batch.append(time.perf_counter() - start)
        workers = pool.num_workers
    print(f"arithmetic: {n} completions, one at a time {1e3 * statistics.median(one):.0f} ms, "
          f"score_batch {1e3 * statistics.median(batch):.0f} ms, {workers} workers", flush=True)
    return {"n": n, "one_at_a_time_ms": 1e3 * statistics.median(one),
            "score_batch_ms": 1e3 * statistics.median(batch), "workers_started": workers}


SLOW = (r"\boxed{(a+b+c+d+e+f+g+h)^16}", "(a+b+c+d+e+f+g+h+1)^16")  # sympy needs seconds: times out


def time_slow(pool: VerifierPool, timeout: float, repeats: int, n: int = 8) -> dict:
    """Seconds to score ``n`` completions that each hit the timeout: one at a time with
    ``math_reward`` (in this process, under SIGALRM) and with ``score_batch`` on ``pool``."""
    one, batch = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        assert [math_reward(SLOW[0], SLOW[1], timeout=timeout) for _ in range(n)] == [0.0] * n
        one.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert score_batch([SLOW[0]] * n, [SLOW[1]] * n, timeout=timeout, pool=pool) == [0.0] * n
        batch.append(time.perf_counter() - start)
    print(f"{n} slow completions: one at a time {statistics.median(one):.2f} s, "
          f"score_batch {statistics.median(batch):.2f} s", flush=True)
    return {"n": n, "workers": pool.max_workers, "one_at_a_time_s": statistics.median(one),
            "score_batch_s": statistics.median(batch)}


def agreement(data: list[Pair], verdicts: list[bool], keep: Callable[[Pair], bool] = lambda p: True) -> float:
    chosen = [v == p.label for p, v in zip(data, verdicts) if keep(p)]
    return sum(chosen) / max(len(chosen), 1)


def summarize(data: list[Pair], report: dict, command: str) -> str:
    names = list(report["verifiers"])
    lines = [
        "# Math-answer verifiers: agreement with hand labels and speed",
        "",
        f"`{command}`; {report['machine']}; {report['date']}; {report['load']} (other jobs shared the "
        "CPU: compare speeds within this table only).",
        f"{len(data)} labelled pairs ({sum(p.label for p in data)} right, "
        f"{sum(not p.label for p in data)} wrong; {sum(p.style == 'gsm8k' for p in data)} GSM8K-style, "
        f"{sum(p.style == 'math' for p in data)} MATH-style), written in `benchmarks/verifier_compare.py`. "
        f"Speed: pairs/s over the whole set, median of {report['repeats']} passes after a warm-up pass; "
        f"timeout {report['timeout']} s per comparison. Agreement: the last pass.",
        "",
        "Verifiers: `builtin` is `math_reward` one completion at a time; `builtin-batch` is `score_batch` "
        "(same verdicts; the symbolic stage in worker processes); `math-verify` is Hugging Face's "
        "math-verify alone (`verify(parse(\"$reference$\"), parse(completion))`); `math-verify-batch` is "
        "`score_batch(..., verifier=\"math-verify\")` = `math_verify_reward`: the builtin string and exact "
        "numeric stages first, then math-verify for answers that are not plain numbers.",
        "",
        "| verifier | agreement | GSM8K-style | MATH-style | right ones accepted | wrong ones rejected "
        "| pairs/s | verdicts that changed between passes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        v = report["verifiers"][name]["verdicts"]
        lines.append(
            f"| {name} | {agreement(data, v):.3f} | {agreement(data, v, lambda p: p.style == 'gsm8k'):.3f} "
            f"| {agreement(data, v, lambda p: p.style == 'math'):.3f} "
            f"| {agreement(data, v, lambda p: p.label):.3f} | {agreement(data, v, lambda p: not p.label):.3f} "
            f"| {report['verifiers'][name]['pairs_per_s']:.0f} | {report['verifiers'][name]['changed']} |")
    slow = report.get("slow")
    if slow:
        lines += ["", f"{slow['n']} completions that each hit the {report['timeout']} s timeout, median of 3: "
                      f"one at a time (`math_reward`) {slow['one_at_a_time_s']:.2f} s, `score_batch` with "
                      f"{slow['workers']} worker processes {slow['score_batch_s']:.2f} s."]
    arithmetic = report.get("arithmetic")
    if arithmetic:
        lines += ["", f"The generated arithmetic task ({arithmetic['n']} completions, numeric references, median of "
                      f"{report['repeats']}): one at a time {arithmetic['one_at_a_time_ms']:.0f} ms, `score_batch` "
                      f"{arithmetic['score_batch_ms']:.0f} ms, worker processes started: "
                      f"{arithmetic['workers_started']}."]
    kinds = sorted({(p.style, p.kind) for p in data})
    lines += ["", "Agreement per kind of answer:", "",
              "| style | kind | pairs | " + " | ".join(names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for style, kind in kinds:
        keep = lambda p, s=style, k=kind: p.style == s and p.kind == k  # noqa: E731
        row = [f"{agreement(data, report['verifiers'][n]['verdicts'], keep):.2f}" for n in names]
        lines.append(f"| {style} | {kind} | {sum(map(keep, data))} | " + " | ".join(row) + " |")
    for name in ("builtin", "math-verify", "math-verify-batch"):
        if name not in report["verifiers"]:
            continue
        wrong = [(p, v) for p, v in zip(data, report["verifiers"][name]["verdicts"]) if v != p.label]
        lines += ["", f"Pairs `{name}` scores against the label ({len(wrong)}; the completion's end):", ""]
        lines += [f"- {'accepts' if v else 'rejects'} `{p.completion[-40:]!r}` for reference `{p.reference}`"
                  for p, v in wrong]
    return "\n".join(lines) + "\n"


def disagreements(data: list[Pair], report: dict) -> list[dict]:
    rows = []
    for i, p in enumerate(data):
        verdicts = {n: report["verifiers"][n]["verdicts"][i] for n in report["verifiers"]}
        if any(v != p.label for v in verdicts.values()):
            rows.append({"completion": p.completion, "reference": p.reference, "label": p.label,
                         "style": p.style, "kind": p.kind, **verdicts})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None, help="folder for summary.md and results.json")
    args = parser.parse_args()
    data = pairs()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    report = run(data, args.repeats, args.timeout)
    report.update(
        repeats=args.repeats, timeout=args.timeout, date=time.strftime("%Y-%m-%d"),
        machine=f"{os.cpu_count()}-core {platform.processor() or platform.machine()} CPU, "
                f"Python {platform.python_version()}, sympy {sympy.__version__}",
        load=f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
        if hasattr(os, "getloadavg") else "",
    )
    try:
        from importlib.metadata import version

        report["machine"] += f", math-verify {version('math-verify')}"
    except Exception:  # noqa: BLE001
        pass
    command = "python benchmarks/verifier_compare.py" + (f" --out {args.out}" if args.out else "")
    summary = summarize(data, report, command)
    print(summary)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.md").write_text(summary)
        (args.out / "results.json").write_text(json.dumps(
            {**{k: v for k, v in report.items() if k != "verifiers"},
             "verifiers": {n: {k: v for k, v in r.items() if k != "verdicts"}
                           for n, r in report["verifiers"].items()},
             "disagreements": disagreements(data, report)}, indent=1))


if __name__ == "__main__":
    main()
