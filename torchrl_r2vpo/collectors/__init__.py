"""Language-model rollout backends (transformers, vLLM) that complete a batch of prompts."""

from __future__ import annotations

from torchrl_r2vpo._deprecation import moved
from torchrl_r2vpo.collectors.llm import (
    collect_batch,
    response_log_probs,
    stop_token_ids,
    TransformersBackend,
    VLLMBackend,
)

__all__ = [
    "TransformersBackend",
    "VLLMBackend",
    "collect_batch",
    "response_log_probs",
    "stop_token_ids",
]

__getattr__ = moved(__name__, {
    "group_advantages": "torchrl_r2vpo.data",
    "sequence_batch": "torchrl_r2vpo.data",
    "staleness_stats": "torchrl_r2vpo.data",
})
