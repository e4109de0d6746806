"""Data layouts and statistics: the language-model sequence layout with its keys, group
advantages, ratio statistics of replayed data by staleness, and a storage zeroed until
written."""

from __future__ import annotations

from torchrl_r2vpo.data.llm import (
    ASSISTANT_MASK_KEY,
    ATTENTION_MASK_KEY,
    FULL_LOG_PROBS_KEY,
    FULL_TOKENS_KEY,
    group_advantages,
    PROMPT_TOKENS_KEY,
    PROXIMAL_LOG_PROBS_KEY,
    RESPONSE_TOKENS_KEY,
    sequence_batch,
)
from torchrl_r2vpo.data.storage import ZeroedLazyTensorStorage
from torchrl_r2vpo.data.staleness import (merge_staleness_sums, STALENESS_FIELDS, staleness_stats,
                                          staleness_sums, staleness_table)

__all__ = [
    "ASSISTANT_MASK_KEY",
    "ATTENTION_MASK_KEY",
    "FULL_LOG_PROBS_KEY",
    "FULL_TOKENS_KEY",
    "PROMPT_TOKENS_KEY",
    "PROXIMAL_LOG_PROBS_KEY",
    "RESPONSE_TOKENS_KEY",
    "STALENESS_FIELDS",
    "ZeroedLazyTensorStorage",
    "group_advantages",
    "merge_staleness_sums",
    "sequence_batch",
    "staleness_stats",
    "staleness_sums",
    "staleness_table",
]
