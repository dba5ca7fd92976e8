"""The loss math, written once for NumPy and CuPy.

Every loss is one pass over its inputs: the flat vectors are cast block by
block into float64 scratch buffers (in cache on the CPU, one block on a GPU)
and every sum the loss needs is accumulated from the same block. KL uses an
online log-sum-exp, so it needs no separate pass for the maxima and stays
finite where the reference clamps ``ln q`` at ``ln 1e-12``. Accumulating in
float64 makes results at least as accurate as the float32 reference.

The distiller functions reproduce the reference ``FeatureDistiller``: its
checks, their order and its error kinds (see SEMANTICS in the docs).
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
    TeacherStudentMismatch,
)
from distill_client.losses import DistilLoss, LayerLoss, LossKind
from distill_server.backend import array_module, block_size

__all__ = [
    "MIN_TEMPERATURE",
    "Layer",
    "cosine",
    "kl_divergence",
    "layer_loss",
    "loss_value",
    "mse",
    "total_loss",
]

MIN_TEMPERATURE = 1e-6
"""Temperatures are floored here, as in the reference."""

_NORM_FLOOR = 1e-12
"""Floor of the cosine denominator ``|t| |s|``, as in the reference."""


class _SquaredError:
    """``sum((t - s)^2)``."""

    def __init__(self, xp: Any, size: int) -> None:
        self.diff = xp.empty(size, dtype=xp.float64)
        self.total = 0.0

    def add(self, xp: Any, t: Any, s: Any) -> None:
        d = xp.subtract(t, s, out=self.diff[: t.size])
        self.total += float(xp.dot(d, d))


class _Dots:
    """``dot(t, t)``, ``dot(s, s)`` and ``dot(t, s)``."""

    def __init__(self, xp: Any, size: int) -> None:
        self.tt = self.ss = self.ts = 0.0

    def add(self, xp: Any, t: Any, s: Any) -> None:
        self.tt += float(xp.dot(t, t))
        self.ss += float(xp.dot(s, s))
        self.ts += float(xp.dot(t, s))


class _SoftmaxKl:
    """Online sums for ``KL(softmax(a) || softmax(b))``, ``a = t/tau``, ``b = s/tau``.

    Keeps the running maxima ``ma``, ``mb`` and, relative to them,
    ``za = sum exp(a - ma)``, ``zb = sum exp(b - mb)`` and
    ``w = sum exp(a - ma) (a - b)``; then
    ``KL = w / za - (ma + ln za) + (mb + ln zb)``.
    """

    def __init__(self, xp: Any, size: int, temperature: float) -> None:
        self.scale = 1.0 / max(temperature, MIN_TEMPERATURE)
        self.a, self.b, self.tmp = (xp.empty(size, dtype=xp.float64) for _ in range(3))
        self.ma = self.mb = -math.inf
        self.za = self.zb = self.w = 0.0

    def add(self, xp: Any, t: Any, s: Any) -> None:
        n = t.size
        a = xp.multiply(t, self.scale, out=self.a[:n])
        b = xp.multiply(s, self.scale, out=self.b[:n])
        tmp = self.tmp[:n]
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

    def value(self) -> float:
        return self.w / self.za - (self.ma + math.log(self.za)) + (self.mb + math.log(self.zb))


def _accumulate(teacher: Any, student: Any, *sums: Any) -> None:
    """Feed both flat vectors, block by block as float64, to every accumulator.

    Non-finite values propagate to the sums, where the callers check them, so
    NumPy's floating-point warnings are silenced.
    """
    xp = array_module(teacher)
    t, s = teacher.reshape(-1), student.reshape(-1)
    size = block_size(t)
    tb, sb = xp.empty(size, dtype=xp.float64), xp.empty(size, dtype=xp.float64)
    with np.errstate(all="ignore"):
        for start in range(0, t.size, size):
            stop = min(start + size, t.size)
            xp.copyto(tb[: stop - start], t[start:stop])
            xp.copyto(sb[: stop - start], s[start:stop])
            for acc in sums:
                acc.add(xp, tb[: stop - start], sb[: stop - start])


def mse(teacher: Any, student: Any) -> float:
    """``sum((t - s)^2) / n`` of two equally long, non-empty arrays."""
    sq = _SquaredError(array_module(teacher), block_size(teacher))
    _accumulate(teacher, student, sq)
    return sq.total / int(teacher.size)


def cosine(teacher: Any, student: Any) -> float:
    """``1 - clamp(dot(t, s) / max(|t| |s|, 1e-12), -1, 1)``.

    Float64 inputs beyond about 1e77 overflow ``|t|^2 |s|^2``; the distance
    is scale-free, so they are then recomputed scaled by their largest
    magnitude.
    """
    xp = array_module(teacher)
    dots = _Dots(xp, block_size(teacher))
    _accumulate(teacher, student, dots)
    norms_squared = dots.tt * dots.ss
    if not (math.isfinite(norms_squared) and math.isfinite(dots.ts)):
        t_max, s_max = float(xp.abs(teacher).max()), float(xp.abs(student).max())
        if not (math.isfinite(t_max) and math.isfinite(s_max)):
            return math.nan
        return cosine(teacher / (t_max or 1.0), student / (s_max or 1.0))
    # sqrt(tt * ss), not sqrt(tt) * sqrt(ss): exact 0 for identical vectors.
    denominator = max(math.sqrt(norms_squared), _NORM_FLOOR)
    return 1.0 - min(max(dots.ts / denominator, -1.0), 1.0)


def kl_divergence(teacher: Any, student: Any, temperature: float) -> float:
    """``tau'^2 KL(softmax(t/tau') || softmax(s/tau'))``, ``tau' = max(tau, 1e-6)``."""
    kl = _SoftmaxKl(array_module(teacher), block_size(teacher), temperature)
    _accumulate(teacher, student, kl)
    return _tau_squared(temperature) * kl.value()


def _tau_squared(temperature: float) -> float:
    return max(temperature, MIN_TEMPERATURE) ** 2


def _combined(teacher: Any, student: Any, loss: DistilLoss) -> float:
    xp = array_module(teacher)
    sq = _SquaredError(xp, block_size(teacher))
    kl = _SoftmaxKl(xp, block_size(teacher), loss.temperature)
    _accumulate(teacher, student, sq, kl)
    return loss.kl_weight * _tau_squared(loss.temperature) * kl.value() + loss.mse_weight * sq.total / int(teacher.size)


def loss_value(loss: DistilLoss, teacher: Any, student: Any) -> float:
    """The unweighted loss of two equally long, non-empty arrays (any shape).

    May be non-finite when the inputs are; :func:`layer_loss` and
    :func:`total_loss` turn that into an error.
    """
    if loss.kind is LossKind.MSE:
        return mse(teacher, student)
    if loss.kind is LossKind.COSINE:
        return cosine(teacher, student)
    if loss.kind is LossKind.KL_DIVERGENCE:
        return kl_divergence(teacher, student, loss.temperature)
    return _combined(teacher, student, loss)


@dataclass(frozen=True)
class Layer:
    """One distillation layer: ``weight * loss(teacher, student)``."""

    weight: float
    loss: DistilLoss
    name: str = ""


def _check_pair(index: int, teacher: Any, student: Any, fields: tuple[str, str]) -> None:
    """The reference's checks, in its order: empty teacher, then lengths."""
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


def _first_non_finite(array: Any) -> int | None:
    xp = array_module(array)
    bad = xp.flatnonzero(~xp.isfinite(array.reshape(-1)))
    return int(bad[0]) if bad.size else None


def _compute(index: int, layer: Layer, teacher: Any, student: Any, fields: tuple[str, str]) -> LayerLoss:
    value = loss_value(layer.loss, teacher, student)
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
    return LayerLoss(index, layer.name, value, weighted)


def layer_loss(layers: Sequence[Layer], index: int, teacher: Any, student: Any) -> LayerLoss:
    """The reference's ``compute_layer_loss``: layer ``index``'s weighted loss.

    Raises:
        LayerIndexOutOfRange: ``index >= len(layers)`` (expected ``len(layers)``,
            got ``index + 1``), checked before the inputs.
        EmptyInput, TeacherStudentMismatch, NonFiniteInput, LossOverflow.
    """
    if index >= len(layers):
        raise LayerIndexOutOfRange(
            f"layer_index {index} is out of range for {len(layers)} layer(s)",
            field="layer_index",
            expected=len(layers),
            got=index + 1,
        )
    fields = ("teacher", "student")
    _check_pair(index, teacher, student, fields)
    return _compute(index, layers[index], teacher, student, fields)


def total_loss(
    layers: Sequence[Layer], teachers: Sequence[Any], students: Sequence[Any]
) -> tuple[float, list[LayerLoss]]:
    """The reference's ``compute_total_loss``: the sum of every layer's weighted loss.

    Counts are checked first (teachers, then students); then every layer's
    inputs, so the first failing layer's error wins; only then is anything
    computed.

    Raises:
        DimensionMismatch: a tensor count differs from ``len(layers)``.
        EmptyInput, TeacherStudentMismatch, NonFiniteInput, LossOverflow.
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
    for i, (teacher, student) in enumerate(zip(teachers, students, strict=True)):
        _check_pair(i, teacher, student, fields[i])
    results = [_compute(i, *args) for i, args in enumerate(zip(layers, teachers, students, fields, strict=True))]
    try:
        total = math.fsum(result.weighted_loss for result in results)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        raise LossOverflow(f"the total of {len(results)} finite layer losses overflows float64")
    return total, results
