"""RL fine-tuning of a language model on math problems with R2VPO (or a GRPO-family baseline).

    python examples/llm_math.py                          # shipped tiny model, offline, R2VPO + reuse
    python examples/llm_math.py --loss grpo --reuse 0    # GRPO, on-policy
    python examples/llm_math.py --task arithmetic        # the older arithmetic and word-problem pool
    python examples/llm_math.py --model Qwen/Qwen2.5-0.5B-Instruct --backend vllm
    python examples/llm_math.py --resume                 # continue an interrupted run in --out
    python examples/llm_math.py --help                   # every setting (LLMConfig)

The settings are ``torchrl_r2vpo.recipes.config.LLMConfig``, one flag per field. The default
task is 2-digit addition answered least significant digit first, with a fresh problem for every
prompt; held-out accuracy is sampled at temperature 1 with a fixed seed (greedy accuracy in the
curve too, pass@8 before and after). Each iteration samples ``--group-size`` completions for
each of ``--num-prompts`` training problems, scores them with the math verifier, standardises the rewards within each group
(GRPO's advantage) and trains on this batch and the ``--reuse`` previous ones, each tagged
with the policy version that sampled it; with ``--lag K`` the batch is sampled by the policy
of K updates ago, as an asynchronous pipeline would. Before each update the current model
scores every stored completion once (the proximal log-probabilities of the decoupled losses);
with ``--dual adaptive`` R2VPO's lambda takes one step per iteration on Var(r) pooled over its
minibatches. Writes to ``--out``: ``curve.csv`` (one row per iteration), ``staleness.csv``
(one row per iteration and data age: the update's ratio statistics, the behaviour weights),
``curve.png`` (reward and accuracy; ratio distributions by staleness), ``checkpoint.pt``
(every ``--checkpoint-every`` rollouts and on Ctrl-C or SIGTERM) and the logger's files.
An optimiser step with a non-finite loss or gradient norm is skipped (with a warning, and
counted in ``skipped_steps``); ``MAX_SKIPS`` in a row stop the run with an error, after saving
the state of the last complete iteration.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time
from pathlib import Path

import torch

if importlib.util.find_spec("transformers") is None:
    raise SystemExit("examples/llm_math.py needs transformers: pip install 'torchrl_r2vpo[llm]'.")

from torchrl.data import TensorDictReplayBuffer
from torchrl.modules.llm import TransformersWrapper
from tqdm import tqdm

from torchrl_r2vpo.collectors import collect_batch
from torchrl_r2vpo.data import (ASSISTANT_MASK_KEY, group_advantages, PROXIMAL_LOG_PROBS_KEY,
                                staleness_table, ZeroedLazyTensorStorage)
from torchrl_r2vpo.math_task import load_math_lm
from torchrl_r2vpo.objectives import merge_ratio_stats
from torchrl_r2vpo.recipes.config import LLMConfig, parse
from torchrl_r2vpo.recipes.llm import (CURVE_FIELDS, held_out_accuracy, keep_ratio_samples,
                                       LaggedPolicy, make_backend, make_loss, make_task, plot_run,
                                       sequence_log_probs, STALENESS_CSV_FIELDS, update_staleness)
from torchrl_r2vpo.recipes.run_state import (append_row, curve_row, interrupts_deferred,
                                             load_checkpoint, log_row, make_logger, open_run_dir,
                                             read_curve, save_checkpoint, Schedule, seed_everything,
                                             snapshot, stop_on_sigterm, truncate_curve)
from torchrl_r2vpo.recipes.update import (make_update, mean_metrics, minibatch_epochs,
                                          NonFiniteUpdateError)


def main(cfg: LLMConfig) -> dict:
    """Trains, evaluates and writes the outputs of one run."""
    out = Path(cfg.out)
    ckpt_path, curve_path = open_run_dir(out, cfg.resume, cfg.overwrite)
    staleness_path = out / "staleness.csv"
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)

    # --- model, task, loss --------------------------------------------------------------
    model, tokenizer = load_math_lm(cfg.model_path, device=cfg.device)
    # the initial model, frozen: the reference of the optional KL penalty (kept across --resume)
    reference = copy.deepcopy(model).requires_grad_(False) if cfg.kl_to_ref else None
    env, test = make_task(cfg, model, tokenizer)
    scorer = TransformersWrapper(model, tokenizer=tokenizer, input_mode="tokens", generate=False,
                                 return_log_probs=True, pad_output=True, device=cfg.device)
    loss, scheduler = make_loss(cfg, scorer)
    loss.to(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    update = make_update(loss, optimizer, cfg.max_grad_norm, clip_groups=[model.parameters()])
    dual_per_minibatch = scheduler is not None and cfg.dual_every == "minibatch"
    sampler = LaggedPolicy(model, cfg.lag)  # the policy that samples, --lag updates behind
    # the last K+1 batches, each row tagged with the policy version that sampled it
    capacity = (cfg.reuse + 1) * cfg.num_prompts * cfg.group_size
    history = TensorDictReplayBuffer(storage=ZeroedLazyTensorStorage(capacity))

    # --- resume -------------------------------------------------------------------------
    rollouts, version, logger_state, initial = 0, 0, None, None
    ckpt = load_checkpoint(ckpt_path, cfg, map_location="cpu")
    if ckpt is not None:
        loss.load_state_dict(ckpt["loss"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        history.load_state_dict(ckpt["history"])
        env.load_state_dict(ckpt["env"])
        if ckpt.get("sampler") is not None:  # saved since --lag exists
            sampler.load_state_dict(ckpt["sampler"])
        rollouts, version, logger_state = ckpt["rollouts"], ckpt["version"], ckpt["logger"]
        initial = ckpt["initial_accuracy"]
        print(f"resumed at {rollouts} rollouts: lambda "
              f"{float(getattr(loss, 'lagrange_multiplier', math.nan)):.9g}, "
              f"{len(history)} stored completions")
    rows = truncate_curve(curve_path, "rollouts", rollouts, CURVE_FIELDS)
    # the seconds of training before this process: time_s counts on across resumes
    time_before = float(rows[-1]["time_s"]) if rows else 0.0  # a checkpoint without time_s
    time_s = time_before = ckpt.get("time_s", time_before) if ckpt is not None else 0.0
    truncate_curve(staleness_path, "rollouts", rollouts, STALENESS_CSV_FIELDS)
    if initial is None:
        initial = held_out_accuracy(cfg, model, tokenizer, test, pass_at=8)
    print(f"held-out accuracy before training: {initial['sampled']:.3f} ({len(test)} problems, "
          f"sampled; greedy {initial['greedy']:.3f}, pass@8 {initial['pass@8']:.3f})")
    logger = make_logger(cfg, out, f"{cfg.loss}-seed{cfg.seed}", logger_state)
    backend = make_backend(cfg, sampler.model, tokenizer, out, version)

    def state() -> dict:
        """The whole training state, copied: taken after each iteration, saved as a checkpoint."""
        return snapshot(cfg, rollouts=rollouts, version=version, time_s=time_s,
                        initial_accuracy=initial,
                        loss=loss.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict() if scheduler is not None else None,
                        history=history.state_dict(), env=env.state_dict(),
                        sampler=sampler.state_dict(), logger=logger.state_dict())

    last_state = state()
    ratio_samples: dict[int, list[torch.Tensor]] = {}
    # the last evaluation of a resumed curve (rows without one only trained)
    test_accuracy = next((float(r["test_accuracy"]) for r in reversed(rows) if r["test_accuracy"] != ""),
                         initial["sampled"])

    # --- training loop ------------------------------------------------------------------
    pbar = tqdm(total=cfg.rollouts, initial=rollouts, unit="rollouts", dynamic_ncols=True)
    accuracy = None  # this process's last evaluation: the trained model's once the loop ends
    eval_due = Schedule(cfg.eval_every, rollouts, cfg.rollouts)
    checkpoint_due = Schedule(cfg.checkpoint_every, rollouts, cfg.rollouts)
    start = time.perf_counter()
    try:
        while rollouts < cfg.rollouts:
            iteration_start = time.perf_counter()
            batch = collect_batch(env, backend, policy_version=sampler.version)
            batch["advantage"] = group_advantages(batch["next", "reward"], cfg.group_size)
            if reference is not None:  # log-probs of the initial model, for the KL penalty
                batch["next", "ref_log_probs", "full"] = sequence_log_probs(reference, batch)
            history.extend(batch)
            stored = history[: len(history)]
            # the model stays in eval mode: dropout in a forward pass would make the ratio
            # differ from 1 on the data it sampled (its log-probs were taken in eval mode)
            stored[PROXIMAL_LOG_PROBS_KEY] = sequence_log_probs(model, stored)
            metrics, skipped = [], 0
            for minibatch in minibatch_epochs(stored, cfg.minibatch_size, cfg.epochs,
                                              drop_last=False):
                out_td = update(minibatch.to(cfg.device))
                if out_td is None:  # a non-finite loss or gradient: no step, no dual step
                    skipped += 1
                    continue
                if dual_per_minibatch:
                    scheduler.step(out_td)
                metrics.append(out_td.cpu())
            if scheduler is not None and not dual_per_minibatch and metrics:  # on the pooled Var(r)
                scheduler.step(merge_ratio_stats(metrics, variance_center=loss.variance_center))
            sums, ratio, mask, age = update_staleness(model, stored, version)
            keep_ratio_samples(ratio_samples, ratio, mask, age)
            version += 1
            sampler.push(model, version)
            backend.sync_weights(sampler.model)
            rollouts += batch.numel()

            # --- metrics, evaluation, checkpoint --------------------------------------------
            now = time.perf_counter()
            time_s = time_before + now - start
            tokens = batch[ASSISTANT_MASK_KEY].sum().item()
            row = curve_row(CURVE_FIELDS, mean_metrics(metrics), rollouts=rollouts,
                            time_s=round(time_s, 2), skipped_steps=skipped,
                            tokens_per_s=round(tokens / (now - iteration_start), 1),
                            train_reward=batch["next", "reward"].mean().item())
            if eval_due(rollouts):
                accuracy = held_out_accuracy(cfg, model, tokenizer, test)
                test_accuracy = row["test_accuracy"] = accuracy["sampled"]
                row["test_greedy"] = accuracy["greedy"]
            with interrupts_deferred():  # the row, its logs and its state, together
                staleness = staleness_table(sums)
                log_row(logger, curve_path, CURVE_FIELDS, row, "rollouts",
                        {f"stale{k}/{f}": v for k, r in staleness.items() for f, v in r.items()})
                for k, stats in staleness.items():
                    append_row(staleness_path, STALENESS_CSV_FIELDS, dict(rollouts=rollouts, age=k, **stats))
                last_state = state()
                if checkpoint_due(rollouts):
                    save_checkpoint(ckpt_path, last_state)
            pbar.update(batch.numel())
            pbar.set_postfix(reward=f"{row['train_reward']:.2f}", acc=f"{test_accuracy:.3f}",
                             lam=f"{float(getattr(loss, 'lagrange_multiplier', math.nan)):.3g}",
                             var=f"{row['ratio_var']:.4f}" if row["ratio_var"] != "" else "-",
                             tok_s=row["tokens_per_s"])
    except KeyboardInterrupt:  # save the state after the last complete iteration
        save_checkpoint(ckpt_path, last_state)
        print(f"\ninterrupted at {last_state['rollouts']} rollouts; checkpoint saved, "
              "continue with --resume")
        return {"rollouts": last_state["rollouts"], "interrupted": True}
    except NonFiniteUpdateError as err:  # diverged: keep the state from before the fault
        save_checkpoint(ckpt_path, last_state)
        raise NonFiniteUpdateError(f"{err} in the iteration after {last_state['rollouts']} "
                                   f"rollouts; {ckpt_path} holds the run there") from None
    finally:
        pbar.close()

    # --- results --------------------------------------------------------------------------
    plot_run(read_curve(curve_path), ratio_samples, out / "curve.png",
             f"{cfg.loss} on {cfg.task} (seed {cfg.seed})")
    final = held_out_accuracy(cfg, model, tokenizer, test, pass_at=8, measured=accuracy)
    print(f"held-out accuracy after training: {final['sampled']:.3f} (before: "
          f"{initial['sampled']:.3f}; greedy {final['greedy']:.3f}, pass@8 {final['pass@8']:.3f}); "
          f"curve and ratio plot: {out / 'curve.png'}")
    return {"rollouts": rollouts, "initial_accuracy": initial["sampled"],
            "final_accuracy": final["sampled"], "initial": initial, "final": final}


if __name__ == "__main__":
    stop_on_sigterm()
    try:
        main(parse(LLMConfig, description=__doc__.splitlines()[0]))
    except NonFiniteUpdateError as err:  # one line and a non-zero exit status
        raise SystemExit(f"{Path(__file__).name}: error: {err}") from None
