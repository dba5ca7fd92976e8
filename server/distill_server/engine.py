"""The loss math and its gradients, written once for NumPy and CuPy.

Inputs are cast block by block into float64 (in cache on the CPU, one block
on a GPU) and every sum a loss needs is taken from the same block, so a loss
is one pass over memory; its gradient, which needs the finished sums, is a
second pass that writes straight into the student's dtype.

- ``FLATTEN`` (the reference's behaviour): the tensors are flat vectors; KL
  keeps an online log-sum-exp, so it needs no separate pass for the maxima
  and stays finite where the reference clamps ``ln q`` at ``ln 1e-12``.
- ``PER_ROW``: cosine and KL per row of the last axis, averaged over rows;
  blocks hold whole rows, so the gradient comes out of the same pass.

The distiller functions at the end reproduce the reference
``FeatureDistiller``: its checks, their order and its error kinds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill_client.errors import (
    DimensionMismatch,
    EmptyInput,
    LayerIndexOutOfRange,
    LossOverflow,
    NonFiniteInput,
    ShapeMismatch,
    TeacherStudentMismatch,
)
from distill_client.losses import DistilLoss, LayerLoss, LossKind, Reduction
from distill_server.backend import array_module, block_size

__all__ = [
    "MIN_TEMPERATURE",
    "Layer",
    "LayerResult",
    "evaluate",
    "layer_loss",
    "loss_value",
    "total_loss",
]

MIN_TEMPERATURE = 1e-6
"""Temperatures are floored here, as in the reference."""

_NORM_FLOOR = 1e-12
"""Floor of the cosine denominator ``|t| |s|``, as in the reference."""


@dataclass(frozen=True)
class _Terms:
    """What a loss is made of: factors of its MSE, cosine and KL parts."""

    mse: float
    cosine: float
    kl: float
    tau: float

    @classmethod
    def of(cls, loss: DistilLoss) -> _Terms:
        tau = max(loss.temperature, MIN_TEMPERATURE)
        if loss.kind is LossKind.MSE:
            return cls(1.0, 0.0, 0.0, tau)
        if loss.kind is LossKind.COSINE:
            return cls(0.0, 1.0, 0.0, tau)
        if loss.kind is LossKind.KL_DIVERGENCE:
            return cls(0.0, 0.0, 1.0, tau)
        return cls(loss.mse_weight, 0.0, loss.kl_weight, tau)


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


# ---------------------------------------------------------------- FLATTEN


class _Flat:
    """Running sums over blocks of two flat vectors, for one loss's terms.

    ``sq = sum((t - s)^2)``; ``tt, ss, ts`` the dot products; for KL, with
    ``a = t/tau``, ``b = s/tau``: running maxima ``ma``, ``mb`` and, relative to
    them, ``za = sum exp(a - ma)``, ``zb = sum exp(b - mb)``,
    ``w = sum exp(a - ma) (a - b)``.
    """

    def __init__(self, terms: _Terms) -> None:
        self.terms = terms
        self.sq = self.tt = self.ss = self.ts = 0.0
        self.ma = self.mb = -math.inf
        self.za = self.zb = self.w = 0.0

    def add(self, xp: Any, t: Any, s: Any, work: Any) -> None:
        if self.terms.mse:
            d = xp.subtract(t, s, out=work[0])
            self.sq += float(xp.dot(d, d))
        if self.terms.cosine:
            self.tt += float(xp.dot(t, t))
            self.ss += float(xp.dot(s, s))
            self.ts += float(xp.dot(t, s))
        if self.terms.kl:
            self._add_kl(xp, t, s, work)

    def _add_kl(self, xp: Any, t: Any, s: Any, work: Any) -> None:
        a = xp.divide(t, self.terms.tau, out=work[0])
        b = xp.divide(s, self.terms.tau, out=work[1])
        tmp = work[2]
        ma, mb = float(a.max()), float(b.max())
        zb = float(xp.exp(xp.subtract(b, mb, out=tmp), out=tmp).sum())
        diff = xp.subtract(a, b, out=b)
        ea = xp.exp(xp.subtract(a, ma, out=tmp), out=tmp)
        za, w = float(ea.sum()), float(xp.dot(ea, diff))
        if ma > self.ma:
            rescale = math.exp(self.ma - ma)
            self.za, self.w, self.ma = self.za * rescale + za, self.w * rescale + w, ma
        else:
            rescale = math.exp(ma - self.ma)
            self.za, self.w = self.za + za * rescale, self.w + w * rescale
        if mb > self.mb:
            self.zb, self.mb = self.zb * math.exp(self.mb - mb) + zb, mb
        else:
            self.zb += zb * math.exp(mb - self.mb)

    def cosine_parts(self) -> tuple[float, float, float]:
        """``(value, alpha, beta)``: ``1 - c`` and its gradient ``alpha t + beta s``."""
        product = self.tt * self.ss
        floored = math.sqrt(product) < _NORM_FLOOR
        denominator = _NORM_FLOOR if floored else math.sqrt(product)
        c = self.ts / denominator
        if not -1.0 <= c <= 1.0:  # clamped: flat in s
            return 1.0 - min(max(c, -1.0), 1.0), 0.0, 0.0
        return 1.0 - c, -1.0 / denominator, 0.0 if floored else c / self.ss

    def kl(self) -> float:
        """``KL(softmax(a) || softmax(b))`` from the running sums."""
        return self.w / self.za - (self.ma + math.log(self.za)) + (self.mb + math.log(self.zb))


def _flat(loss: DistilLoss, teacher: Any, student: Any, scale: float | None) -> tuple[float, Any]:
    xp = array_module(teacher)
    terms = _Terms.of(loss)
    t, s = teacher.reshape(-1), student.reshape(-1)
    n = int(t.size)
    size = block_size(t)
    tb, sb, *work = (xp.empty(size, dtype=xp.float64) for _ in range(5))
    sums = _Flat(terms)
    with np.errstate(all="ignore"):
        for block in _blocks(n, size):
            m = block.stop - block.start
            xp.copyto(tb[:m], t[block])
            xp.copyto(sb[:m], s[block])
            sums.add(xp, tb[:m], sb[:m], [w[:m] for w in work])
        if terms.cosine and not (math.isfinite(sums.tt * sums.ss) and math.isfinite(sums.ts)):
            return _rescaled_cosine(loss, teacher, student, scale)
        value = terms.mse * sums.sq / n + terms.kl * terms.tau**2 * (sums.kl() if terms.kl else 0.0)
        alpha = beta = 0.0
        if terms.cosine:
            cosine, alpha, beta = sums.cosine_parts()
            value += cosine
        if scale is None or not math.isfinite(value):
            return value, None
        # d/ds: mse 2(s - t)/n; cosine alpha t + beta s; KL tau (q - p).
        alpha = scale * (alpha - 2 * terms.mse / n)
        beta = scale * (beta + 2 * terms.mse / n)
        gamma = scale * terms.kl * terms.tau
        out = xp.empty(student.shape, dtype=student.dtype)
        flat_out = out.reshape(-1)
        for block in _blocks(n, size):
            m = block.stop - block.start
            g = _combine(xp, t[block], s[block], tb[:m], sb[:m], work[0][:m], alpha, beta)
            if gamma:
                p = _softmax_part(xp, tb[:m], terms.tau, sums.ma, sums.za, work[1][:m])
                q = _softmax_part(xp, sb[:m], terms.tau, sums.mb, sums.zb, work[2][:m])
                q -= p
                q *= gamma
                g += q
            xp.copyto(flat_out[block], g, casting="unsafe")
        return value, out


def _combine(xp: Any, t: Any, s: Any, tb: Any, sb: Any, out: Any, alpha: float, beta: float) -> Any:
    """``alpha t + beta s`` in float64; leaves ``tb``, ``sb`` holding ``t``, ``s``."""
    xp.copyto(tb, t)
    xp.copyto(sb, s)
    xp.multiply(tb, alpha, out=out)
    out += beta * sb
    return out


def _softmax_part(xp: Any, x: Any, tau: float, top: float, total: float, out: Any) -> Any:
    """``exp(x / tau - top) / total``: this block's slice of a softmax."""
    xp.divide(x, tau, out=out)
    out -= top
    xp.exp(out, out=out)
    out /= total
    return out


