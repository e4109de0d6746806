"""Forward + backward overhead of ``R2VPOLoss`` relative to TorchRL's ``ClipPPOLoss``.

Three losses share one actor, one critic and one batch:

* ``ClipPPOLoss`` (the baseline),
* ``R2VPOLoss`` with ``check_finite=True`` (the default),
* ``R2VPOLoss`` with ``check_finite=False``.

One timed step is ``loss(data)``, the sum of the ``loss_*`` entries, and
``backward()``; gradients are cleared outside the timed region. The losses are
timed interleaved, rotating which goes first on each repeat, so machine noise
hits all of them alike. The script prints the median wall time of each loss,
the ratio of medians against ``ClipPPOLoss``, and the median and interquartile
range of the per-repeat ratios. Run it with::

    python benchmarks/loss_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import tensordict
import torch
import torchrl
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import ClipPPOLoss

import torchrl_r2vpo
from torchrl_r2vpo import R2VPOLoss

OBS_DIM, ACTION_DIM = 24, 6


def make_losses_and_data(batch: int) -> tuple[dict[str, nn.Module], TensorDict]:
    hidden = dict(num_cells=[64, 64], activation_class=nn.Tanh)
    actor_net = nn.Sequential(
        MLP(OBS_DIM, 2 * ACTION_DIM, **hidden), NormalParamExtractor()
    )
    actor = ProbabilisticActor(
        TensorDictModule(actor_net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        distribution_class=TanhNormal,
        distribution_kwargs={"low": -1.0, "high": 1.0},
        return_log_prob=True,
    )
    critic = ValueOperator(MLP(OBS_DIM, 1, **hidden), in_keys=["observation"])
    data = TensorDict({"observation": torch.randn(batch, OBS_DIM)}, batch_size=[batch])
    with torch.no_grad():
        actor(data)  # the behaviour policy's "action" and "action_log_prob"
        for p in actor.parameters():  # move the policy so the ratios are not all 1
            p.add_(0.05 * torch.randn_like(p))
    data.set("advantage", torch.randn(batch, 1))
    data.set("value_target", torch.randn(batch, 1))
    data = data.select(
        "observation", "action", "action_log_prob", "advantage", "value_target"
    )

    common = dict(entropy_coeff=1e-3, normalize_advantage=True, loss_critic_type="l2")
    losses = {
        "clip_ppo": ClipPPOLoss(actor, critic, clip_epsilon=0.2, **common),
        "r2vpo": R2VPOLoss(actor, critic, lagrange_multiplier=2.5, **common),
        "r2vpo_no_check": R2VPOLoss(
            actor, critic, lagrange_multiplier=2.5, check_finite=False, **common
        ),
    }
    return losses, data


def timed_step(loss: nn.Module, data: TensorDict) -> float:
    start = time.perf_counter()
    out = loss(data)
    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    total.backward()
    elapsed = time.perf_counter() - start
    for p in loss.parameters():
        p.grad = None
    return elapsed


def summarize(times: list[float], baseline: list[float]) -> dict[str, float]:
    ratios = [t / b for t, b in zip(times, baseline)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {
        "median_ms": 1e3 * statistics.median(times),
        "ratio_of_medians": statistics.median(times) / statistics.median(baseline),
        "median_ratio": statistics.median(ratios),
        "ratio_q1": q1,
        "ratio_q3": q3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(THREADS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    losses, data = make_losses_and_data(args.batch)
    names = list(losses)

    for name in names:
        for _ in range(args.warmup):
            timed_step(losses[name], data)
    times = {name: [] for name in names}
    for i in range(args.repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:  # rotate who goes first
            times[name].append(timed_step(losses[name], data))

    baseline = times["clip_ppo"]
    results = {name: summarize(times[name], baseline) for name in names}
    machine = {
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchrl": torchrl.__version__,
        "tensordict": tensordict.__version__,
        "torchrl_r2vpo": torchrl_r2vpo.__version__,
    }

    print(", ".join(f"{k}={v}" for k, v in machine.items()))
    run = {k: getattr(args, k) for k in ("batch", "repeats", "warmup", "seed")}
    print(", ".join(f"{k}={v}" for k, v in run.items()))
    header = ("median ms", "ratio of medians", "median ratio", "ratio IQR")
    print(f"{'loss':<16}" + "".join(f"{h:>18}" for h in header))
    for name, r in results.items():
        iqr = f"[{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]"
        print(
            f"{name:<16}{r['median_ms']:>18.2f}{r['ratio_of_medians']:>18.3f}"
            f"{r['median_ratio']:>18.3f}{iqr:>18}"
        )
    print("ratios vs clip_ppo; check_finite: r2vpo=True, r2vpo_no_check=False")

    if args.json is not None:
        with open(args.json, "w") as f:
            report = {"args": vars(args), "machine": machine, "results": results}
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
