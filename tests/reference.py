"""An independent float64 evaluation of the losses (textbook formulas, fsum)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from distill_client import DistilLoss, LossKind, Reduction

ALL_LOSSES = [DistilLoss.mse(), DistilLoss.cosine(), DistilLoss.kl_divergence(2.0), DistilLoss.combined(0.3, 0.7, 4.0)]
"""One loss of every kind."""

LOSSES_BOTH_REDUCTIONS = [
    DistilLoss.mse(),
    DistilLoss.cosine(),
    DistilLoss.kl_divergence(2.0),
    DistilLoss.combined(0.7, 0.3, 4.0),
    DistilLoss.cosine(reduction=Reduction.PER_ROW),
    DistilLoss.kl_divergence(0.5, reduction=Reduction.PER_ROW),
]
"""Every kind, and the per-row forms of the kinds that have one."""

WIRE_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64]
"""Every dtype a tensor may have on the wire."""


def reference(loss: DistilLoss, t: np.ndarray, s: np.ndarray) -> float:
    """An independent float64 evaluation of SEMANTICS.md (textbook formulas)."""
    t, s = t.astype(np.float64).ravel(), s.astype(np.float64).ravel()
    mse = math.fsum((t - s) ** 2) / t.size
    if loss.kind is LossKind.MSE:
        return mse
    if loss.kind is LossKind.COSINE:
        denominator = max(math.sqrt(math.fsum(t * t)) * math.sqrt(math.fsum(s * s)), 1e-12)
        return 1 - min(max(math.fsum(t * s) / denominator, -1), 1)
    tau = max(loss.temperature, 1e-6)
    log_p, log_q = log_softmax(t / tau), log_softmax(s / tau)
    kl = tau**2 * math.fsum(np.exp(log_p) * (log_p - log_q))
    if loss.kind is LossKind.KL_DIVERGENCE:
        return kl
    return loss.kl_weight * kl + loss.mse_weight * mse


def log_softmax(x: np.ndarray) -> np.ndarray:
    """``x - logsumexp(x)``, the sum correctly rounded (fsum)."""
    top = x.max()
    return x - (top + math.log(math.fsum(np.exp(x - top))))
