"""What feeds the losses: language-model rollouts and staleness statistics for replay."""

from __future__ import annotations

from torchrl_r2vpo.collectors.llm_rollout import (
    collect_batch,
    group_advantages,
    response_log_probs,
    sequence_batch,
    stop_token_ids,
    TransformersBackend,
    VLLMBackend,
)
from torchrl_r2vpo.collectors.replay import staleness_stats

__all__ = [
    "TransformersBackend",
    "VLLMBackend",
    "collect_batch",
    "group_advantages",
    "response_log_probs",
    "sequence_batch",
    "staleness_stats",
    "stop_token_ids",
]
