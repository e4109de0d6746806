"""RL fine-tuning of a language model on math problems with R2VPO (or a GRPO-family baseline).

    python examples/llm_math.py                          # shipped tiny model, offline, R2VPO + reuse
    python examples/llm_math.py --loss grpo --reuse 0    # GRPO, on-policy
    python examples/llm_math.py --model Qwen/Qwen2.5-0.5B-Instruct --backend vllm
    python examples/llm_math.py --resume                 # continue an interrupted run in --out

Each iteration samples ``--group-size`` completions for each of ``--num-prompts`` training
problems, scores them with the math verifier, standardises the rewards within each group
(GRPO's advantage) and trains on this batch and the ``--reuse`` previous ones, each tagged
with the policy version that sampled it. Writes to ``--out``: ``curve.csv`` (one row per
iteration), ``curve.png`` (reward and accuracy; ratio distributions by staleness),
``checkpoint.pt`` (every ``--checkpoint-every`` rollouts and on Ctrl-C or SIGTERM) and the logger's
files.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

if importlib.util.find_spec("transformers") is None:
    raise SystemExit("examples/llm_math.py needs transformers: pip install 'torchrl_r2vpo[llm]'.")

from torchrl.data import LazyTensorStorage, SamplerWithoutReplacement, TensorDictReplayBuffer
from torchrl.modules.llm import TransformersWrapper
from torchrl.record.loggers import get_logger
from tqdm import tqdm

from torchrl_r2vpo import DualVariableScheduler
from torchrl_r2vpo.collectors import (
    collect_batch,
    group_advantages,
    response_log_probs,
    staleness_stats,
    stop_token_ids,
    TransformersBackend,
    VLLMBackend,
)
from torchrl_r2vpo.envs import generate_problems, TokenGenerationEnv
from torchrl_r2vpo.modules.math_lm import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL_PATH,
    evaluate_accuracy,
    format_prompt,
    load_math_lm,
)
from torchrl_r2vpo.objectives.llm import LLM_LOSSES, make_llm_loss

from run_state import (append_row, check_resumable, interrupts_deferred, open_run_dir, rng_state,
                       save_checkpoint, set_rng_state, stop_on_sigterm, truncate_curve)


@dataclass
class Config:
    model: str = DEFAULT_MODEL_PATH  # shipped tiny model; a hub id or local path for real ones
    backend: str = "transformers"  # transformers | vllm
    device: str = "cpu"  # where the model runs (rollouts are stored on the CPU)
    threads: int = 1  # CPU threads for torch: the tiny model is fastest on one
    loss: str = "r2vpo"
    rollouts: int = 8192  # completions sampled in the whole run (the budget)
    seed: int = 0
    difficulty: str = "1"  # generator levels of the training and held-out problems
    num_problems: int = 4096  # training problems
    num_test: int = 512  # held-out problems
    num_prompts: int = 16  # distinct prompts per iteration
    group_size: int = 8  # completions per prompt
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    reuse: int = 2  # also train on the previous K batches
    epochs: int = 1
    minibatch_size: int = 32  # 4 optimiser steps per batch: later steps are off-policy
    lr: float = 1e-4  # 3e-4 lowers the shipped model's held-out accuracy (benchmarks/README.md)
    max_grad_norm: float = 1.0
    lagrange_multiplier: float = 1.0  # R2VPO's initial lambda
    ratio_var_target: float = 0.01  # R2VPO's delta
    dual: str = "adaptive"  # adaptive | fixed
    dual_lr: float = 10.0
    lambda_max: float = 0.0  # cap of the adaptive lambda (0: none)
    kl_to_ref: float = 0.0  # k3 KL to the initial model, as GRPOLoss's kl_to_ref_coeff
    entropy_coeff: float = 0.01  # GRPOLoss's entropy bonus (0: none, as the published losses)
    eval_every: int = 1024  # rollouts between held-out evaluations
    checkpoint_every: int = 1024
    logger: str = "csv"  # csv | tensorboard | wandb
    out: str = "runs/llm_math"
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace the run already in --out

    def __post_init__(self):
        for name in ("rollouts", "num_prompts", "epochs", "minibatch_size", "eval_every",
                     "checkpoint_every", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.entropy_coeff < 0:
            raise ValueError(f"--entropy-coeff must be >= 0, got {self.entropy_coeff}.")
        if self.lambda_max < 0 or 0 < self.lambda_max < self.lagrange_multiplier:
            raise ValueError(f"--lambda-max must be 0 (no cap) or >= --lagrange-multiplier "
                             f"{self.lagrange_multiplier}, got {self.lambda_max}.")
        if self.group_size < 2:  # a group of one has advantage 0: nothing would be learnt
            raise ValueError(f"--group-size must be >= 2, got {self.group_size}: advantages "
                             "are rewards relative to the other completions of the prompt.")
        batch = self.num_prompts * self.group_size
        if self.rollouts % batch:
            raise ValueError(f"--rollouts {self.rollouts} must be a multiple of --num-prompts x "
                             f"--group-size = {batch} (the completions of one iteration).")


# settings a resumed run may change; every other one must match the checkpoint's (num_test
# too: the curve's accuracies and the one before training are measured on the same problems)
RESUMABLE_CHANGES = {"rollouts", "device", "threads", "backend", "eval_every",
                     "checkpoint_every", "logger", "out", "resume", "overwrite"}


CHOICES = {"backend": ["transformers", "vllm"], "loss": sorted(LLM_LOSSES), "dual": ["adaptive", "fixed"],
           "logger": ["csv", "tensorboard", "wandb"]}
HELP = {"model": "hub id or local path of a causal LM (default: the tiny model shipped with the package)",
        "rollouts": "completions sampled over the run (the budget compared across losses)",
        "difficulty": "comma-separated generator levels: 1 one operation, 2 two, 3 word problems",
        "reuse": "also train on the K previous batches (stale data, tagged by policy version)",
        "dual": "adaptive: lambda follows dual ascent on Var(r) - delta; fixed: constant lambda",
        "kl_to_ref": "coefficient of the k3 KL to the initial model (0: none)",
        "entropy_coeff": "entropy bonus, as TorchRL's GRPOLoss (0: none, as the published "
                         "objectives of every --loss)",
        "lambda_max": "upper bound of the adaptive lambda (0: none); stale batches can hold "
                      "Var(r) above delta, and lambda then grows without one",
        "resume": "continue from --out/checkpoint.pt",
        "overwrite": "replace the run in --out (without it a fresh run refuses to)"}


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        text = HELP.get(field.name, "(default: %(default)s)")
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=text)
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[field.type],
                                default=field.default, choices=CHOICES.get(field.name), help=text)
    return Config(**vars(parser.parse_args(argv)))


def make_loss(cfg: Config, scorer):
    kwargs = dict(kl_to_ref_coeff=cfg.kl_to_ref or None, entropy_bonus=cfg.entropy_coeff > 0,
                  entropy_coeff=cfg.entropy_coeff)
    if cfg.loss == "r2vpo":
        kwargs.update(lagrange_multiplier=cfg.lagrange_multiplier, ratio_var_target=cfg.ratio_var_target)
    loss = make_llm_loss(cfg.loss, scorer, **kwargs)
    scheduler = None
    if cfg.loss == "r2vpo" and cfg.dual == "adaptive":
        scheduler = DualVariableScheduler(loss, lr=cfg.dual_lr, max_value=cfg.lambda_max or None)
    return loss, scheduler


def make_backend(cfg: Config, model, tokenizer, out: Path, version: int = 0):
    if cfg.backend == "transformers":
        return TransformersBackend(model, tokenizer, max_new_tokens=cfg.max_new_tokens)
    path = out / "vllm_model"  # vLLM loads its own copy; weights are synced after each update
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # a resumed run must not replay the engine's first draws: seed it by the policy version
    return VLLMBackend(model, tokenizer, str(path), max_new_tokens=cfg.max_new_tokens,
                       seed=cfg.seed + version)


def ratios_by_age(model, stored, version: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ratio pi_theta / pi_behaviour of the stored completions, their mask and age."""
    width = stored["tokens", "prompt"].shape[-1]
    mask = stored["masks", "all_assistant_mask"][:, width:]
    log_probs = response_log_probs(model, stored["tokens", "prompt"],
                                   stored["masks", "all_attention_mask"][:, :width],
                                   stored["tokens", "response"], mask)
    ratio = (log_probs - stored["log_probs", "full"][:, width:]).exp()
    return ratio, mask, version - stored["policy_version"]