def _rescaled_cosine(loss: DistilLoss, teacher: Any, student: Any, scale: float | None) -> tuple[float, Any]:
    """Cosine of float64 inputs whose squared norms overflow: it is scale-free."""
    xp = array_module(teacher)
    t_max, s_max = float(xp.abs(teacher).max()), float(xp.abs(student).max())
    if not (math.isfinite(t_max) and math.isfinite(s_max)):
        return math.nan, None
    s_max = s_max or 1.0
    value, gradient = _flat(loss, teacher / (t_max or 1.0), student / s_max, scale)
    return value, None if gradient is None else gradient / s_max  # d/ds of f(s / k) is f'(s / k) / k


# ---------------------------------------------------------------- PER_ROW


def _rows(loss: DistilLoss, teacher: Any, student: Any, scale: float | None) -> tuple[float, Any]:
    xp = array_module(teacher)
    terms = _Terms.of(loss)
    width = int(teacher.shape[-1]) if teacher.ndim else 1
    t, s = teacher.reshape(-1, width), student.reshape(-1, width)
    rows, n = int(t.shape[0]), int(t.size)
    out = None if scale is None else xp.empty(student.shape, dtype=student.dtype)
    flat_out = None if out is None else out.reshape(-1, width)
    k = scale or 0.0  # used only with a gradient
    sq = cosine = kl = 0.0
    with np.errstate(all="ignore"):
        for block in _blocks(rows, max(1, block_size(t) // width)):
            tb, sb = t[block].astype(xp.float64), s[block].astype(xp.float64)
            g = None if scale is None else xp.zeros_like(tb)
            if terms.mse:
                d = tb - sb
                sq += float(xp.vdot(d, d))
                if g is not None:
                    g -= (2 * terms.mse * k / n) * d
            if terms.cosine:
                cosine += _row_cosine(xp, tb, sb, g, k / rows)
            if terms.kl:
                kl += _row_kl(xp, tb, sb, terms.tau, g, k * terms.kl * terms.tau / rows)
            if flat_out is not None:
                xp.copyto(flat_out[block], g, casting="unsafe")
    value = terms.mse * sq / n + terms.cosine * cosine / rows + terms.kl * terms.tau**2 * kl / rows
    return value, out if math.isfinite(value) else None


def _row_cosine(xp: Any, t: Any, s: Any, g: Any, scale: float) -> float:
    """Sum over rows of ``1 - c``; adds ``scale`` times each row's gradient to ``g``."""
    tt, ss, ts = (t * t).sum(axis=1), (s * s).sum(axis=1), (t * s).sum(axis=1)
    if not (bool(xp.isfinite(tt * ss).all()) and bool(xp.isfinite(ts).all())):
        # Huge float64 rows: cosine is scale-free, so scale each row to max 1.
        ks = xp.abs(s).max(axis=1, keepdims=True)
        kt = xp.abs(t).max(axis=1, keepdims=True)
        if not (bool(xp.isfinite(ks).all()) and bool(xp.isfinite(kt).all())):
            return math.nan  # non-finite inputs: reported by the caller
        ks[ks == 0] = 1
        kt[kt == 0] = 1
        part = None if g is None else xp.zeros_like(g)
        value = _row_cosine(xp, t / kt, s / ks, part, scale)
        if g is not None:
            g += part / ks
        return value
    product = xp.sqrt(tt * ss)
    floored = product < _NORM_FLOOR
    denominator = xp.where(floored, _NORM_FLOOR, product)
    c = ts / denominator
    free = (c >= -1) & (c <= 1)
    value = float((1 - xp.clip(c, -1, 1)).sum())
    if g is not None:
        alpha = xp.where(free, -1 / denominator, 0)
        beta = xp.where(free & ~floored, c / xp.where(ss > 0, ss, 1), 0)
        g += scale * (alpha[:, None] * t + beta[:, None] * s)
    return value


def _row_kl(xp: Any, t: Any, s: Any, tau: float, g: Any, scale: float) -> float:
    """Sum over rows of ``KL(softmax(t/tau) || softmax(s/tau))``; adds ``scale (q - p)`` to ``g``.

    Per row, as in the flat case, ``KL = sum p (a - b) - lse(a) + lse(b)``.
    Overwrites ``t`` and ``s`` (float64 copies of the block).
    """
    a, b = xp.divide(t, tau, out=t), xp.divide(s, tau, out=s)
    ma, mb = a.max(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    ea, eb = xp.exp(a - ma), xp.exp(b - mb)
    za, zb = ea.sum(axis=1, keepdims=True), eb.sum(axis=1, keepdims=True)
    diff = xp.subtract(a, b, out=a)
    rows = (ea * diff).sum(axis=1, keepdims=True) / za - (ma + xp.log(za)) + (mb + xp.log(zb))
    if g is not None:
        eb /= zb
        ea /= za
        eb -= ea
        eb *= scale
        g += eb
    return float(rows.sum())


# ---------------------------------------------------------------- one layer


def evaluate(loss: DistilLoss, teacher: Any, student: Any, gradient_scale: float | None = None) -> tuple[float, Any]:
    """A layer's unweighted loss and, when ``gradient_scale`` is given,
    ``gradient_scale * d loss / d student`` in the student's shape and dtype.

    The inputs are non-empty arrays of equal size (of equal shape for
    ``PER_ROW``). The value may be non-finite when the inputs are, and then
    no gradient is returned; :func:`layer_loss` and :func:`total_loss` turn
    that into an error.
    """
    per_row = loss.reduction is Reduction.PER_ROW and loss.kind is not LossKind.MSE
    return (_rows if per_row else _flat)(loss, teacher, student, gradient_scale)


def loss_value(loss: DistilLoss, teacher: Any, student: Any) -> float:
    """The unweighted loss of two non-empty arrays of equal size."""
    return evaluate(loss, teacher, student)[0]


# ---------------------------------------------------------------- the distiller


@dataclass(frozen=True)
class Layer:
    """One distillation layer: ``weight * loss(teacher, student)``."""

    weight: float
    loss: DistilLoss
    name: str = ""


@dataclass(frozen=True)
class LayerResult:
    """A layer's result and, when asked for, its student gradient."""

    loss: LayerLoss
    gradient: Any = None


def _check_pair(index: int, loss: DistilLoss, teacher: Any, student: Any, fields: tuple[str, str]) -> None:
    """The reference's checks in its order (empty teacher, lengths), then shapes for PER_ROW."""
    if teacher.size == 0:
        raise EmptyInput(f"layer {index}: {fields[0]} is empty", layer=index, field=fields[0])
    if teacher.size != student.size:
        raise TeacherStudentMismatch(
            f"layer {index}: {fields[0]} has {teacher.size} elements but {fields[1]} has {student.size}",
            layer=index,
            field=fields[1],
            teacher=teacher.size,
            student=student.size,
        )
    if loss.reduction is Reduction.PER_ROW and teacher.shape != student.shape:
        raise ShapeMismatch(
            f"layer {index}: {loss!r} compares rows, so {fields[0]} and {fields[1]} must have the same shape; "
            f"got {list(teacher.shape)} and {list(student.shape)}",
            layer=index,
            field=f"{fields[1]}.shape",
        )


def _first_non_finite(array: Any) -> int | None:
    xp = array_module(array)
    bad = xp.flatnonzero(~xp.isfinite(array.reshape(-1)))
    return int(bad[0]) if bad.size else None


def _compute(
    index: int, layer: Layer, teacher: Any, student: Any, fields: tuple[str, str], gradient: bool
) -> LayerResult:
    value, grad = evaluate(layer.loss, teacher, student, layer.weight if gradient else None)
    weighted = layer.weight * value
    if not math.isfinite(weighted):
        for field, array in zip(fields, (teacher, student), strict=True):
            at = _first_non_finite(array)
            if at is not None:
                raise NonFiniteInput(
                    f"layer {index}: {field} holds {float(array.reshape(-1)[at])} at flat index {at}; "
                    "inputs must be finite",
                    layer=index,
                    field=f"{field}.data",
                    index=at,
                )
        raise LossOverflow(
            f"layer {index}: the {layer.loss!r} loss of finite inputs times weight {layer.weight} "
            f"is {weighted}, beyond float64",
            layer=index,
        )
    return LayerResult(LayerLoss(index, layer.name, value, weighted), grad)


def layer_loss(
    layers: Sequence[Layer], index: int, teacher: Any, student: Any, *, gradient: bool = False
) -> LayerResult:
    """The reference's ``compute_layer_loss``: layer ``index``'s weighted loss.

    With ``gradient``, also ``weight * d loss / d student``.

    Raises:
        LayerIndexOutOfRange: ``index >= len(layers)`` (expected ``len(layers)``,
            got ``index + 1``), checked before the inputs.
        EmptyInput, TeacherStudentMismatch, ShapeMismatch, NonFiniteInput,
            LossOverflow.
    """
    if index >= len(layers):
        raise LayerIndexOutOfRange(
            f"layer_index {index} is out of range for {len(layers)} layer(s)",
            field="layer_index",
            expected=len(layers),
            got=index + 1,
        )
    fields = ("teacher", "student")
    _check_pair(index, layers[index].loss, teacher, student, fields)
    return _compute(index, layers[index], teacher, student, fields, gradient)


def total_loss(
    layers: Sequence[Layer], teachers: Sequence[Any], students: Sequence[Any], *, gradient: bool = False
) -> tuple[float, list[LayerResult]]:
    """The reference's ``compute_total_loss``: the sum of every layer's weighted loss.

    Counts are checked first (teachers, then students); then every layer's
    inputs, so the first failing layer's error wins; only then is anything
    computed. With ``gradient``, each result holds the gradient of the total
    with respect to its student tensor.

    Raises:
        DimensionMismatch: a tensor count differs from ``len(layers)``.
        EmptyInput, TeacherStudentMismatch, ShapeMismatch, NonFiniteInput,
            LossOverflow.
    """
    for name, tensors in (("teachers", teachers), ("students", students)):
        if len(tensors) != len(layers):
            raise DimensionMismatch(
                f"{len(tensors)} {name} sent for {len(layers)} layer(s)",
                field=name,
                expected=len(layers),
                got=len(tensors),
            )
    fields = [(f"teachers[{i}]", f"students[{i}]") for i in range(len(layers))]
    for i, (layer, teacher, student) in enumerate(zip(layers, teachers, students, strict=True)):
        _check_pair(i, layer.loss, teacher, student, fields[i])
    results = [
        _compute(i, *args, gradient) for i, args in enumerate(zip(layers, teachers, students, fields, strict=True))
    ]
    try:
        total = math.fsum(result.loss.weighted_loss for result in results)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        raise LossOverflow(f"the total of {len(results)} finite layer losses overflows float64")
    return total, results
