"""The supervised warm start of the tiny math models, and the commands that rebuild the shipped ones.

Both checkpoints in ``torchrl_r2vpo/assets`` are rebuilt, byte for byte on the same machine
(single-threaded), by::

    # math-lm-add2: 2-digit reversed addition, stopped once sampling solves 30% of held-out sums
    python -m torchrl_r2vpo.math_task --out torchrl_r2vpo/assets/math-lm-add2 \\
        --task reversed-addition --difficulty 2 --steps 3000 --stop-at-sampled-accuracy 0.3 \\
        --check-every 20 --eval-size 1024
    # math-lm-tiny: 800 steps on difficulty-1 arithmetic (generate_problems' train split)
    python -m torchrl_r2vpo.math_task --out torchrl_r2vpo/assets/math-lm-tiny

Both are deliberately under-trained, so that RL has something to sharpen (greedy decoding
above sampling) and something to discover (pass@8 above pass@1). The command prints the
held-out greedy and sampled accuracy before and after (and pass@8 for the procedural task);
``benchmarks/README.md`` records them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from torchrl_r2vpo.math_task.evaluation import evaluate_accuracy, evaluate_pass_at_k
from torchrl_r2vpo.math_task.lm import build_math_lm, build_math_tokenizer
from torchrl_r2vpo.math_task.problems import (
    EVAL_SEED,
    generate_problems,
    generate_reversed_addition,
    MathProblem,
)
from torchrl_r2vpo.math_task.sft import warm_start

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _report(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eval_sets: dict[str, list[MathProblem]],
    pass_at: int = 0,
) -> str:
    """Greedy and sampled accuracy (and pass@k for ``pass_at`` > 0) on each set, a line each."""
    rows = []
    for name, problems in eval_sets.items():
        greedy = evaluate_accuracy(model, tokenizer, problems, greedy=True)
        sampled = evaluate_accuracy(model, tokenizer, problems, greedy=False)
        row = f"  {name}: greedy {greedy:.3f}, sampled (T=1) {sampled:.3f}"
        if pass_at:
            row += f", pass@{pass_at} {evaluate_pass_at_k(model, tokenizer, problems, pass_at):.3f}"
        rows.append(row)
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    """Builds, warm-starts, evaluates and saves the tiny math model (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m torchrl_r2vpo.math_task",
        description="Warm-start the tiny character-level math LM and save it as a Hugging Face directory.",
    )
    parser.add_argument("--out", required=True, help="output directory (model, tokenizer, generation config)")
    parser.add_argument("--task", choices=["arithmetic", "reversed-addition"], default="arithmetic",
                        help="arithmetic: generate_problems; reversed-addition: generate_reversed_addition")
    parser.add_argument("--steps", type=int, default=800, help="supervised optimiser steps")
    parser.add_argument("--batch-size", type=int, default=64, help="problems per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--difficulty", type=int, nargs="+", default=[1],
                        help="arithmetic: training difficulties; reversed-addition: digits per number")
    parser.add_argument("--train-size", type=int, default=50_000, help="training problems generated")
    parser.add_argument("--eval-size", type=int, default=500, help="problems per evaluation set")
    parser.add_argument("--stop-at-sampled-accuracy", type=float, default=0.0,
                        help="stop once the sampled held-out accuracy reaches this (checked every "
                             "--check-every steps; 0: train all --steps)")
    parser.add_argument("--check-every", type=int, default=100, help="steps between those checks")
    parser.add_argument("--hidden-size", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation, data and batches")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--device", default="cpu", help="where to train (cpu, cuda)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        _build_checkpoint(args)
    finally:
        torch.set_num_threads(threads)


def _eval_sets(args: argparse.Namespace) -> dict[str, list[MathProblem]]:
    levels = tuple(args.difficulty)
    if args.task == "reversed-addition":
        return {f"test split, {digits} digits": generate_reversed_addition(
            args.eval_size, split="test", digits=digits, seed=EVAL_SEED) for digits in levels}
    name = f"train split, difficulty {','.join(map(str, levels))}"
    eval_sets = {name: generate_problems(args.eval_size, difficulty=levels, seed=1)}
    for level in (1, 2, 3):
        test = generate_problems(args.eval_size, split="test", difficulty=level, seed=1)
        eval_sets[f"test split, difficulty {level}"] = test
    return eval_sets


def _build_checkpoint(args: argparse.Namespace) -> None:
    tokenizer = build_math_tokenizer()
    model = build_math_lm(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed)
    model.to(args.device)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    if args.task == "reversed-addition":
        per_level = -(-args.train_size // len(args.difficulty))
        train = [p for digits in args.difficulty for p in generate_reversed_addition(
            per_level, split="train", digits=digits, seed=args.seed)]
    else:
        train = generate_problems(args.train_size, split="train", difficulty=tuple(args.difficulty),
                                  seed=args.seed)
    eval_sets = _eval_sets(args)
    pass_at = 8 if args.task == "reversed-addition" else 0
    print("before:\n" + _report(model, tokenizer, eval_sets, pass_at))
    # the stopping check draws its own held-out problems, not those the model is reported on
    check = generate_reversed_addition(args.eval_size, split="test", digits=args.difficulty[0],
                                       seed=EVAL_SEED + 1)

    def reached(step: int) -> bool:
        sampled = evaluate_accuracy(model, tokenizer, check, greedy=False)
        print(f"step {step}: sampled held-out accuracy {sampled:.3f}")
        return sampled >= args.stop_at_sampled_accuracy

    stop = args.stop_at_sampled_accuracy > 0
    if stop and args.task != "reversed-addition":
        raise SystemExit("--stop-at-sampled-accuracy is for --task reversed-addition")
    stats = warm_start(
        model, tokenizer, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        stop_when=reached if stop else None,
        check_every=args.check_every,
    )
    print(f"warm start: {stats['steps']} steps, {stats['seconds']:.0f} s, final loss {stats['final_loss']:.3f}")
    print("after:\n" + _report(model, tokenizer, eval_sets, pass_at))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