def plot_run(rows: list[dict], samples: dict[int, torch.Tensor], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_reward", "training reward"), ("test_accuracy", "held-out accuracy")):
        points = [(r["rollouts"], r[key]) for r in rows if r[key] != ""]
        if points:
            axes[0].plot(*zip(*points), "o-" if key == "test_accuracy" else "-", label=label)
    axes[0].set(xlabel="rollouts", title=title)
    axes[0].legend()
    for age, ratio in sorted(samples.items()):
        axes[1].hist(ratio.clamp(0, 3).numpy(), bins=60, histtype="step", density=True,
                     label=f"{age} update(s) old")
    axes[1].set(xlabel="token ratio pi_theta / pi_behaviour (clamped to [0, 3])", yscale="log",
                title="ratio by staleness (last iterations)")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


CURVE_FIELDS = ["rollouts", "time_s", "tokens_per_s", "train_reward", "test_accuracy",
                "lagrange_multiplier", "ratio_var", "ESS", "clip_fraction", "kl_approx",
                "loss_objective", "kl_to_ref", "grad_norm"]


def main(cfg: Config) -> dict:
    out = Path(cfg.out)
    ckpt_path, curve_path = open_run_dir(out, cfg.resume, cfg.overwrite)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)

    model, tokenizer = load_math_lm(cfg.model, device=cfg.device)
    # the initial model, frozen: the reference of the optional KL penalty (kept across --resume)
    reference = copy.deepcopy(model).requires_grad_(False) if cfg.kl_to_ref else None
    levels = tuple(int(x) for x in cfg.difficulty.split(","))
    train = generate_problems(cfg.num_problems, split="train", difficulty=levels, seed=cfg.seed)
    test = generate_problems(cfg.num_test, split="test", difficulty=levels, seed=10_000)
    env = TokenGenerationEnv([format_prompt(p.question) for p in train], [p.answer for p in train],
                             tokenizer, num_prompts=cfg.num_prompts, group_size=cfg.group_size,
                             max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                             vocab_size=model.config.vocab_size,
                             stop_token_ids=stop_token_ids(model, tokenizer))
    scorer = TransformersWrapper(model, tokenizer=tokenizer, input_mode="tokens", generate=False,
                                 return_log_probs=True, pad_output=True, device=cfg.device)
    loss, scheduler = make_loss(cfg, scorer)
    loss.to(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    batch_rows = cfg.num_prompts * cfg.group_size
    # the last K+1 batches, each row tagged with the policy version that sampled it
    history = TensorDictReplayBuffer(storage=LazyTensorStorage((cfg.reuse + 1) * batch_rows))
    minibatches = TensorDictReplayBuffer(
        storage=LazyTensorStorage((cfg.reuse + 1) * batch_rows),
        sampler=SamplerWithoutReplacement(drop_last=False), batch_size=cfg.minibatch_size)

    def accuracy() -> float:
        return evaluate_accuracy(model, tokenizer, test, max_new_tokens=cfg.max_new_tokens)

    # --- resume -------------------------------------------------------------------------
    rollouts, version, logger_state, initial_accuracy = 0, 0, None, None
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        check_resumable(ckpt["config"], cfg, RESUMABLE_CHANGES)
        loss.load_state_dict(ckpt["loss"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        history.load_state_dict(ckpt["history"])
        env.load_state_dict(ckpt["env"])
        rollouts, version, logger_state = ckpt["rollouts"], ckpt["version"], ckpt["logger"]
        initial_accuracy = ckpt["initial_accuracy"]
        set_rng_state(ckpt["rng"])
        print(f"resumed at {rollouts} rollouts: lambda "
              f"{float(getattr(loss, 'lagrange_multiplier', float('nan'))):.9g}, "
              f"{len(history)} stored completions")
    elif cfg.resume:
        print(f"--resume: no checkpoint in {out}, starting from scratch")
    rows = truncate_curve(curve_path, "rollouts", rollouts, CURVE_FIELDS)
    if initial_accuracy is None:
        initial_accuracy = accuracy()
    print(f"held-out accuracy before training: {initial_accuracy:.3f} ({len(test)} problems)")

    try:
        logger = get_logger(cfg.logger, logger_name=str(out / "logs"),
                            experiment_name=f"{cfg.loss}-seed{cfg.seed}", state_dict=logger_state,
                            wandb_kwargs={"config": dataclasses.asdict(cfg), "project": "torchrl_r2vpo"})
    except ImportError as err:
        raise SystemExit(f"--logger {cfg.logger} needs its package: pip install {cfg.logger} "
                         f"({err})") from err
    backend = make_backend(cfg, model, tokenizer, out, version)

    def snapshot() -> dict:
        """The whole training state, copied: taken after each iteration, saved as a checkpoint."""
        return copy.deepcopy(dict(
            config=dataclasses.asdict(cfg), rollouts=rollouts, version=version,
            initial_accuracy=initial_accuracy, loss=loss.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            history=history.state_dict(), env=env.state_dict(), logger=logger.state_dict(),
            rng=rng_state()))

    last_state = snapshot()
    ratio_samples: dict[int, list[torch.Tensor]] = {}
    # the last evaluation of a resumed curve (rows without one only trained)
    test_accuracy = next((float(r["test_accuracy"]) for r in reversed(rows) if r["test_accuracy"] != ""),
                         initial_accuracy)

    # --- training loop ------------------------------------------------------------------
    pbar = tqdm(total=cfg.rollouts, initial=rollouts, unit="rollouts", dynamic_ncols=True)
    last_eval, last_ckpt = rollouts // cfg.eval_every, rollouts // cfg.checkpoint_every
    start = time.perf_counter()
    try:
        while rollouts < cfg.rollouts:
            iteration_start = time.perf_counter()
            batch = collect_batch(env, backend, policy_version=version)
            batch["advantage"] = group_advantages(batch["next", "reward"], cfg.group_size)
            if reference is not None:  # log-probs of the initial model, for the KL penalty
                width = batch["tokens", "prompt"].shape[-1]
                batch["next", "ref_log_probs", "full"] = torch.cat([
                    torch.zeros(batch["tokens", "prompt"].shape),
                    response_log_probs(reference, batch["tokens", "prompt"],
                                       batch["masks", "all_attention_mask"][:, :width],
                                       batch["tokens", "response"],
                                       batch["masks", "all_assistant_mask"][:, width:])], -1)
            history.extend(batch)
            stored = history[: len(history)]
            metrics = []
            # the model stays in eval mode: dropout in this forward pass would make the
            # ratio differ from 1 on the data it sampled (its log-probs were taken in eval mode)
            for _ in range(cfg.epochs):
                minibatches.empty()
                minibatches.extend(stored)
                for minibatch in minibatches:
                    out_td = loss(minibatch.to(cfg.device))
                    total = sum(v for k, v in out_td.items() if k.startswith("loss_"))
                    total.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if scheduler is not None:
                        scheduler.step(out_td)
                    metrics.append(out_td.to_tensordict().detach().cpu().set("grad_norm", grad_norm.cpu()))
            ratio, mask, age = ratios_by_age(model, stored, version)
            staleness = staleness_stats(ratio, age, mask)
            for k in age.unique().tolist():
                samples = ratio_samples.setdefault(k, [])
                samples.append(ratio[mask & (age == k)[:, None]])
                del samples[:-10]
            backend.sync_weights(model)
            version += 1
            rollouts += batch.numel()

            # --- metrics, evaluation, checkpoint --------------------------------------------
            now = time.perf_counter()
            tokens = batch["masks", "all_assistant_mask"].sum().item()
            mean_metrics = {k: torch.stack([m[k].float() for m in metrics]).mean().item()
                            for k in metrics[0].keys() if metrics[0][k].numel() == 1}
            row = {key: "" for key in CURVE_FIELDS}
            row.update(rollouts=rollouts, time_s=round(now - start, 2),
                       tokens_per_s=round(tokens / (now - iteration_start), 1),
                       train_reward=batch["next", "reward"].mean().item())
            for key in CURVE_FIELDS:
                if key in mean_metrics:
                    row[key] = mean_metrics[key]
            if rollouts // cfg.eval_every > last_eval or rollouts >= cfg.rollouts:
                last_eval = rollouts // cfg.eval_every
                test_accuracy = row["test_accuracy"] = accuracy()
            with interrupts_deferred():  # the row, its logs and its state, together
                for key, value in {**row, **staleness}.items():
                    if key != "rollouts" and value != "":
                        logger.log_scalar(key, value, step=rollouts)
                append_row(curve_path, CURVE_FIELDS, row)
                rows.append(row)
                last_state = snapshot()
                if rollouts // cfg.checkpoint_every > last_ckpt or rollouts >= cfg.rollouts:
                    last_ckpt = rollouts // cfg.checkpoint_every
                    save_checkpoint(ckpt_path, last_state)
            pbar.update(batch.numel())
            pbar.set_postfix(reward=f"{row['train_reward']:.2f}", acc=f"{test_accuracy:.3f}",
                             lam=f"{float(getattr(loss, 'lagrange_multiplier', float('nan'))):.3g}",
                             var=f"{staleness.get('stale0/ratio_var', float('nan')):.4f}",
                             tok_s=row["tokens_per_s"])
    except KeyboardInterrupt:  # save the state after the last complete iteration
        save_checkpoint(ckpt_path, last_state)
        print(f"\ninterrupted at {last_state['rollouts']} rollouts; checkpoint saved, "
              "continue with --resume")
        return {"rollouts": last_state["rollouts"], "interrupted": True}
    finally:
        pbar.close()

    final_accuracy = test_accuracy
    plot_run([{k: (float(v) if v != "" else "") for k, v in r.items()} for r in rows],
             {k: torch.cat(v) for k, v in ratio_samples.items()}, out / "curve.png",
             f"{cfg.loss} on generated math (seed {cfg.seed})")
    print(f"held-out accuracy after training: {final_accuracy:.3f} "
          f"(before: {initial_accuracy:.3f}); curve and ratio plot: {out / 'curve.png'}")
    return {"rollouts": rollouts, "initial_accuracy": initial_accuracy,
            "final_accuracy": final_accuracy}


if __name__ == "__main__":
    stop_on_sigterm()
    main(parse_args())
