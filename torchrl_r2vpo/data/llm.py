"""The sequence layout of language-model batches, and group-relative advantages.

:func:`sequence_batch` assembles the layout TorchRL's LLM losses read (batch ``[N]``, one row per completion):

============================================  ==========================================
``("tokens", "prompt")`` ``[N, P]``            prompt, left-padded
``("tokens", "response")`` ``[N, T]``          completion, right-padded after EOS
``("tokens", "full")`` ``[N, P + T]``          both
``("masks", "all_attention_mask")``            prompt and completion tokens (EOS included)
``("masks", "all_assistant_mask")``            completion tokens (EOS included)
``("log_probs", "full")`` ``[N, P + T]``       behaviour log-probability of each
                                               completion token, 0 elsewhere
``("next", "reward")``, ``("next", "done")``   verifier score ``[N, 1]``; ``True``
``"group"``, ``"problem_index"``               prompt index in the batch; in the dataset
``"policy_version"``                           version of the policy that sampled it
``("proximal_log_probs", "full")``             optional: the log-probabilities under the
                                               policy at the start of the current update
                                               (see :mod:`torchrl_r2vpo.objectives.proximal`)
============================================  ==========================================

The nested keys are public constants, so code that reads a batch names them once.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

__all__ = [
    "ASSISTANT_MASK_KEY",
    "ATTENTION_MASK_KEY",
    "FULL_LOG_PROBS_KEY",
    "FULL_TOKENS_KEY",
    "PROMPT_TOKENS_KEY",
    "PROXIMAL_LOG_PROBS_KEY",
    "RESPONSE_TOKENS_KEY",
    "group_advantages",
    "sequence_batch",
]

PROMPT_TOKENS_KEY = ("tokens", "prompt")
RESPONSE_TOKENS_KEY = ("tokens", "response")
FULL_TOKENS_KEY = ("tokens", "full")
ATTENTION_MASK_KEY = ("masks", "all_attention_mask")
ASSISTANT_MASK_KEY = ("masks", "all_assistant_mask")
FULL_LOG_PROBS_KEY = ("log_probs", "full")
PROXIMAL_LOG_PROBS_KEY = ("proximal_log_probs", "full")


def sequence_batch(
    *,
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor,
    response: torch.Tensor,
    response_mask: torch.Tensor,
    response_log_probs: torch.Tensor,
    reward: torch.Tensor,
    group: torch.Tensor,
    problem_index: torch.Tensor,
    policy_version: int = 0,
) -> TensorDict:
    """Assembles one row per completion in the layout of this module's docstring."""
    n = prompt.shape[0]
    prompt_mask, response_mask = prompt_mask.bool(), response_mask.bool()
    return TensorDict(
        {
            PROMPT_TOKENS_KEY: prompt,
            RESPONSE_TOKENS_KEY: response,
            FULL_TOKENS_KEY: torch.cat([prompt, response], -1),
            ATTENTION_MASK_KEY: torch.cat([prompt_mask, response_mask], -1),
            ASSISTANT_MASK_KEY: torch.cat(
                [torch.zeros_like(prompt_mask), response_mask], -1),
            FULL_LOG_PROBS_KEY: torch.cat(
                [torch.zeros_like(prompt, dtype=torch.float), response_log_probs.float() * response_mask],
                -1),
            ("next", "reward"): reward.float().view(n, 1),
            ("next", "done"): torch.ones(n, 1, dtype=torch.bool),
            "group": group.view(n),
            "problem_index": problem_index.view(n),
            "policy_version": torch.full((n,), policy_version),
        },
        batch_size=[n],
    )


def group_advantages(reward: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages ``[N, 1, 1]``: each reward standardised within its group.

    Rows are grouped ``group_size`` at a time in order (the repeats of one prompt), as
    :class:`~torchrl_r2vpo.envs.TokenGenerationEnv` lays them out; the standard deviation
    is the population one, as TorchRL's ``MCAdvantage``. A group whose rewards are all
    equal gets advantage 0.

    Examples:
        >>> group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2).view(-1).tolist()
        [1.0, -1.0, 0.0, 0.0]
    """
    grouped = reward.float().reshape(-1, group_size)
    std = grouped.std(-1, correction=0, keepdim=True)
    advantage = (grouped - grouped.mean(-1, keepdim=True)) / std.clamp_min(eps)
    return advantage.reshape(-1, 1, 1)
