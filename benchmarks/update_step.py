"""Seconds per optimiser step of ``examples/dmc_walker.py``'s update, eager and compiled.

The example's own pieces (``make_agent``, ``make_loss`` of ``torchrl_r2vpo.recipes.control``,
``make_update`` of ``torchrl_r2vpo.recipes.update``) on synthetic
minibatches of a walker-sized problem (24 observations, 6 actions, random advantages and
value targets): one step is the loss, backward, per-network gradient clipping and Adam, as
in training. ``compiled`` is ``make_update(..., compile=True)``: ``torch.compile`` after one
eager call, with CUDA graphs on CUDA. Each (loss, minibatch size, mode) runs ``--warmup``
steps (the compilation among them), then is timed over ``--steps`` steps, ``--repeats``
times, the configurations interleaved; the report gives medians and eager / compiled.

On a GPU the Playground preset's minibatch is 30720 and a batch takes 512 steps, so the
per-step cost multiplied by 512 is what the updates add to each batch.

    python benchmarks/update_step.py                        # CPU, minibatches of 256, ~3 min
    python benchmarks/update_step.py --device cuda --minibatch-sizes 256 30720
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Composite

from torchrl_r2vpo.recipes.config import ControlConfig
from torchrl_r2vpo.recipes.control import make_agent, make_loss, make_optimizer
from torchrl_r2vpo.recipes.update import make_update

ROOT = Path(__file__).parents[1]

OBS_DIM, ACT_DIM = 24, 6  # walker-walk


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(loss_name: str, minibatch: int, compiled: bool, device: torch.device):
    """The example's update step and a few minibatches to feed it."""
    action = Bounded(-1.0, 1.0, shape=(ACT_DIM,), device=device)
    spec = SimpleNamespace(full_action_spec_unbatched=Composite(action=action),
                           action_spec_unbatched=action)  # what make_agent reads of an env
    cfg = ControlConfig(loss=loss_name)
    actor, critic, _ = make_agent(spec, OBS_DIM, ACT_DIM)
    actor.to(device)
    critic.to(device)
    loss, _ = make_loss(cfg, actor, critic)
    optimizer = make_optimizer(loss, cfg.lr, compiled)
    update = make_update(loss, optimizer, cfg.max_grad_norm, compile=compiled)
    batches = []
    for _ in range(4):
        data = TensorDict({"observation": torch.randn(minibatch, OBS_DIM, device=device)},
                          [minibatch], device=device)
        with torch.no_grad():
            actor(data)
        data["advantage"] = torch.randn(minibatch, 1, device=device)
        data["value_target"] = torch.randn(minibatch, 1, device=device)
        batches.append(data)
    return update, batches


def seconds_per_step(update, batches, steps: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        update(batches[i % len(batches)])
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--losses", nargs="+", default=["r2vpo", "ppo"], choices=["r2vpo", "ppo"])
    parser.add_argument("--minibatch-sizes", nargs="+", type=int, default=[256])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "update-step" / "cpu")
    args = parser.parse_args()
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = [(loss, mb, mode) for loss in args.losses for mb in args.minibatch_sizes
               for mode in ("eager", "compiled")]
    runs = {}
    for config in configs:
        loss, mb, mode = config
        start = time.perf_counter()
        update, batches = build(loss, mb, mode == "compiled", device)
        seconds_per_step(update, batches, args.warmup, device)
        print(f"{loss} minibatch {mb} {mode}: built and warmed up in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        runs[config] = (update, batches)
    times = {config: [] for config in configs}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s))"
    for _ in range(args.repeats):
        for config, (update, batches) in runs.items():
            times[config].append(seconds_per_step(update, batches, args.steps, device))
        report = write_results(args, name, times)  # a run stopped later keeps these repeats
    print(report)


def write_results(args, name: str, times: dict) -> str:
    """Writes ``results.json`` and ``summary.md`` (medians of the repeats so far)."""
    repeats = min(len(t) for t in times.values())
    lines = [f"Seconds per optimiser step of the example's update on {name}, torch "
             f"{torch.__version__}; median of {repeats} repeats of {args.steps} steps.", "",
             "| loss | minibatch | eager (ms) | compiled (ms) | eager / compiled |",
             "|---|---|---|---|---|"]
    results = {"device": name, "torch": torch.__version__, "steps": args.steps,
               "repeats": repeats, "date": time.strftime("%Y-%m-%d"), "runs": []}
    for loss in args.losses:
        for mb in args.minibatch_sizes:
            eager = statistics.median(times[(loss, mb, "eager")])
            compiled = statistics.median(times[(loss, mb, "compiled")])
            results["runs"].append({"loss": loss, "minibatch": mb, "eager_s": eager,
                                    "compiled_s": compiled,
                                    "eager_all_s": times[(loss, mb, "eager")],
                                    "compiled_all_s": times[(loss, mb, "compiled")]})
            lines.append(f"| {loss} | {mb} | {eager * 1e3:.2f} | {compiled * 1e3:.2f} | "
                         f"{eager / compiled:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    report = "\n".join(lines)
    for name, text in (("results.json", json.dumps(results, indent=2)), ("summary.md", report + "\n")):
        tmp = args.out / f"{name}.tmp"  # a run stopped while writing keeps the last whole file
        tmp.write_text(text)
        tmp.replace(args.out / name)
    return report

if __name__ == "__main__":
    main()
