"""The loss formulas in PyTorch (float64), for autograd: a second reference
beside :mod:`tests.reference`, with per-row reductions."""

from __future__ import annotations

from typing import Any

from distill_client import DistilLoss, LossKind, Reduction

__all__ = ["torch_loss"]


def torch_loss(loss: DistilLoss, t: Any, s: Any) -> Any:
    """``loss`` of torch tensors ``t`` and ``s``, differentiable."""
    import torch

    rows = loss.reduction is Reduction.PER_ROW and loss.kind is not LossKind.MSE
    width = t.shape[-1] if t.dim() else 1
    t2, s2 = (t.reshape(-1, width), s.reshape(-1, width)) if rows else (t.reshape(1, -1), s.reshape(1, -1))
    mse = ((t - s) ** 2).mean()
    if loss.kind is LossKind.MSE:
        return mse
    if loss.kind is LossKind.COSINE:
        denominator = torch.clamp(t2.norm(dim=1) * s2.norm(dim=1), min=1e-12)
        return (1 - torch.clamp((t2 * s2).sum(dim=1) / denominator, -1, 1)).mean()
    tau = loss.temperature
    log_p = torch.log_softmax(t2 / tau, dim=1)
    log_q = torch.log_softmax(s2 / tau, dim=1)
    kl = tau**2 * (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return kl if loss.kind is LossKind.KL_DIVERGENCE else loss.kl_weight * kl + loss.mse_weight * mse
