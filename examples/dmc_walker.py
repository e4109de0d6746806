"""R2VPO (or clipped PPO) on DeepMind Control, end to end with TorchRL parts.

    python examples/dmc_walker.py                         # walker-walk, R2VPO, fixed lambda
    python examples/dmc_walker.py --loss ppo              # ClipPPOLoss, same networks and data
    python examples/dmc_walker.py --env cheetah-run --frames 1000000 --dual adaptive
    python examples/dmc_walker.py --env HalfCheetah-v5    # any gymnasium id works too
    python examples/dmc_walker.py --reuse 2               # also train on the 2 previous batches
    python examples/dmc_walker.py --env cartpole-swingup_sparse --frames 3000000 --frame-skip 4 --state-independent-scale --frames-per-batch 16384 --dual adaptive
    python examples/dmc_walker.py --resume                # continue an interrupted run in --out
    python examples/dmc_walker.py --compile               # torch.compile the update step
    python examples/dmc_walker.py --env playground:WalkerWalk --device cuda   # MuJoCo Playground
    python examples/dmc_walker.py --num-workers 2 --collector ray             # Ray workers
    python examples/dmc_walker.py --help                  # every setting (ControlConfig)

The settings are ``torchrl_r2vpo.recipes.config.ControlConfig``, one flag per field. A
``playground:<TaskName>`` environment is one batch of ``--num-envs`` MuJoCo Playground
environments simulated in JAX on ``--device``; collection, GAE and updates all stay on that
device, and the defaults become those of Playground's tuned Brax PPO configuration
(``PLAYGROUND`` in the same module), for both losses; flags given on the command line still win.

Each iteration collects ``--frames-per-batch`` frames (simulator steps: with ``--frame-skip k``
each action is repeated ``k`` times and the batch holds ``1/k`` as many transitions), tags them
with the policy version that collected them, and trains ``--epochs`` passes of minibatches over
this batch and the ``--reuse`` previous ones, with GAE recomputed by the current critic before
each pass. With ``--reuse``, R2VPO constrains the ratio to the policy at the start of the update
and weights stale data by pi_prox / pi_behaviour, truncated at ``--max-behaviour-weight``
(``--ratio proximal``, the default), or constrains pi_theta / pi_behaviour (``--ratio
behaviour``).

The deterministic policy is evaluated from ``--eval-episodes`` fresh starts every
``--eval-every`` frames, and after the last batch from ``--final-eval-episodes`` starts, whose
mean and median are printed at the end.

Writes to ``--out``: ``curve.csv`` (one row per collected batch), ``curve.png``,
``final_eval.csv`` (the final evaluation's return from each start), ``checkpoint.pt`` (every
``--checkpoint-every`` frames and on Ctrl-C or SIGTERM), the logger's files, and
``policy.gif`` where MuJoCo can render offscreen.

An optimiser step with a non-finite loss or gradient norm is skipped (with a warning, and
counted in ``skipped_steps``); ``MAX_SKIPS`` in a row stop the run with an error, after saving
the state of the last complete batch. ``--resume`` restores everything but the simulators:
the resumed environments start new episodes, so a resumed run is repeatable but not the
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
from torchrl.data import TensorDictReplayBuffer
from torchrl.objectives.value import GAE
from tqdm import tqdm

from torchrl_r2vpo.data import ZeroedLazyTensorStorage
from torchrl_r2vpo.envs import make_env
from torchrl_r2vpo.modules import RunningReturnNorm, UpdateMeanNoise
from torchrl_r2vpo.recipes.config import ControlConfig, parse
from torchrl_r2vpo.recipes.control import (CURVE_FIELDS, action_log_probs, episode_returns,
                                           eval_seed, evaluate, load_optimizer_state, make_agent,
                                           make_collector, make_loss, make_optimizer, plot_curve,
                                           ratio_stats_by_staleness, RecentReturns,
                                           save_final_eval, set_lr, try_record_video)
from torchrl_r2vpo.recipes.run_state import (curve_row, interrupts_deferred, LinearDecay,
                                             load_checkpoint, log_row, make_logger, open_run_dir,
                                             read_curve, save_checkpoint, Schedule, seed_everything,
                                             snapshot, stop_on_sigterm, truncate_curve)
from torchrl_r2vpo.recipes.update import (make_update, mean_metrics, minibatch_epochs,
                                          NonFiniteUpdateError)
from torchrl_r2vpo.record import select_mujoco_gl


def main(cfg: ControlConfig) -> dict:
    """Trains, evaluates and writes the outputs of one run."""
    out = Path(cfg.out)
    ckpt_path, curve_path = open_run_dir(out, cfg.resume, cfg.overwrite)
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    gl_problem = None  # before MuJoCo is imported: a renderer for the video, or none at all
    if cfg.video and not cfg.playground:
        gl_problem = select_mujoco_gl()
    else:
        os.environ.setdefault("MUJOCO_GL", "disable")

    # --- environments, networks, loss ---------------------------------------------------
    if cfg.playground:  # one batch of environments on the device, for training and evaluation
        env = eval_env = make_env(cfg.env, num_envs=cfg.num_envs, seed=cfg.seed, device=device)
    else:  # the collector builds its own; these are seeded at each evaluation
        env, eval_env = None, make_env(cfg.env, num_envs=cfg.eval_episodes,
                                       frame_skip=cfg.frame_skip)
    obs_dim = eval_env.observation_spec["observation"].shape[-1]
    act_dim = eval_env.action_spec.shape[-1]
    actor, critic, obs_norm = make_agent(eval_env, obs_dim, act_dim,
                                         initial_scale=cfg.initial_scale,
                                         state_independent_scale=cfg.state_independent_scale,
                                         rpo_alpha=cfg.rpo_alpha)
    # RPO's noise on the actor's mean, in the optimiser steps only
    rpo = next((m for m in actor.modules() if isinstance(m, UpdateMeanNoise)), None)
    actor.to(device)
    critic.to(device)
    loss, scheduler = make_loss(cfg, actor, critic)
    optimizer = make_optimizer(loss, cfg.lr, cfg.compile)
    gae = GAE(gamma=cfg.gamma, lmbda=cfg.gae_lambda, value_network=critic, average_gae=False,
              device=device)
    reward_norm = RunningReturnNorm(cfg.gamma).to(device) if cfg.normalize_reward else None
    # the last K+1 collected batches, each tagged with the policy version that collected it
    history = TensorDictReplayBuffer(storage=ZeroedLazyTensorStorage(cfg.reuse + 1, device=device))

    # --- resume -------------------------------------------------------------------------
    frames, version, logger_state = 0, 0, None
    lr_schedule = LinearDecay(cfg.lr, 0, cfg.frames)  # annealed linearly to 0 at --frames
    ckpt = load_checkpoint(ckpt_path, cfg, map_location=device)
    if ckpt is not None:
        loss.load_state_dict(ckpt["loss"])
        load_optimizer_state(optimizer, ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        history.load_state_dict(ckpt["history"])
        if reward_norm is not None:
            if ckpt.get("reward_norm") is None:  # a checkpoint from before the setting
                raise ValueError("--resume: the checkpoint has normalize_reward=False, not True")
            reward_norm.load_state_dict(ckpt["reward_norm"])
        frames, version, logger_state = ckpt["frames"], ckpt["version"], ckpt["logger"]
        # a longer --frames continues the schedule from the checkpoint's learning rate
        saved = ckpt.get("lr_schedule", dict(value=cfg.lr, start=0, end=ckpt["config"]["frames"]))
        lr_schedule = LinearDecay(**saved).resumed(frames, cfg.frames)
        print(f"resumed at frame {frames}: lambda {getattr(loss, 'lagrange_multiplier', math.nan):.9g}, "
              f"observation count {int(obs_norm.count)}")
    rows = truncate_curve(curve_path, "frames", frames, CURVE_FIELDS)
    # the seconds of training before this process: time_s counts on across resumes
    time_before = float(rows[-1]["time_s"]) if rows else 0.0  # a checkpoint without time_s
    time_s = time_before = ckpt.get("time_s", time_before) if ckpt is not None else 0.0
    logger = make_logger(cfg, out, f"{cfg.loss}-{cfg.env.replace(':', '-')}-seed{cfg.seed}",
                         logger_state)

    def state() -> dict:
        """The whole training state, copied: taken after each batch, saved as a checkpoint."""
        return snapshot(cfg, frames=frames, version=version, time_s=time_s,
                        lr_schedule=lr_schedule.state_dict(), loss=loss.state_dict(),
                        optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict() if scheduler is not None else None,
                        history=history.state_dict(), logger=logger.state_dict(),
                        reward_norm=reward_norm.state_dict() if reward_norm is not None else None)

    def final_evaluation(frames: int) -> torch.Tensor:
        """The policy's return from each of --final-eval-episodes fresh starts (Playground:
        its batch), one episode each, also written to final_eval.csv."""
        if cfg.playground:
            returns = episode_returns(env, actor)
        else:  # the starts of the evaluation it replaces, and more
            final_env = make_env(cfg.env, num_envs=cfg.final_eval_episodes,
                                 frame_skip=cfg.frame_skip)
            try:
                final_env.set_seed(eval_seed(cfg, frames))
                returns = episode_returns(final_env, actor)
            finally:
                final_env.close(raise_if_closed=False)
        save_final_eval(out / "final_eval.csv", frames, returns)
        return returns

    last_state = state()
    update = make_update(loss, optimizer, cfg.max_grad_norm, compile=cfg.compile)
    # with stale data, R2VPO's ratio is taken against the policy at the start of each update
    proximal_key = (loss.tensor_keys.proximal_log_prob
                    if cfg.loss == "r2vpo" and cfg.ratio == "proximal" and cfg.reuse > 0 else None)
    threads = torch.get_num_threads()

    # --- training loop ------------------------------------------------------------------
    pbar = tqdm(total=cfg.frames, initial=frames, unit="frames", dynamic_ncols=True)
    eval_due = Schedule(cfg.eval_every, frames, cfg.frames)
    checkpoint_due = Schedule(cfg.checkpoint_every, frames, cfg.frames)
    eval_return, final_returns = math.nan, None
    recent = RecentReturns()  # the progress bar's mean return of the last 10 episodes
    # built last: from here on, whatever happens, the finally below shuts its workers down
    collector = None
    if frames < cfg.frames:  # a resumed run starts fresh episodes, seeded by its version
        collector = make_collector(cfg, actor, cfg.frames - frames, seed=cfg.seed + 1000 * version,
                                   env=env)
    else:
        print(f"nothing to train: {frames} frames done, --frames {cfg.frames}")
    start = iteration_start = time.perf_counter()
    try:
        for data in collector if collector is not None else ():
            torch.set_num_threads(threads)  # a batched env closed after the last batch raises it
            recent.update(data)  # before --reward-scale: the bar shows the task's rewards
            lr = lr_schedule(frames)
            set_lr(optimizer, lr)
            data.set("policy_version", torch.full(data.shape, version, device=data.device))
            if cfg.reward_scale != 1:  # the returns reported below stay unscaled
                data.set(("next", "reward"), data["next", "reward"] * cfg.reward_scale)
            if reward_norm is not None:  # the statistics include this batch's returns
                reward_norm.update(data["next", "reward"], data["next", "done"])
                data.set(("next", "reward"), reward_norm(data["next", "reward"]))
            update_start = time.perf_counter()
            history.extend(data.unsqueeze(0))
            stored = history[: len(history)]  # [K + 1, (workers,) envs, T]: GAE runs along T
            if proximal_key is not None:  # log pi_prox, once per update, fresh and stale rows
                stored.set(proximal_key, action_log_probs(actor, stored))
            metrics, skipped = [], 0
            with rpo.active() if rpo is not None else contextlib.nullcontext():
                for batch in minibatch_epochs(stored, cfg.minibatch_size, cfg.epochs, prepare=gae):
                    out_td = update(batch)
                    if out_td is None:  # a non-finite loss or gradient: no step, no dual step
                        skipped += 1
                        continue
                    if scheduler is not None and not scheduler.fixed:
                        scheduler.step(out_td)
                    metrics.append(out_td)
            if device.type == "cuda":  # the time of the work, not of queueing it
                torch.cuda.synchronize(device)
            update_s = time.perf_counter() - update_start  # GAE and the optimiser steps
            staleness = ratio_stats_by_staleness(actor, stored.reshape(-1), version,
                                                 proximal_log_prob_key=proximal_key,
                                                 clip_epsilon=cfg.clip_epsilon)
            obs_norm.update(data["observation"])  # after training: data and update agree
            collector.update_policy_weights_()
            version += 1
            batch_frames = data.numel() * cfg.frame_skip  # simulator steps
            frames += batch_frames

            # --- metrics, evaluation, checkpoint --------------------------------------------
            returns = data["next", "episode_reward"][data["next", "done"]]
            now = time.perf_counter()  # frames/s of collection and training, not evaluation
            time_s = time_before + now - start
            row = curve_row(CURVE_FIELDS, mean_metrics(metrics), frames=frames,
                            time_s=round(time_s, 2),
                            fps=round(batch_frames / (now - iteration_start), 1),
                            update_s=round(update_s, 3), lr=lr,
                            skipped_steps=skipped,
                            physics_errors=data.get(("next", "physics_error"), torch.zeros(())).sum().item(),
                            train_return=returns.mean().item() if returns.numel() else "")
            stop = cfg.time_limit > 0 and now - start >= cfg.time_limit
            if eval_due(frames, force=stop):
                if stop or frames >= cfg.frames:  # after the last batch: the final evaluation
                    final_returns = final_evaluation(frames)
                    row["eval_return"] = final_returns.mean().item()
                else:
                    if eval_env is not env:  # its own environments: starts that a resume keeps
                        eval_env.set_seed(eval_seed(cfg, frames))
                    row["eval_return"] = evaluate(eval_env, actor)
                eval_return = row["eval_return"]
                if eval_env is env:  # the collector's episodes were interrupted: start afresh
                    collector.reset()
            with interrupts_deferred():  # the row, its logs and its state, together
                log_row(logger, curve_path, CURVE_FIELDS, row, "frames", staleness)
                last_state = state()
                if checkpoint_due(frames, force=stop):
                    save_checkpoint(ckpt_path, last_state)
            pbar.update(batch_frames)
            pbar.set_postfix(fps=row["fps"], ret=str(recent),
                             eval=f"{eval_return:.1f}", lam=row["lagrange_multiplier"] or "-",
                             var=f"{row['ratio_var']:.4f}" if row["ratio_var"] != "" else "-")
            if stop:
                print(f"\n--time-limit {cfg.time_limit:g} s reached at frame {frames}")
                break
            iteration_start = time.perf_counter()
    except KeyboardInterrupt:  # save the state after the last complete batch, not a half update
        save_checkpoint(ckpt_path, last_state)
        frames = last_state["frames"]
        print(f"\ninterrupted at frame {frames}; checkpoint saved, continue with --resume")
        return {"interrupted": True, "frames": frames}
    except NonFiniteUpdateError as err:  # diverged: keep the state from before the fault
        save_checkpoint(ckpt_path, last_state)
        raise NonFiniteUpdateError(f"{err} in the batch after frame {last_state['frames']}; "
                                   f"{ckpt_path} holds the run at that frame") from None
    finally:
        pbar.close()
        if eval_env is not env:
            eval_env.close(raise_if_closed=False)  # a stop signal may have closed it
        if collector is not None:
            collector.shutdown()

    # --- results --------------------------------------------------------------------------
    rows = read_curve(curve_path)
    plot_curve(rows, out / "curve.png", f"{cfg.loss} on {cfg.env}, seed {cfg.seed}")
    if final_returns is None:  # nothing trained in this process: the checkpoint's policy
        final_returns = final_evaluation(frames)
    mean, median = final_returns.mean().item(), final_returns.quantile(0.5).item()
    if not cfg.video:
        video = "no video (--no-video)"
    elif cfg.playground:
        video = "no video for Playground tasks"
    else:
        video = try_record_video(cfg.env, actor, out / "policy.gif", cfg.seed, gl_problem,
                                 cfg.frame_skip)
    print(f"final evaluation return: mean {mean:.1f}, median {median:.1f} from "
          f"{final_returns.numel()} starts after {frames} frames")
    print(f"curve: {curve_path}, plot: {out / 'curve.png'}, checkpoint: {ckpt_path}")
    print(video)
    return {"interrupted": False, "frames": frames, "final_eval_return": mean,
            "final_eval_median": median, "final_eval_returns": final_returns.tolist()}


if __name__ == "__main__":
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    stop_on_sigterm()
    try:
        main(parse(ControlConfig, description=__doc__.splitlines()[0]))
    except NonFiniteUpdateError as err:  # one line and a non-zero exit status
        raise SystemExit(f"{Path(__file__).name}: error: {err}") from None
