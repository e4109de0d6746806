r"""The decoupled (proximal) importance ratio, for data sampled by older policies.

A batch replayed ``k`` updates after it was sampled has two policies behind it: the
behaviour policy :math:`\mu` that sampled it, and the proximal policy
:math:`\pi_{prox}`, the policy at the start of the current update. The decoupled
objective (Hilton et al. 2021; AReaL) gives each role its own factor:

.. code-block:: text

    r = pi_theta / pi_prox           the step of this update: what a trust region limits
    w = sg(pi_prox / mu)             the data's age: an importance weight, no gradient

    pi_theta / mu = w * r

At the first optimiser step of every update ``r == 1`` (up to the rounding of the two
forward passes) for fresh and stale rows alike,
so a penalty or clip on ``r`` measures the update, not the age of the data. With
nothing stale (``pi_prox == mu``) ``w == 1`` and ``r`` is the behaviour ratio: the
loss is the on-policy one.

The weight may be bounded at ``c``: ``"truncate"`` uses ``min(w, c)`` (truncated
importance sampling), ``"mask"`` sets ``w = 0`` where ``w > c``, so that the token gives no
policy gradient (AReaL's ``behav_imp_weight_cap``; it still counts in token means).

A loss reads :math:`\log \pi_{prox}` from its ``proximal_log_prob`` tensor key,
computed once per update with no gradient (the examples do it before their epochs).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["BEHAVIOUR_WEIGHT_MODES", "RATIO_FORMS", "behaviour_log_weight",
           "check_max_behaviour_weight", "check_ratio_form"]

RATIO_FORMS = ("proximal", "behaviour")
"""The denominators of the constrained ratio: the proximal policy (decoupled) or the
behaviour policy (the literal reading of the papers)."""
BEHAVIOUR_WEIGHT_MODES = ("truncate", "mask")
"""How a behaviour weight above its bound is treated: truncated to it, or its token
dropped."""


def check_ratio_form(ratio: str) -> None:
    """Refuses a ratio form other than :data:`RATIO_FORMS`."""
    if ratio not in RATIO_FORMS:
        raise ValueError(f"ratio must be one of {RATIO_FORMS}, got {ratio!r}.")


def check_max_behaviour_weight(value: float | None, mode: str = "truncate") -> None:
    """Refuses a bound under 1 (it would down-weight fresh data, whose weight is 1) or
    not a number, and an unknown mode."""
    if mode not in BEHAVIOUR_WEIGHT_MODES:
        raise ValueError(f"behaviour_weight_mode must be one of {BEHAVIOUR_WEIGHT_MODES}, "
                         f"got {mode!r}.")
    if value is not None and not (isinstance(value, (int, float)) and value >= 1):
        raise ValueError(f"max_behaviour_weight must be None (no bound) or >= 1, got {value!r}.")


def behaviour_log_weight(
    proximal_log_prob: torch.Tensor,
    behaviour_log_prob: torch.Tensor,
    max_weight: float | None = None,
    mode: Literal["truncate", "mask"] = "truncate",
) -> torch.Tensor:
    r"""``log w = log sg(pi_prox / mu)``, bounded at ``log max_weight``, detached.

    ``"truncate"`` lowers it to ``log max_weight``; ``"mask"`` sets it to ``-inf``
    (``w = 0``: the token gives no gradient). Where either log-probability is not
    finite the weight is 1 (``log w = 0``): such tokens are the loss's to mask.

    Examples:
        >>> import torch
        >>> prox, behav = torch.tensor([0.0, 0.0, -1.0]), torch.tensor([0.0, -2.0, 0.0])
        >>> behaviour_log_weight(prox, behav, 2.0).exp()  # w = 1, e^2 -> 2, e^-1
        tensor([1.0000, 2.0000, 0.3679])
        >>> behaviour_log_weight(prox, behav, 2.0, "mask").exp()
        tensor([1.0000, 0.0000, 0.3679])
    """
    shift = (proximal_log_prob - behaviour_log_prob).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    if max_weight is None:
        return shift
    bound = math.log(max_weight)
    if mode == "truncate":
        return shift.clamp_max(bound)
    return torch.where(shift > bound, torch.full_like(shift, float("-inf")), shift)
