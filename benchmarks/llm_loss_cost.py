"""Forward + backward time and peak memory of ``R2VPOLLMLoss`` relative to TorchRL's ``GRPOLoss``.

Both losses score one sequence batch (64 sequences x 512 tokens by default:
prompt 64, left-padded, + response 448, right-padded after EOS) with one small
Qwen2 model built in code, through TorchRL's ``TransformersWrapper``
(``generate=False``), with the same settings (``masking_strategy="rlhf"``,
``token_mean``, entropy bonus on). The behaviour log-probs are the model's own
plus noise, so the ratios are not all 1.

One timed step is ``loss(data)``, the sum of the ``loss_*`` entries and
``backward()``; gradients are cleared outside the timed region. The losses are
timed interleaved, alternating which goes first, and the script reports the
median time of each, the ratio of medians and the median per-repeat ratio.

Peak memory is the highest memory allocated during one step above what was
allocated before it:

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``.
* CPU: every allocation and free of the step, as recorded by
  ``torch.profiler.profile(profile_memory=True)`` (the CPU allocator reports
  each one with its size), replayed in time order; the peak is the maximum of
  the running sum. This uses the profiler's event tree
  (``kineto_results.experimental_event_tree()``), a private API.

Run it with::

    python benchmarks/llm_loss_cost.py                    # CPU, small model, < 3 min
    python benchmarks/llm_loss_cost.py --device cuda --hidden 512 --layers 4 --vocab 32768
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import tensordict
import torch
import torchrl
from tensordict import TensorDict
from torchrl.objectives.llm import GRPOLoss

import torchrl_r2vpo
from torchrl_r2vpo.data import (ASSISTANT_MASK_KEY, ATTENTION_MASK_KEY, FULL_LOG_PROBS_KEY, FULL_TOKENS_KEY,
                                PROMPT_TOKENS_KEY, RESPONSE_TOKENS_KEY)
from torchrl_r2vpo.objectives.llm import R2VPOLLMLoss

PAD, BOS, EOS = 0, 1, 2


def make_actor(args, device):
    from tokenizers import models, Tokenizer
    from torchrl.modules.llm import TransformersWrapper
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    # the wrapper only needs the pad id from the tokenizer in "tokens" mode
    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": 3}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.prompt + args.response,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    model = Qwen2ForCausalLM(config).to(device).eval()
    return TransformersWrapper(
        model,
        tokenizer=tokenizer,
        input_mode="tokens",
        generate=False,
        return_log_probs=True,
        pad_output=True,
    )


def make_data(args, actor, device) -> TensorDict:
    n, p_width, r_width = args.batch, args.prompt, args.response
    gen = torch.Generator().manual_seed(args.seed)
    prompt_len = torch.randint(p_width // 2, p_width + 1, (n,), generator=gen)
    response_len = torch.randint(r_width // 4, r_width + 1, (n,), generator=gen)
    response_len[0] = r_width
    prompt = torch.randint(4, args.vocab, (n, p_width), generator=gen)
    response = torch.randint(4, args.vocab, (n, r_width), generator=gen)
    prompt_mask = torch.arange(p_width) >= (p_width - prompt_len)[:, None]
    response_mask = torch.arange(r_width) < response_len[:, None]
    prompt = torch.where(prompt_mask, prompt, PAD)
    response = torch.where(response_mask, response, PAD)
    response[torch.arange(n), response_len - 1] = EOS
    assistant = torch.cat([torch.zeros_like(prompt_mask), response_mask], -1)
    data = TensorDict(
        {
            PROMPT_TOKENS_KEY: prompt,
            RESPONSE_TOKENS_KEY: response,
            FULL_TOKENS_KEY: torch.cat([prompt, response], -1),
            ATTENTION_MASK_KEY: torch.cat([prompt_mask, response_mask], -1),
            ASSISTANT_MASK_KEY: assistant,
            "advantage": torch.randn(n, 1, 1, generator=gen),
        },
        [n],
    ).to(device)
    scorer = GRPOLoss(actor, masking_strategy="rlhf", entropy_bonus=False)
    with torch.no_grad():
        log_prob, _, _ = scorer._get_cur_log_prob(data.copy())
    noise = 0.1 * torch.randn(log_prob.shape, generator=gen).to(device)
    mask = data[ASSISTANT_MASK_KEY]
    data[FULL_LOG_PROBS_KEY] = torch.where(mask, log_prob + noise, 0.0)
    return data


def step(loss, data) -> None:
    out = loss(data)
    total = sum(v for k, v in out.to_tensordict().items() if k.startswith("loss_"))
    total.backward()


def clear(actor) -> None:
    for p in actor.parameters():
        p.grad = None


def timed_step(loss, actor, data, device) -> float:
    clear(actor)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step(loss, data)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    clear(actor)
    return elapsed


def peak_memory(loss, actor, data, device) -> int | None:
    """Peak bytes allocated during one step, above the bytes allocated before it."""
    clear(actor)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(loss, data)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        clear(actor)
        return peak
    from torch._C._profiler import _EventType
    from torch.profiler import profile, ProfilerActivity

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(loss, data)
    clear(actor)
    events = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            walk(node.children)

    try:
        walk(prof.profiler.kineto_results.experimental_event_tree())
    except (AttributeError, RuntimeError):  # private API: give up quietly
        return None
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64, help="sequences")
    parser.add_argument("--prompt", type=int, default=64, help="prompt width (tokens)")
    parser.add_argument("--response", type=int, default=448, help="response width (tokens)")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-repeats", type=int, default=1)
    parser.add_argument("--lagrange-multiplier", type=float, default=1.0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(THREADS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    actor = make_actor(args, device)
    data = make_data(args, actor, device)
    common = dict(masking_strategy="rlhf", aggregation="token_mean")
    losses = {
        "grpo": GRPOLoss(actor, clip_epsilon=0.2, **common),
        "r2vpo": R2VPOLLMLoss(actor, lagrange_multiplier=args.lagrange_multiplier, **common),
    }
    names = list(losses)

    wall = time.perf_counter()
    for name in names:
        for _ in range(args.warmup):
            timed_step(losses[name], actor, data, device)
    times = {name: [] for name in names}
    for i in range(args.repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(timed_step(losses[name], actor, data, device))
    memory = {name: [] for name in names}
    for i in range(args.memory_repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            memory[name].append(peak_memory(losses[name], actor, data, device))

    base_t, base_m = times["grpo"], memory["grpo"]
    results = {}
    for name in names:
        ratios = [t / b for t, b in zip(times[name], base_t)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        peaks = [m for m in memory[name] if m is not None]
        base_peaks = [m for m in base_m if m is not None]
        peak = statistics.median(peaks) if peaks else None
        base_peak = statistics.median(base_peaks) if base_peaks else None
        results[name] = {
            "median_ms": 1e3 * statistics.median(times[name]),
            "time_ratio_of_medians": statistics.median(times[name]) / statistics.median(base_t),
            "time_median_ratio": statistics.median(ratios),
            "time_ratio_q1": q1,
            "time_ratio_q3": q3,
            "peak_memory_mib": None if peak is None else peak / 2**20,
            "peak_memory_ratio": None if peak is None else peak / base_peak,
            "peak_memory_samples_mib": [None if m is None else m / 2**20 for m in memory[name]],
        }
    tokens = int(data[ASSISTANT_MASK_KEY].sum())
    machine = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchrl": torchrl.__version__,
        "tensordict": tensordict.__version__,
        "torchrl_r2vpo": torchrl_r2vpo.__version__,
    }
    memory_method = (
        "torch.cuda.max_memory_allocated above the allocation before the step"
        if device.type == "cuda"
        else "torch.profiler(profile_memory=True) allocation events, peak of the running sum"
    )
    print(", ".join(f"{k}={v}" for k, v in machine.items()))
    print(
        f"batch {args.batch} x ({args.prompt} + {args.response}) tokens, {tokens} response "
        f"tokens, Qwen2 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
        f"{args.repeats} interleaved repeats; {time.perf_counter() - wall:.0f} s"
    )
    header = ("median ms", "time ratio", "median ratio", "ratio IQR", "peak MiB", "mem ratio")
    print(f"{'loss':<8}" + "".join(f"{h:>15}" for h in header))
    for name, r in results.items():
        iqr = f"[{r['time_ratio_q1']:.3f}, {r['time_ratio_q3']:.3f}]"
        peak = "n/a" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.1f}"
        mem = "n/a" if r["peak_memory_ratio"] is None else f"{r['peak_memory_ratio']:.4f}"
        print(
            f"{name:<8}{r['median_ms']:>15.1f}{r['time_ratio_of_medians']:>15.3f}"
            f"{r['time_median_ratio']:>15.3f}{iqr:>15}{peak:>15}{mem:>15}"
        )
    print(f"ratios vs TorchRL GRPOLoss; peak memory: {memory_method}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            report = {
                "args": vars(args),
                "machine": machine,
                "response_tokens": tokens,
                "memory_method": memory_method,
                "results": results,
            }
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
