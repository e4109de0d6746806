"""The LLM losses by name."""

from __future__ import annotations

import types
from collections.abc import Mapping

from torchrl.objectives.llm import GRPOLoss

from torchrl_r2vpo.objectives.llm.baselines import (
    CISPOLLMLoss,
    DAPOLLMLoss,
    DecoupledGRPOLLMLoss,
    GPPOLLMLoss,
    GRPOLLMLoss,
    GRPOTISLLMLoss,
    M2POLLMLoss,
    SPOLLMLoss,
    TOPRLLMLoss,
)
from torchrl_r2vpo.objectives.llm.r2vpo import R2VPOLLMLoss

__all__ = ["LLM_LOSSES", "make_llm_loss"]

LLM_LOSSES: Mapping[str, type[GRPOLoss]] = types.MappingProxyType(
    {
        "r2vpo": R2VPOLLMLoss,
        "grpo": GRPOLLMLoss,
        "grpo-ch": DAPOLLMLoss,
        "gppo": GPPOLLMLoss,
        "topr": TOPRLLMLoss,
        "spo": SPOLLMLoss,
        "cispo": CISPOLLMLoss,
        "grpo-decoupled": DecoupledGRPOLLMLoss,
        "grpo-tis": GRPOTISLLMLoss,
        "m2po": M2POLLMLoss,
    }
)
"""The LLM losses by name (read-only)."""


def make_llm_loss(name: str, actor_network=None, **kwargs) -> GRPOLoss:
    """Builds an LLM loss by name, with the same data path for all.

    Args:
        name (str): one of ``"r2vpo"``, ``"grpo"``, ``"grpo-ch"``, ``"gppo"``,
            ``"topr"``, ``"spo"``, ``"cispo"``, and for stale data
            ``"grpo-decoupled"``, ``"grpo-tis"``, ``"m2po"`` (case-insensitive;
            ``_`` works for ``-``).
        actor_network (LLMWrapperBase, optional): the policy scorer.
        **kwargs: the chosen class's keyword arguments (e.g. ``aggregation``,
            ``masking_strategy``, ``lagrange_multiplier``, ``clip_epsilon``).

    Examples:
        >>> from torchrl_r2vpo.objectives.llm import make_llm_loss
        >>> type(make_llm_loss("grpo-ch")).__name__
        'DAPOLLMLoss'
        >>> make_llm_loss("ppo")
        Traceback (most recent call last):
            ...
        ValueError: Unknown LLM loss 'ppo'. Valid names: 'r2vpo', 'grpo', ...
    """
    key = str(name).lower().replace("_", "-")
    cls = LLM_LOSSES.get(key)
    if cls is None:
        valid = ", ".join(repr(n) for n in LLM_LOSSES)
        raise ValueError(f"Unknown LLM loss {name!r}. Valid names: {valid}.")
    return cls(actor_network, **kwargs)
