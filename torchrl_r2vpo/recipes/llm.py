"""RL fine-tuning of a language model on math problems: the pieces of ``examples/llm_math.py``.

The task (:func:`make_task`: generated problems as a token-generation environment), the loss
and its dual-variable scheduler (:func:`make_loss`), the rollout backend
(:func:`make_backend`) and the policy it samples with, ``--lag`` updates behind
(:class:`LaggedPolicy`), a model's log-probabilities of stored sequences (the reference's for a
KL penalty, the proximal policy's for a decoupled loss: :func:`sequence_log_probs`), the
statistics of an update by data age (:func:`update_staleness`) and the run's plot
(:func:`plot_run`). They read their settings from an
:class:`~torchrl_r2vpo.recipes.config.LLMConfig`.
"""

from __future__ import annotations

import collections
import copy
from pathlib import Path

import torch
from tensordict import TensorDictBase
from torch import nn

from torchrl_r2vpo.collectors import response_log_probs, stop_token_ids, TransformersBackend, VLLMBackend
from torchrl_r2vpo.data import (ASSISTANT_MASK_KEY, ATTENTION_MASK_KEY, FULL_LOG_PROBS_KEY,
                                PROMPT_TOKENS_KEY, PROXIMAL_LOG_PROBS_KEY,
                                RESPONSE_TOKENS_KEY, STALENESS_FIELDS, staleness_sums)
from torchrl_r2vpo.envs import TokenGenerationEnv
from torchrl_r2vpo.math_task import (
    EVAL_SEED,
    evaluate_accuracy,
    evaluate_pass_at_k,
    format_prompt,
    generate_problems,
    generate_reversed_addition,
    MathProblem,
)
from torchrl_r2vpo.objectives import DualVariableScheduler
from torchrl_r2vpo.objectives.llm import make_llm_loss
from torchrl_r2vpo.recipes.config import LLMConfig

__all__ = ["CURVE_FIELDS", "LaggedPolicy", "STALENESS_CSV_FIELDS", "TEST_SEED", "held_out_accuracy",
           "keep_ratio_samples", "make_backend", "make_loss", "make_task", "plot_run",
           "sequence_log_probs", "update_staleness"]

# the columns of curve.csv, one row per iteration
CURVE_FIELDS = ["rollouts", "time_s", "tokens_per_s", "train_reward", "test_accuracy", "test_greedy",
                "lagrange_multiplier", "ratio_var", "ESS", "clip_fraction", "kl_approx",
                "loss_objective", "kl_to_ref", "grad_norm", "skipped_steps"]
# the columns of staleness.csv, one row per iteration and data age (data.staleness)
STALENESS_CSV_FIELDS = ["rollouts", "age", *STALENESS_FIELDS]

# the held-out arithmetic problems are the same for every run seed (reversed-addition: EVAL_SEED)
TEST_SEED = 10_000


def make_task(cfg: LLMConfig, model: nn.Module, tokenizer) -> tuple[TokenGenerationEnv,
                                                                    list[MathProblem]]:
    """The training environment and the held-out problems.

    The environment serves ``cfg.num_prompts`` of ``cfg.problems`` training problems per reset
    (without replacement, reshuffled after each pass), each ``cfg.group_size`` times, and
    scores completions with the math verifier. For ``cfg.task == "reversed-addition"`` the
    problems are fresh draws of :func:`~torchrl_r2vpo.math_task.generate_reversed_addition`
    seeded by ``cfg.seed`` (by default one per prompt of the run), and the ``cfg.num_test``
    held-out sums come from the test split seeded by
    :data:`~torchrl_r2vpo.math_task.EVAL_SEED`; for ``"arithmetic"`` they are problems of
    :func:`~torchrl_r2vpo.math_task.generate_problems` and the held-out ones are seeded by
    :data:`TEST_SEED`. Levels (digits for reversed addition) are ``cfg.levels``, in equal
    shares.
    """
    if cfg.task == "reversed-addition":
        def draw(n: int, split: str, seed: int) -> list[MathProblem]:
            per_level = -(-n // len(cfg.levels))
            drawn = [p for digits in cfg.levels
                     for p in generate_reversed_addition(per_level, split=split, digits=digits, seed=seed)]
            order = torch.randperm(len(drawn), generator=torch.Generator().manual_seed(seed))
            return [drawn[i] for i in order[:n].tolist()]

        train, test = draw(cfg.problems, "train", cfg.seed), draw(cfg.num_test, "test", EVAL_SEED)
    else:
        train = generate_problems(cfg.problems, split="train", difficulty=cfg.levels, seed=cfg.seed)
        test = generate_problems(cfg.num_test, split="test", difficulty=cfg.levels, seed=TEST_SEED)
    env = TokenGenerationEnv([format_prompt(p.question) for p in train], [p.answer for p in train],
                             tokenizer, num_prompts=cfg.num_prompts, group_size=cfg.group_size,
                             max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                             vocab_size=model.config.vocab_size,
                             stop_token_ids=stop_token_ids(model, tokenizer))
    return env, test


def held_out_accuracy(cfg: LLMConfig, model: nn.Module, tokenizer, test: list[MathProblem],
                      pass_at: int = 0, measured: dict[str, float] | None = None) -> dict[str, float]:
    """Held-out accuracy of ``model``: ``"sampled"`` at temperature 1 (with a fixed seed, so
    every evaluation of a run, and of every run, draws the same random numbers), ``"greedy"``,
    and for ``pass_at`` > 0 ``"pass@k"``, the share solved by one of ``pass_at`` samples.
    ``measured``, this function's result for the same model, is reused instead of measured
    again."""
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, seed=EVAL_SEED)
    result = dict(measured) if measured is not None else {
        "sampled": evaluate_accuracy(model, tokenizer, test, greedy=False, **kwargs),
        "greedy": evaluate_accuracy(model, tokenizer, test, greedy=True, **kwargs)}
    if pass_at:
        result[f"pass@{pass_at}"] = evaluate_pass_at_k(model, tokenizer, test, pass_at, **kwargs)
    return result


