"""Batch scoring in worker processes: parallel timeouts, any thread, same verdicts as one at a
time, no hang, and the optional math-verify stage."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from torchrl_r2vpo.math_task import (
    answers_match,
    math_reward,
    math_verify_reward,
    score_batch,
    VerifierPool,
)
from torchrl_r2vpo.math_task import reward, verifier_pool
from torchrl_r2vpo.math_task.verifier_pool import WorkerStartError

SLOW_PAIR = ("(a+b+c+d+e+f+g+h)^16", "(a+b+c+d+e+f+g+h+1)^16")  # unbounded expand takes seconds
HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None

MIXED = [  # (completion, reference): every stage, right and wrong, no answer, hostile text
    (r"so \boxed{\frac{1}{2}}", "0.5"),
    ("The answer is\n#### 1,000", "1000"),
    ("#### 17 * 13", "221"),
    (r"\boxed{3}", "4"),
    ("no answer at all", "4"),
    ("The answer is \u22125.", "-5"),
    (r"\boxed{(x-1)(x+1)}", "x^2-1"),
    (r"\boxed{x^2+1}", "x^2-1"),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}"),
    (r"\boxed{2\pi r}", r"r \cdot 2 \times \pi"),
    (r"\boxed{\frac{1}{x}+\frac1y}", r"\frac{x+y}{xy}"),
    (r"\boxed{x}", "y"),
    (r"\boxed{__import__('os').system('ls')}", "x"),
    (r"\boxed{\frac{1}{0}}", "x"),
    (r"\boxed{\{1, 2\}}", r"\{2, 1\}"),
    ("<answer>x = 3</answer>", "3"),
]


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(max_workers=4) as pool:
        pool.compare([("x", "x")] * 4, timeout=30.0)  # start and warm the 4 workers
        yield pool


@pytest.mark.timeout(60)
def test_a_batch_of_slow_pairs_costs_about_one_timeout(pool):
    timeout, n = 1.0, 4
    start = time.perf_counter()
    scores = score_batch([rf"\boxed{{{SLOW_PAIR[0]}}}"] * n, [SLOW_PAIR[1]] * n, timeout=timeout, pool=pool)
    elapsed = time.perf_counter() - start
    assert scores == [0.0] * n
    assert elapsed < 2 * timeout, f"{n} slow pairs took {elapsed:.2f} s; one at a time they take {n * timeout} s"
    assert pool.num_workers == 4  # the timed-out workers were not killed: their own timers fired


def test_batch_equals_one_at_a_time(pool):
    completions, references = zip(*MIXED)
    one_by_one = [math_reward(c, r, formatted=0.1) for c, r in MIXED]
    assert score_batch(completions, references, formatted=0.1, pool=pool) == one_by_one
    assert score_batch(completions, references, formatted=0.1) == one_by_one  # the shared pool
    assert one_by_one[:8] == [1.0, 1.0, 0.1, 0.1, 0.0, 1.0, 1.0, 0.1]


def test_numeric_references_need_no_worker():
    with VerifierPool() as pool:
        scores = score_batch(["#### 12", r"\boxed{3/4}", "It is 7.", "none"], ["12", "0.75", "8", "1"], pool=pool)
        assert scores == [1.0, 1.0, 0.0, 0.0]
        assert pool.num_workers == 0


def test_symbolic_stage_works_in_a_thread_pool():
    pairs = [("x^2-1", "(x-1)(x+1)"), ("2x+1", "1+2x"), ("x+1", "x+2"), ("0.5", r"\frac12"),
             (r"\sqrt{8}", r"2\sqrt{2}")]
    with ThreadPoolExecutor(4) as executor:
        assert list(executor.map(lambda p: answers_match(*p), pairs)) == [True, True, False, True, True]
        assert list(executor.map(lambda p: math_reward(rf"\boxed{{{p[0]}}}", p[1]), pairs)) == [1, 1, 0, 1, 1]
        completions, references = zip(*MIXED)
        expected = [math_reward(c, r) for c, r in MIXED]
        batches = [executor.submit(score_batch, completions, references) for _ in range(4)]
        assert [b.result(timeout=60) for b in batches] == [expected] * 4


@pytest.mark.timeout(60)
def test_a_worker_that_does_not_answer_is_killed(monkeypatch):
    # a worker whose own timer cannot stop it (stuck in C, no SIGALRM): the pool's deadline does
    monkeypatch.setattr(verifier_pool, "_BOOT", "import sys, time; print('[\"ready\"]', flush=True); "
                                                "sys.stdin.readline(); time.sleep(60)")
    with VerifierPool(max_workers=2) as pool:
        start = time.perf_counter()
        assert pool.compare([("x", "x"), ("y", "y"), ("z", "z")], timeout=0.2) == [False] * 3
        assert time.perf_counter() - start < 10.0
        assert pool.num_workers == 0  # all three were killed


@pytest.mark.timeout(60)
def test_workers_that_cannot_start_give_a_clear_error(monkeypatch):
    monkeypatch.setattr(verifier_pool, "_BOOT", "import sys; sys.exit(1)")
    with VerifierPool(max_workers=2) as pool:
        with pytest.raises(WorkerStartError, match="cannot start"):
            pool.compare([("x", "x")], timeout=1.0)
    # the builtin verifier falls back to this process (main thread) and says so, once
    monkeypatch.setattr(verifier_pool, "_DEFAULT_POOLS", {})
    monkeypatch.setattr(reward, "_WARNED", [])
    with pytest.warns(RuntimeWarning, match="runs in this process"):
        assert score_batch([r"\boxed{(x-1)(x+1)}", "#### 3"], ["x^2-1", "3"]) == [1.0, 1.0]


def test_closed_pool_stops_its_workers_and_refuses_work():
    pool = VerifierPool(max_workers=2)
    assert pool.compare([("x", "x"), ("x+1", "1+x")], timeout=30.0) == [True, True]
    workers = list(pool._idle)
    pool.close()
    assert [w.proc.poll() is not None for w in workers] == [True] * len(workers)
    with pytest.raises(RuntimeError, match="closed"):
        pool.compare([("x", "y")])
    pool.close()  # idempotent


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 completions but 1"):
        score_batch(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown verifier"):
        score_batch(["a"], ["a"], verifier="sympy")
    with pytest.raises(ValueError, match="max_workers"):
        VerifierPool(max_workers=0)


@pytest.mark.timeout(120)
def test_a_script_without_a_main_guard_scores_and_exits(tmp_path):
    script = tmp_path / "score.py"
    script.write_text(textwrap.dedent(r"""
        from torchrl_r2vpo.math_task import score_batch
        print(score_batch([r"\boxed{(x-1)(x+1)}", r"\boxed{x}"], ["x^2-1", "y"]))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1.0, 0.0]"


