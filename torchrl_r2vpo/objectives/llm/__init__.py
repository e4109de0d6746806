"""R2VPO for language models, the LLM baselines in the same API, and exact
gradient accumulation over micro-batches.

Every loss here is a :class:`~torchrl.objectives.llm.GRPOLoss`: it reads the
same input TensorDict (tokens, masks, behaviour log-probs and an advantage),
scores it with the same actor (e.g. :class:`~torchrl.modules.llm.TransformersWrapper`
with ``generate=False``), masks and aggregates the per-token terms the same way,
and returns a :class:`~torchrl.objectives.llm.LLMLossOutput`. Only the per-token
objective differs, so comparisons between them are fair.

==========  ===========================  =====================================
registry    class                        per-token loss (``r = exp(log_weight)``)
==========  ===========================  =====================================
``r2vpo``   :class:`R2VPOLLMLoss`        ``-r A + lambda (r - rbar)^2``
``grpo``    :class:`GRPOLLMLoss`         ``-min(r A, clip(r, 1-e, 1+e) A)``
``grpo-ch`` :class:`DAPOLLMLoss`         same, ``e = (0.2, 0.28)`` (clip-higher)
``cispo``   :class:`CISPOLLMLoss`        ``-sg(clip(r)) A log pi``
``gppo``    :class:`GPPOLLMLoss`         PPO-clip value, ``(1 -+ e) A`` gradient outside
``topr``    :class:`TOPRLLMLoss`         ``-A log pi`` (A > 0), ``-sg(min(r, 1)) A log pi``
``spo``     :class:`SPOLLMLoss`          ``-[r A - |A| / (2 e) (r - 1)^2]``
==========  ===========================  =====================================

For stale data, with ``rho = pi_theta / pi_prox`` (``pi_prox``: the policy at the start
of the update) and ``w = sg(pi_prox / pi_b)`` (:mod:`torchrl_r2vpo.objectives.proximal`):

==================  ===========================  ==========================================
``r2vpo``           :class:`R2VPOLLMLoss`        ``-min(w, 2) rho A + lambda (rho - rhobar)^2``
``grpo-decoupled``  :class:`DecoupledGRPOLLMLoss` ``-w min(rho A, clip(rho) A)`` (AReaL)
``grpo-tis``        :class:`GRPOTISLLMLoss`      ``-min(w, 2) min(rho A, clip(rho) A)``
``m2po``            :class:`M2POLLMLoss`         ``-M r A``, ``M`` drops the largest
                                                 ``(log r)^2`` until their mean <= 0.04
==================  ===========================  ==========================================

:func:`make_llm_loss` builds any of them by name.

**Gradient accumulation.** Every loss here but M2PO (whose mask depends on the whole batch)
has :meth:`~R2VPOLLMLoss.accumulation`
(from :class:`~torchrl_r2vpo.objectives.llm.accumulation.GradientAccumulationMixin`),
a context manager that normalises each micro-batch by the *full* batch's
valid-token count (and, for R2VPO, centres the ratio on the full batch's mean),
so that the micro-batch gradients add up to the full-batch gradient exactly;
:func:`merge_ratio_stats` merges the micro-batch ratio statistics into the exact
full-batch ones from sums and counts, for :class:`~torchrl_r2vpo.DualVariableScheduler`.

Modules: ``accumulation`` (the mixin every loss here shares), ``r2vpo``
(:class:`R2VPOLLMLoss`), ``baselines`` (the others), ``registry``
(:data:`LLM_LOSSES`, :func:`make_llm_loss`).
"""

from __future__ import annotations

from torchrl_r2vpo.objectives.llm.accumulation import GradientAccumulationMixin
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
from torchrl_r2vpo.objectives.llm.r2vpo import R2VPOLLMLoss, R2VPOLLMLossOutput
from torchrl_r2vpo.objectives.llm.registry import LLM_LOSSES, make_llm_loss
from torchrl_r2vpo.objectives.ratio_variance import merge_ratio_stats

__all__ = [
    "CISPOLLMLoss",
    "DAPOLLMLoss",
    "DecoupledGRPOLLMLoss",
    "GPPOLLMLoss",
    "GRPOLLMLoss",
    "GRPOTISLLMLoss",
    "GradientAccumulationMixin",
    "LLM_LOSSES",
    "M2POLLMLoss",
    "R2VPOLLMLoss",
    "R2VPOLLMLossOutput",
    "SPOLLMLoss",
    "TOPRLLMLoss",
    "make_llm_loss",
    "merge_ratio_stats",
]