def make_loss(cfg: LLMConfig, scorer) -> tuple[nn.Module, DualVariableScheduler | None]:
    """The ``cfg.loss`` LLM loss (:func:`~torchrl_r2vpo.objectives.llm.make_llm_loss`) on
    ``scorer`` (a TorchRL ``TransformersWrapper`` that returns log-probabilities), and for R2VPO
    with ``cfg.dual`` adaptive its :class:`~torchrl_r2vpo.DualVariableScheduler` (capped at
    ``cfg.lambda_max`` unless 0), else ``None``.

    Every loss gets the k3 KL to the reference model with coefficient ``cfg.kl_to_ref``
    (none if 0) and the entropy bonus ``cfg.entropy_coeff`` (none if 0). R2VPO takes
    ``cfg.ratio``, ``cfg.variance_center`` and ``cfg.weighted_variance`` and, with the
    stale-data baselines ``grpo-decoupled`` and ``grpo-tis``,
    ``cfg.max_behaviour_weight`` (0: none).
    """
    kwargs = dict(kl_to_ref_coeff=cfg.kl_to_ref or None, entropy_bonus=cfg.entropy_coeff > 0,
                  entropy_coeff=cfg.entropy_coeff)
    if cfg.loss == "r2vpo":
        kwargs.update(lagrange_multiplier=cfg.lagrange_multiplier, ratio_var_target=cfg.ratio_var_target,
                      ratio=cfg.ratio, variance_center=cfg.variance_center,
                      weighted_variance=cfg.weighted_variance)
    if cfg.loss in ("r2vpo", "grpo-decoupled", "grpo-tis"):
        kwargs.update(max_behaviour_weight=cfg.max_behaviour_weight or None)
    loss = make_llm_loss(cfg.loss, scorer, **kwargs)
    scheduler = None
    if cfg.loss == "r2vpo" and cfg.dual == "adaptive":
        scheduler = DualVariableScheduler(loss, lr=cfg.dual_lr, max_value=cfg.lambda_max or None)
    return loss, scheduler


def make_backend(cfg: LLMConfig, model: nn.Module, tokenizer, out: Path, version: int = 0):
    """The ``cfg.backend`` that samples completions of at most ``cfg.max_new_tokens``.

    ``transformers`` samples with the training model itself. ``vllm`` loads a copy saved in
    ``out/vllm_model`` (its weights are synced after each update) and is seeded by
    ``cfg.seed + version``, so that a resumed run does not replay the engine's first draws.
    """
    if cfg.backend == "transformers":
        return TransformersBackend(model, tokenizer, max_new_tokens=cfg.max_new_tokens)
    path = out / "vllm_model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return VLLMBackend(model, tokenizer, str(path), max_new_tokens=cfg.max_new_tokens,
                       seed=cfg.seed + version)