def test_missing_math_verify_names_the_extra(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "math_verify" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"torchrl_r2vpo\[math-verify\]"):
        math_verify_reward(r"\boxed{1}", "1")


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="needs math-verify (the math-verify extra)")
def test_math_verify_reads_what_the_builtin_stages_do_not():
    cases = [  # (completion, reference, builtin verdict, math-verify verdict)
        (r"so $\boxed{\{3, 2, 1\}}$", r"\{1, 2, 3\}", 0.0, 1.0),
        (r"\boxed{(1, \infty) \cup (-\infty, -1)}", r"(-\infty, -1) \cup (1, \infty)", 0.0, 1.0),
        (r"\boxed{2\frac{1}{4}}", r"\frac{9}{4}", 0.0, 1.0),
        (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", 0.0, 1.0),
        (r"\boxed{1.5\times 10^3}", "1500", 0.0, 1.0),
        ("#### 60 km", "60", 1.0, 1.0),
        (r"\boxed{\$18}", "18", 1.0, 1.0),  # the in-process stages accept first
        (r"\boxed{(-\infty, 2)}", r"(-\infty, 2]", 0.0, 0.1),
        (r"\boxed{\{1, 2\}}", r"\{1, 2, 3\}", 0.0, 0.1),
        (r"\boxed{0.3333333}", r"\frac{1}{3}", 0.0, 0.1),  # a plain number is judged exactly
        (r"\boxed{2.8284271}", r"2\sqrt{2}", 0.0, 0.1),  # (math-verify alone rounds: 1.0)
        ("no answer", "5", 0.0, 0.0),
    ]
    completions, references, builtin, expected = map(list, zip(*cases))
    assert score_batch(completions, references) == builtin
    assert score_batch(completions, references, verifier="math-verify", formatted=0.1) == expected
    assert math_verify_reward(*cases[0][:2]) == 1.0
    with VerifierPool(max_workers=2, verifier="math-verify") as pool:
        assert score_batch(completions, references, verifier="math-verify", formatted=0.1, pool=pool) == expected
        with pytest.raises(ValueError, match="runs 'math-verify'"):
            score_batch(completions, references, pool=pool)


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="needs math-verify (the math-verify extra)")
def test_math_verify_works_off_the_main_thread():
    result = {}
    thread = threading.Thread(target=lambda: result.update(score=math_verify_reward(r"\boxed{[1,5)}", "[1, 5)")))
    thread.start()
    thread.join(timeout=60)
    assert result == {"score": 1.0}