class LaggedPolicy:
    """The policy a sampler uses ``lag`` updates behind the trainer, as in an asynchronous
    pipeline: a copy of the model holding the weights of version ``max(0, v - lag)`` while the
    trainer is at version ``v`` (the model itself, always current, for ``lag == 0``).

    It keeps the weights of the last ``lag + 1`` versions (on the CPU); they are in its
    ``state_dict``, so that a resumed run samples with the same weights.
    """

    def __init__(self, model: nn.Module, lag: int, version: int = 0):
        self.lag = lag
        self.model = copy.deepcopy(model).requires_grad_(False) if lag else model
        self.version = version
        self._snapshots = collections.deque([(version, _cpu_state(model))] if lag else [],
                                            maxlen=lag + 1)

    def push(self, model: nn.Module, version: int) -> None:
        """Records the trainer's weights at ``version``; the sampler moves to the oldest kept."""
        if not self.lag:
            self.version = version
            return
        self._snapshots.append((version, _cpu_state(model)))
        self._load_oldest()

    def _load_oldest(self) -> None:
        self.version, state = self._snapshots[0]
        self.model.load_state_dict(state)

    def state_dict(self) -> dict:
        return {"version": self.version, "snapshots": list(self._snapshots)}

    def load_state_dict(self, state: dict) -> None:
        self.version = state["version"]
        if self.lag:
            self._snapshots = collections.deque(state["snapshots"], maxlen=self.lag + 1)
            self._load_oldest()


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def sequence_log_probs(model: nn.Module, batch: TensorDictBase, chunk: int = 256) -> torch.Tensor:
    """``model``'s log-probabilities of a batch's completions, ``[N, prompt + response]`` (0
    over the prompt and padding), ``chunk`` sequences at a time: the layout of
    ``("log_probs", "full")``. With the initial model it is the KL penalty's
    ``("next", "ref_log_probs", "full")``; with the model at the start of an update, the
    proximal log-probabilities ``("proximal_log_probs", "full")``."""
    width = batch[PROMPT_TOKENS_KEY].shape[-1]
    parts = []
    for rows in batch.split(chunk):
        parts.append(torch.cat([
            torch.zeros(rows[PROMPT_TOKENS_KEY].shape),
            response_log_probs(model, rows[PROMPT_TOKENS_KEY], rows[ATTENTION_MASK_KEY][:, :width],
                               rows[RESPONSE_TOKENS_KEY], rows[ASSISTANT_MASK_KEY][:, width:])], -1))
    return torch.cat(parts)


@torch.no_grad()
def update_staleness(model: nn.Module, stored: TensorDictBase, version: int,
                     clip_epsilon: float = 0.2, chunk: int = 256
                     ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the update just made of the stored completions, by data age.

    Scores them with ``model`` (after the update), ``chunk`` sequences at a time, and
    returns:

    * the sums of :func:`~torchrl_r2vpo.data.staleness_sums` per age of the step
      ``r = pi_theta / pi_prox`` and the behaviour weight ``w = pi_prox / pi_behaviour``
      (``pi_prox``: ``("proximal_log_probs", "full")``, the policy before the update; the
      behaviour ratio and ``w = 1`` without it);
    * the per-token behaviour ratios ``pi_theta / pi_behaviour`` ``[N, T]``, their mask and
      each row's age ``version - policy_version`` ``[N]``, what :func:`keep_ratio_samples`
      keeps for the plot.
    """
    width = stored[PROMPT_TOKENS_KEY].shape[-1]
    mask, age = stored[ASSISTANT_MASK_KEY][:, width:], version - stored["policy_version"]
    current = sequence_log_probs(model, stored, chunk)[:, width:]
    behaviour = stored[FULL_LOG_PROBS_KEY][:, width:]
    proximal = (stored[PROXIMAL_LOG_PROBS_KEY][:, width:]
                if PROXIMAL_LOG_PROBS_KEY in stored.keys(True) else behaviour)
    sums = staleness_sums((current - proximal).exp(), age, mask, (proximal - behaviour).exp(),
                          clip_epsilon)
    return sums, (current - behaviour).exp(), mask, age


def keep_ratio_samples(samples: dict[int, list[torch.Tensor]], ratio: torch.Tensor,
                       mask: torch.Tensor, age: torch.Tensor, last: int = 10) -> None:
    """Adds the masked ratios of each age to ``samples[age]`` (from :func:`update_staleness`),
    keeping the ``last`` iterations' ones: what :func:`plot_run` draws."""
    for k in age.unique().tolist():
        kept = samples.setdefault(k, [])
        kept.append(ratio[mask & (age == k)[:, None]])
        del kept[:-last]


def plot_run(rows: list[dict], samples: dict[int, list[torch.Tensor]], path: Path,
             title: str) -> None:
    """Plots to ``path`` the training reward and held-out accuracy of a curve's rows against
    rollouts and against wall-clock seconds, and the distributions of the token ratio by
    staleness (``samples``, clamped to [0, 3])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, x, xlabel in ((axes[0], "rollouts", "rollouts"), (axes[1], "time_s", "seconds")):
        for key, label, style in (("train_reward", "training reward", "-"),
                                  ("test_accuracy", "held-out accuracy (sampled)", "o-"),
                                  ("test_greedy", "held-out accuracy (greedy)", "s--")):
            points = [(r[x], r[key]) for r in rows if r.get(key, "") != ""]
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set(xlabel=xlabel, title=title)
        ax.legend()
    for age, ratios in sorted(samples.items()):
        axes[2].hist(torch.cat(ratios).clamp(0, 3).numpy(), bins=60, histtype="step",
                     density=True, label=f"{age} update(s) old")
    axes[2].set(xlabel="token ratio pi_theta / pi_behaviour (clamped to [0, 3])", yscale="log",
                title="ratio by staleness (last iterations)")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
