"""The loss math and its gradients, written once for NumPy and CuPy.

A layer's tensors are viewed as ``R`` rows of width ``d``: one row of all
``n`` elements for ``FLATTEN`` (the reference's behaviour), the last axis for
``PER_ROW`` cosine and KL (averaged over rows). Rows are processed in blocks
of at most :func:`_block` elements: whole rows
when they fit, else column chunks of one row. Each block is cast into
float64 scratch buffers (in cache on the CPU; one block on a GPU) and every
sum a loss needs is taken from it, per row:

- MSE: ``sum((s - t)^2)`` (over all elements, in both reductions);
- cosine: the dot products ``tt, ss, ts``;
- KL: an online log-sum-exp of ``t / tau`` and ``s / tau`` (running maxima
  rescale the sums of earlier chunks), so no separate pass for the maxima,
  and it stays finite where the reference clamps ``ln q`` at ``ln 1e-12``.

A gradient needs a row's finished sums (norms, log-partition functions), so
it is a second pass over that group of rows, written block by block straight
into the student's dtype. The memory of a call is therefore a few blocks of
float64 scratch plus the gradient itself, whatever the row width.

On a GPU the same sums are taken by fused CUDA kernels (one launch per pass
over all rows, :mod:`distill_server.kernels`, behind :class:`_CudaPass`);
from the sums on, the math is this module's, for both devices.

The batch losses (similarity-preserving, CKA, PKT, attention transfer)
compare samples with samples, so they need whole tensors: their math is in
:mod:`distill_server.relational`, on float64 copies within
:data:`BATCH_MAX_ELEMENTS` and its batch limits, and this module stores
their gradients like every other.

Every block loop goes through :func:`~distill_server.interruption.blocks`,
which runs the check that :func:`~distill_server.interruption.interruptible`
installs, so a server can stop abandoned work between blocks (on a GPU,
between passes).

The distiller functions at the end reproduce the reference
``FeatureDistiller``: its checks, their order and its error kinds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from distill_core.errors import (
    DimensionMismatch,
    EmptyInput,
    InvalidArgument,
    LayerIndexOutOfRange,
    LimitExceeded,
    LossOverflow,
    NonFiniteInput,
    ShapeMismatch,
    TeacherStudentMismatch,
)
from distill_core.losses import ELEMENTWISE, DistilLoss, LayerLoss, LossKind, Reduction
from distill_server import parallel, relational, scratch
from distill_server.backend import array_module, block_size
from distill_server.interruption import blocks, check

__all__ = [
    "BATCH_MAX_ELEMENTS",
    "LOGITS_MAX_ELEMENTS",
    "MIN_TEMPERATURE",
    "Layer",
    "LayerResult",
    "evaluate",
    "layer_loss",
    "loss_value",
    "total_loss",
]

MIN_TEMPERATURE = 1e-6
"""Temperatures below this are computed at it, as in the reference. (A
``DistilLoss`` holds a finite temperature > 0; the reference floors 0 and
negative ones too.)"""

_NORM_FLOOR = 1e-12
"""Floor of the cosine denominator ``|t| |s|``, as in the reference."""

_SMALL_GAP = 1e-2
"""KL rows whose logit gaps ``|s - t| / tau`` are all at most this get their
gradient ``q - p`` in a form accurate relative to the gap (see
:meth:`_Pass._kl_gradient`); wider gaps do not cancel enough to need it."""


# ---------------------------------------------------------------- the sums


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


class _GradientOverflow(ArithmeticError):
    """A finite loss whose gradient does not fit the student's dtype."""

    def __init__(self, peak: float, dtype: Any) -> None:
        super().__init__(peak, dtype)
        self.peak, self.dtype = peak, np.dtype(dtype)

    def describe(self) -> str:
        """``reaches ... in magnitude, beyond float16 (largest 65504)``."""
        infinity = np.asarray(np.inf, dtype=self.dtype)
        largest = float(np.nextafter(infinity, np.zeros_like(infinity)))  # also for ml_dtypes' bfloat16
        if math.isfinite(self.peak) and self.dtype.itemsize < 8:
            return (
                f"reaches {self.peak:.6g} in magnitude, beyond {self.dtype.name} "
                f"(whose largest finite value is {largest:.6g})"
            )
        return f"is not finite in float64 (largest magnitude {self.peak}); student dtype {self.dtype.name}"


def _overflows(peak: float, dtype: Any) -> bool:
    """Whether a float64 of magnitude ``peak`` rounds to infinity in ``dtype``.

    Rounding is monotonic, so this says whether any element written into a
    ``dtype`` array from values of at most ``peak`` became infinite.
    """
    if math.isnan(peak):
        return True
    with np.errstate(all="ignore"):
        return not math.isfinite(float(np.asarray(peak, dtype=np.float64).astype(dtype)))


def _peak(*magnitudes: float) -> float:
    """The largest of ``magnitudes``, NaN if any is NaN (Python's ``max`` would drop it)."""
    return math.nan if any(math.isnan(m) for m in magnitudes) else max(magnitudes)


_FLOAT16_SUBNORMAL = 2.0**-14
"""Below this magnitude float16 is subnormal: multiples of 2^-24."""


def _store(out: np.ndarray, g: np.ndarray) -> None:
    """``out[...] = g``, rounded to ``out``'s dtype.

    NumPy rounds float64 to a float16 subnormal about 30 times slower than to
    a normal number, and a gradient of a mean over millions of elements is
    mostly subnormal in float16: those are rounded here instead, to nearest
    even multiple of 2^-24 by their bits (the same values NumPy's cast gives).
    """
    if out.dtype != np.float16:
        np.copyto(out, g, casting="unsafe")
        return
    steps = np.abs(g)  # the one temporary of g's size
    small = np.less(steps, _FLOAT16_SUBNORMAL)
    if not small.any():
        np.copyto(out, g, casting="unsafe")
        return
    if not small.all():
        np.copyto(out, g, casting="unsafe", where=~small)
    steps *= 2.0**24
    np.minimum(steps, 1024.0, out=steps)  # 1024 steps: the smallest normal, 0x0400
    bits = np.rint(steps, out=steps).astype(np.uint16)
    bits |= np.signbit(g).astype(np.uint16) << 15
    np.copyto(out.view(np.uint16), bits, where=small)


_GIL_LOOPS = 500
"""NumPy releases the GIL in a gufunc such as ``vecdot`` only past this many loops."""


def _row_dot(x: Any, y: Any, shared: bool = False) -> Any:
    """Per-row dot products of two ``(r, m)`` float64 blocks (one pass, no
    temporary; 2-4x a multiply and a sum): a BLAS ``dot`` for a single row,
    else one ``vecdot``. On a pass that shares its layer with other threads,
    each row is cut into pieces so that the ``vecdot`` loops more than
    :data:`_GIL_LOOPS` times and releases the GIL (a ``dot`` a row releases
    it too, but hands it over so often that two threads ran slower than one)."""
    rows, width = x.shape
    if rows == 1:
        return np.dot(x[0], y[0])[None]
    if not shared or rows == 0 or rows > _GIL_LOOPS:
        return np.vecdot(x, y)
    pieces = 1 << (-(-(_GIL_LOOPS + 1) // rows) - 1).bit_length()  # a power of two: no rest in a power-of-two width
    size = width // pieces
    if size == 0:  # a block too small to be worth sharing
        return np.vecdot(x, y)
    body = pieces * size
    dots = np.vecdot(x[:, :body].reshape(rows, pieces, size), y[:, :body].reshape(rows, pieces, size)).sum(axis=1)
    if body < width:
        dots += np.vecdot(x[:, body:], y[:, body:])
    return dots


class _Sums:
    """Running sums, per row of a group, over the column chunks of its rows.

    ``sq = sum((s - t)^2)`` (a scalar: MSE is over all elements); for cosine
    the dot products ``tt, ss, ts``; for KL, with ``a = t/tau``, ``b = s/tau``:
    the maxima ``ma, mb`` and, relative to them, ``za = sum exp(a - ma)``,
    ``zb = sum exp(b - mb)``, ``w = sum exp(a - ma) (a - b)``; with a
    gradient also ``gap = max |d|``, ``d = (s - t)/tau``, and, while some row's
    ``gap <= _SMALL_GAP``, ``v = sum exp(a - ma) expm1(d)`` (else None).
    Arrays of one value per row.
    """

    def __init__(self) -> None:
        self.sq = 0.0
        self.cos: list[Any] = []
        self.kl: dict[str, Any] = {}

    def add_cosine(self, tt: Any, ss: Any, ts: Any) -> None:
        """Add one chunk's dot products."""
        self.cos = [tt, ss, ts] if not self.cos else [x + y for x, y in zip(self.cos, (tt, ss, ts), strict=True)]

    def add_kl(self, xp: Any, part: dict[str, Any]) -> None:
        """Merge one chunk's KL sums, rescaling both to the larger maxima."""
        if not self.kl:
            self.kl = part
            return
        old = self.kl
        top, bottom = xp.maximum(old["ma"], part["ma"]), xp.maximum(old["mb"], part["mb"])
        was, now = xp.exp(old["ma"] - top), xp.exp(part["ma"] - top)  # one of them is exp(0) = 1
        merged = {"ma": top, "za": old["za"] * was + part["za"] * now, "w": old["w"] * was + part["w"] * now}
        merged["mb"] = bottom
        merged["zb"] = old["zb"] * xp.exp(old["mb"] - bottom) + part["zb"] * xp.exp(part["mb"] - bottom)
        if "gap" in old:
            merged["gap"] = xp.maximum(old["gap"], part["gap"])
            both = old["v"] is not None and part["v"] is not None
            merged["v"] = old["v"] * was + part["v"] * now if both else None
        self.kl = merged

    def merge(self, xp: Any, other: _Sums) -> None:
        """Add the sums of the same rows' other columns."""
        self.sq += other.sq
        if other.cos:
            self.add_cosine(*other.cos)
        if other.kl:
            self.add_kl(xp, other.kl)

    def small_gaps(self, xp: Any, gap: Any) -> bool:
        """Whether, after a chunk with these gaps, some row still has all its gaps small."""
        if self.kl:
            gap = xp.maximum(self.kl["gap"], gap)
            if self.kl["v"] is None:
                return False
        return bool((gap <= _SMALL_GAP).any())

    def cosine_parts(self, xp: Any, kt: Any, ks: Any, scale: float) -> tuple[float, Any, Any]:
        """``(sum of 1 - c, alpha, beta)``: each row's gradient is ``alpha t + beta s``.

        ``t, s`` are the rows as loaded: divided by ``kt, ks`` (per-row
        scales, or None) where the squared norms overflow. Where the
        denominator is floored or ``c`` clamped, the gradient is 0 (see
        docs/gradients.md).
        """
        tt, ss, ts = self.cos
        norm = xp.sqrt(tt * ss)
        product = norm if kt is None else norm * kt * ks
        floored = product < _NORM_FLOOR
        safe = xp.where(floored, 1.0, norm)
        c = xp.where(floored, ts / _NORM_FLOOR if kt is None else ts * (kt * ks) / _NORM_FLOOR, ts / safe)
        value = float((1 - xp.clip(c, -1, 1)).sum())
        free = (c >= -1) & (c <= 1) & ~floored
        unit = 1.0 if ks is None else ks  # d/ds of f(s / k) is f'(s / k) / k
        alpha = xp.where(free, -scale / (safe * unit), 0.0)
        beta = xp.where(free, scale * c / (xp.where(free, ss, 1.0) * unit), 0.0)
        return value, alpha, beta

    def kl_parts(self, xp: Any) -> tuple[float, Any, Any]:
        """``(sum over rows of KL, lse(b) - lse(a), small)`` per row; the last two with a gradient.

        ``KL = sum p (a - b) - lse(a) + lse(b)``. Where a row's gaps are
        small (``small``), ``lse(b) - lse(a) = log1p(sum p expm1(d))``: accurate
        relative to ``d``, where the difference of the log-sum-exps would keep
        only an absolute accuracy of a few ulps of the log-sum-exps.
        """
        kl = self.kl
        lse_a, lse_b = kl["ma"] + xp.log(kl["za"]), kl["mb"] + xp.log(kl["zb"])
        value = float((kl["w"] / kl["za"] - lse_a + lse_b).sum())
        if "gap" not in kl:
            return value, None, None
        if kl["v"] is None:
            return value, lse_b - lse_a, None
        small = kl["gap"] <= _SMALL_GAP
        return value, xp.where(small, xp.log1p(kl["v"] / kl["za"]), lse_b - lse_a), small


# ---------------------------------------------------------------- the passes


@dataclass
class _Factors:
    """A group's gradient: ``mse (s - t) + alpha t + beta s + gamma (q - p)`` per row.

    ``kt, ks``: per-row scales the rows are divided by as they are loaded
    (huge float64 cosine rows), or None. For KL: ``ma, mb``,
    ``p_unit = gamma / za``, ``q_unit = gamma / zb`` (so ``p_unit exp(a - ma)``
    is ``gamma p``), ``delta = lse(b) - lse(a)`` and ``small``, the rows
    whose gaps are all small (or None).
    """

    mse: float = 0.0
    alpha: Any = None
    beta: Any = None
    kt: Any = None
    ks: Any = None
    ma: Any = None
    mb: Any = None
    p_unit: Any = None
    q_unit: Any = None
    delta: Any = None
    small: Any = None


def _buffers(terms: _Terms, gradient: bool) -> int:
    """Float64 buffers of one block a CPU pass uses: its two inputs, and
    the difference (MSE) or the exponentials (KL); cosine's gradient pass
    uses two more."""
    return 5 if terms.kl else (4 if gradient else 2) if terms.cosine else 3


def _block(terms: _Terms, gradient: bool, t: Any) -> int:
    """Elements a CPU pass over ``t`` takes at a time: the scratch set
    (:data:`~distill_server.scratch.BUFFERS` blocks of
    :data:`~distill_server.backend.CPU_BLOCK`) shared among the buffers the
    pass uses, in a power of two of blocks. The value of cosine, with two
    buffers, takes blocks twice as large: its per-block work (the dot
    products) runs half as often, which measured 8.1 -> 8.7 GB/s on one
    thread and 11.8 -> 14.6 on two; MSE and KL were level or slower so."""
    share = scratch.BUFFERS // _buffers(terms, gradient)
    return min(block_size(t) << (share.bit_length() - 1), max(int(t.size), 1))


class _Pass:
    """The passes over one layer's ``(R, d)`` views on the CPU, in blocks of ``group`` rows by ``chunk`` columns.

    Float64 scratch buffers of one block each (see :func:`_buffers`), carved
    out of a set lent by :mod:`~distill_server.scratch`, are all the memory a
    pass takes. When a group of rows is one block, KL's gradient pass reuses
    the exponentials the first pass left in the buffers.
    """

    def __init__(
        self, terms: _Terms, t: Any, s: Any, gradient: bool, buffers: Any, block: int, shared: bool = False
    ) -> None:
        self.xp, self.terms, self.t, self.s, self.gradient = np, terms, t, s, gradient
        self.shared = shared  # other threads compute the same layer
        self.row_module: Any = np
        self.rows, self.width = int(t.shape[0]), int(t.shape[1])
        self.group, self.chunk = max(1, block // self.width), min(self.width, block)  # block: _block's
        size = self.group * self.chunk
        self.scratch = [buffers[i * block : i * block + size] for i in range(_buffers(terms, gradient))]
        self._kept: slice | None = None  # the group whose KL exponentials are in the scratch

    def _chunks(self, block: slice) -> Iterator[tuple[slice, list[Any]]]:
        """The column chunks of the rows ``block``, each with ``(rows, columns)`` views of
        the five scratch buffers (None for those this loss does not use)."""
        rows = block.stop - block.start
        for cols in blocks(self.width, self.chunk):
            size, shape = rows * (cols.stop - cols.start), (rows, cols.stop - cols.start)
            views = [buffer[:size].reshape(shape) for buffer in self.scratch]
            yield cols, views + [None] * (5 - len(views))

    def _load(self, out: Any, x: Any, scale: Any) -> Any:
        self.xp.copyto(out, x)
        if scale is not None:
            out /= scale[:, None]
        return out

    def row_max(self, x: Any, block: slice) -> Any:
        """``max |x|`` of each row of ``x[block]``."""
        top = None
        for cols, (work, *_) in self._chunks(block):
            part = self.xp.abs(self._load(work, x[block, cols], None), out=work).max(axis=1)
            top = part if top is None else self.xp.maximum(top, part)
        return top

    def _exponentials(self, tb: Any, sb: Any, ea: Any, eb: Any, ma: Any, mb: Any) -> None:
        """``ea = exp(t/tau - ma)``, ``eb = exp(s/tau - mb)`` (``t, s`` in ``tb, sb``)."""
        xp, tau = self.xp, self.terms.tau
        xp.exp(xp.subtract(xp.multiply(tb, 1 / tau, out=ea), ma[:, None], out=ea), out=ea)
        xp.exp(xp.subtract(xp.multiply(sb, 1 / tau, out=eb), mb[:, None], out=eb), out=eb)

    def sums(self, block: slice, kt: Any = None, ks: Any = None) -> _Sums:
        """Pass 1: the sums of the rows ``block`` (divided by ``kt, ks`` if given)."""
        xp, terms, tau = self.xp, self.terms, self.terms.tau
        sums = _Sums()
        chunks = 0
        for cols, (tb, sb, diff, ea, eb) in self._chunks(block):
            chunks += 1
            self._load(tb, self.t[block, cols], kt)
            self._load(sb, self.s[block, cols], ks)
            differs = terms.mse or (terms.kl and self.gradient)
            if differs:
                xp.subtract(sb, tb, out=diff)
                if terms.mse:
                    sums.sq += float(xp.vdot(diff, diff))
            if terms.cosine:
                shared = self.shared
                sums.add_cosine(_row_dot(tb, tb, shared), _row_dot(sb, sb, shared), _row_dot(tb, sb, shared))
            if terms.kl:
                a, b = xp.multiply(tb, 1 / tau, out=tb), xp.multiply(sb, 1 / tau, out=sb)
                ma, mb = a.max(axis=1), b.max(axis=1)
                xp.exp(xp.subtract(a, ma[:, None], out=ea), out=ea)
                xp.exp(xp.subtract(b, mb[:, None], out=eb), out=eb)
                # w = sum p (a - b): from s - t where it is at hand (one pass fewer, and exact before the scaling)
                w = (
                    _row_dot(ea, diff, self.shared) * (-1 / tau)
                    if differs
                    else _row_dot(ea, xp.subtract(a, b, out=tb), self.shared)
                )
                part = {"ma": ma, "za": ea.sum(axis=1), "w": w, "mb": mb, "zb": eb.sum(axis=1)}
                if self.gradient:
                    d = xp.multiply(diff, 1 / tau, out=sb)
                    part["gap"] = xp.maximum(d.max(axis=1), -d.min(axis=1))
                    small = sums.small_gaps(xp, part["gap"])
                    part["v"] = _row_dot(ea, xp.expm1(d, out=sb), self.shared) if small else None
                sums.add_kl(xp, part)
        self._kept = block if terms.kl and chunks == 1 else None
        return sums

    def gradient_pass(self, block: slice, factors: _Factors, out: Any) -> float:
        """Pass 2: write the rows ``block`` of the gradient into ``out``; returns its largest magnitude."""
        xp, terms = self.xp, self.terms
        kept, self._kept = self._kept == block, None
        peak = 0.0
        for cols, (tb, sb, diff, ea, eb) in self._chunks(block):
            if not kept:
                self._load(tb, self.t[block, cols], factors.kt)
                self._load(sb, self.s[block, cols], factors.ks)
                if terms.mse or terms.kl:
                    xp.subtract(sb, tb, out=diff)
                if terms.kl:
                    self._exponentials(tb, sb, ea, eb, factors.ma, factors.mb)
            if terms.cosine:
                g = xp.multiply(tb, factors.alpha[:, None], out=diff)
                g += xp.multiply(sb, factors.beta[:, None], out=ea)
            elif terms.mse:
                # 2 (s - t) / n from the difference itself: exact where s and t nearly agree.
                g = xp.multiply(diff, factors.mse, out=tb)
            elif not terms.kl:  # no term at all (combined, both weights 0): the loss is flat
                g = tb
                g.fill(0)
            if terms.kl:
                kl = self._kl_gradient(diff, ea, eb, factors)
                g = xp.add(g, kl, out=g) if terms.mse else kl
            _store(out[:, cols], g)
            peak = _peak(peak, float(g.max()), -float(g.min()))
        return peak

    def _kl_gradient(self, diff: Any, ea: Any, eb: Any, factors: _Factors) -> Any:
        """``gamma (q - p)`` into ``ea``, from ``diff = s - t`` and the exponentials ``ea``, ``eb``.

        Where a row's gaps are small, ``q`` and ``p`` nearly agree and
        ``q - p`` would cancel: it is ``p expm1(e)`` with
        ``e = log q - log p = (s - t)/tau - delta``, accurate relative to the
        gap. Elsewhere ``q - p`` loses at most a few ulps of ``max(p, q)``.
        """
        xp = self.xp
        gamma_p = xp.multiply(ea, factors.p_unit[:, None], out=ea)
        everywhere = factors.small is not None and bool(factors.small.all())
        if not everywhere:
            direct = xp.multiply(eb, factors.q_unit[:, None], out=eb)
            direct -= gamma_p
            if factors.small is None:
                return direct
        e = xp.multiply(diff, 1 / self.terms.tau, out=diff)
        e -= factors.delta[:, None]
        accurate = xp.multiply(gamma_p, xp.expm1(e, out=e), out=gamma_p)
        if not everywhere:
            xp.copyto(accurate, direct, where=~factors.small[:, None])
        return accurate


class _Columns:
    """:class:`_Pass`'s interface for one row split into column ranges, a
    ``_Pass`` each, taken in turn by the threads of ``share``; their sums
    merge as the column chunks of a row do."""

    group = 1
    row_module: Any = np

    def __init__(self, terms: _Terms, t: Any, s: Any, gradient: bool, share: parallel.Share) -> None:
        self.terms, self.t, self.s, self.gradient, self.share = terms, t, s, gradient, share
        self.block = _block(terms, gradient, t)
        self.ranges = _split(int(t.shape[1]), SPLIT_BLOCKS * self.block)

    def _each(self, method: Callable[[_Pass, slice], Any]) -> list[Any]:
        """``method(pass, columns)`` for each column range, on its own pass and scratch."""

        def run(columns: slice) -> Any:
            with scratch.lend() as buffers:
                part = _Pass(self.terms, self.t[:, columns], self.s[:, columns], self.gradient, buffers, self.block)
                return method(part, columns)

        return self.share.map(run, self.ranges)

    def sums(self, block: slice, kt: Any = None, ks: Any = None) -> _Sums:
        """Pass 1: the row's sums (divided by ``kt, ks`` if given)."""
        parts: list[_Sums] = self._each(lambda part, _: part.sums(block, kt, ks))
        for part in parts[1:]:
            parts[0].merge(np, part)
        return parts[0]

    def row_max(self, x: Any, block: slice) -> Any:
        """``max |x|`` of the row."""
        return np.maximum.reduce(self._each(lambda part, columns: part.row_max(x[:, columns], block)))

    def gradient_pass(self, block: slice, factors: _Factors, out: Any) -> float:
        """Pass 2: write the row's gradient into ``out``; returns its largest magnitude."""
        return _peak(*self._each(lambda part, columns: part.gradient_pass(block, factors, out[:, columns])))


class _CudaPass:
    """:class:`_Pass`'s interface on a GPU: each pass over all rows is one
    fused kernel (:mod:`distill_server.kernels`) instead of blocks of NumPy
    operations; the engine turns the sums into values and factors alike, in
    ``row_module`` (NumPy on the host for a few rows, else CuPy)."""

    def __init__(self, xp: Any, terms: _Terms, t: Any, s: Any, gradient: bool) -> None:
        from distill_server import kernels

        self.kernels, self.xp, self.terms, self.t, self.s = kernels, xp, terms, t, s
        self.rows, self.width = int(t.shape[0]), int(t.shape[1])
        self.group = max(self.rows, 1)
        self.program = kernels.Sums(bool(terms.mse), bool(terms.cosine), bool(terms.kl), gradient)
        self.row_module: Any = np if self.rows <= _ROWS_ON_HOST else xp

    def _rows(self, x: Any) -> Any:
        """Per-row values where the per-row math runs."""
        return x.get() if self.row_module is np else x

    def row_max(self, x: Any, block: slice) -> Any:
        """``max |x|`` of each row of ``x[block]``."""
        check()
        return self._rows(self.xp.abs(x[block]).max(axis=1).astype(self.xp.float64))

    def sums(self, block: slice, kt: Any = None, ks: Any = None) -> _Sums:
        """Pass 1: the sums of the rows ``block`` (divided by ``kt, ks`` if given)."""
        check()
        host = self.row_module is np
        found = self.kernels.row_sums(self.program, self.t[block], self.s[block], self.terms.tau, kt, ks, host=host)
        sums = _Sums()
        if self.program.mse:
            sums.sq = float(found["sq"].sum())
        if self.program.cosine:
            sums.cos = [found["tt"], found["ss"], found["ts"]]
        if self.program.kl:
            sums.kl = {name: found[name] for name in self.program.fields if name in _KL_SUMS}
        return sums

    def gradient_pass(self, block: slice, factors: _Factors, out: Any) -> float:
        """Pass 2: write the rows ``block`` of the gradient into ``out``; returns its largest magnitude."""
        check()
        return self.kernels.gradient(
            self.program,
            self.t[block],
            self.s[block],
            out,
            self.terms.tau,
            mse=factors.mse,
            alpha=factors.alpha,
            beta=factors.beta,
            kt=factors.kt,
            ks=factors.ks,
            ma=factors.ma,
            mb=factors.mb,
            p_unit=factors.p_unit,
            q_unit=factors.q_unit,
            delta=factors.delta,
            small=factors.small,
        )


_KL_SUMS = ("ma", "za", "w", "mb", "zb", "gap", "v")

_ROWS_ON_HOST = 1 << 12
"""Up to this many rows, a GPU pass brings its per-row sums to the host in one
copy and the per-row math runs in NumPy: a few microseconds, where each CuPy
operation on a handful of values costs a launch."""


def _row_math(
    rx: Any, terms: _Terms, sums: _Sums, factors: _Factors, scale: float, gamma: float
) -> tuple[float, float]:
    """The cosine and KL parts of the rows ``sums`` holds (summed over them),
    with their gradient factors set in ``factors`` (``scale``, ``gamma``:
    those of the cosine and KL gradients per row)."""
    cosine = kl = 0.0
    if terms.cosine:
        cosine, factors.alpha, factors.beta = sums.cosine_parts(rx, factors.kt, factors.ks, scale)
    if terms.kl:
        kl, factors.delta, factors.small = sums.kl_parts(rx)
        factors.ma, factors.mb = sums.kl["ma"], sums.kl["mb"]
        factors.p_unit, factors.q_unit = gamma / sums.kl["za"], gamma / sums.kl["zb"]
    return cosine, kl


def _joined(rx: Any, groups: list[tuple[_Sums, _Factors]]) -> tuple[_Sums, _Factors]:
    """The per-row sums (and row scales) of consecutive groups of rows as
    those of one group: the per-row math is a few operations whatever the
    rows, so once for all rows instead of once a group (per-row cosine of
    512 rows of 32,768 spent a tenth of its time there)."""
    if len(groups) == 1:
        return groups[0]
    first, factors = groups[0][0], replace(groups[0][1])
    joined = _Sums()
    if first.cos:
        joined.cos = [rx.concatenate([sums.cos[i] for sums, _ in groups]) for i in range(3)]
    if first.kl:
        joined.kl = {key: rx.concatenate([sums.kl[key] for sums, _ in groups]) for key in first.kl}
    if any(f.kt is not None for _, f in groups):  # some groups were scaled: the others by 1
        ones = [rx.ones(len(sums.cos[0])) for sums, _ in groups]
        factors.kt = rx.concatenate(
            [f.kt if f.kt is not None else one for (_, f), one in zip(groups, ones, strict=True)]
        )
        factors.ks = rx.concatenate(
            [f.ks if f.ks is not None else one for (_, f), one in zip(groups, ones, strict=True)]
        )
    return joined, factors


class _Partial(NamedTuple):
    """What a pass over some of a layer's rows adds up: the sums of squares,
    of cosine distances and of KL divergences of those rows, and their
    gradient's largest magnitude; all NaN for non-finite inputs."""

    sq: float
    cosine: float
    kl: float
    peak: float


_NON_FINITE = _Partial(math.nan, math.nan, math.nan, math.nan)


SPLIT_BLOCKS = 4
"""A layer is split over threads only where each thread gets at least this
many blocks: handing work to a thread costs about what a block does."""


def _split(count: int, unit: int) -> list[slice]:
    """``range(count)`` as contiguous slices of ``unit`` (the last one shorter)."""
    return [slice(start, min(start + unit, count)) for start in range(0, count, unit)]


def _evaluate(loss: DistilLoss, teacher: Any, student: Any, scale: float | None, out: Any = None) -> tuple[float, Any]:
    """:func:`evaluate`, raising :class:`_GradientOverflow` for a gradient beyond the student's dtype.

    On the CPU a large layer is split over the threads
    :data:`~distill_server.parallel.cores` can spare: its rows (per-row
    losses), or its one row's columns (flattened losses), whose sums merge
    as a row's column chunks do.
    """
    if loss.batched:
        return _evaluate_batch(loss, teacher, student, scale, out)
    xp = array_module(teacher)
    terms = _Terms.of(loss)
    n = int(teacher.size)
    per_row = loss.reduction is Reduction.PER_ROW and loss.kind is not LossKind.MSE
    width = (int(teacher.shape[-1]) if teacher.ndim else 1) if per_row else n
    rows = n // width
    t, s = teacher.reshape(rows, width), student.reshape(rows, width)
    if scale is None:
        out = None
    elif out is None:
        out = xp.empty(student.shape, dtype=student.dtype)
    grid = None if out is None else out.reshape(rows, width)
    k = scale or 0.0  # used only with a gradient
    gradient = scale is not None

    def accumulate(passes: Any, part: slice = slice(None)) -> _Partial:
        into = None if grid is None else grid[part]
        return _accumulate(passes, terms, t[part], s[part], into, n, rows, k)

    def rows_of(part: slice, shared: bool = True) -> _Partial:
        with scratch.lend() as buffers:
            return accumulate(_Pass(terms, t[part], s[part], gradient, buffers, block, shared), part)

    # Parts of SPLIT_BLOCKS blocks: whole groups of rows, or one row's columns.
    block = _block(terms, gradient, t)
    parts = n // (SPLIT_BLOCKS * block) if xp is np else 1
    with parallel.cores.claim(parts) as share, np.errstate(all="ignore"):
        if xp is not np:
            partials = [accumulate(_CudaPass(xp, terms, t, s, gradient))]
        elif share.threads <= 1:
            partials = [rows_of(slice(None), shared=False)]
        elif rows == 1:
            partials = [accumulate(_Columns(terms, t, s, gradient, share))]
        else:
            per_part = min(SPLIT_BLOCKS * max(1, block // width), -(-rows // share.threads))
            partials = share.map(rows_of, _split(rows, per_part))
    sq, cosine, kl = (sum(p.sq for p in partials), sum(p.cosine for p in partials), sum(p.kl for p in partials))
    peak = _peak(*(p.peak for p in partials))
    kl_part = terms.kl * (terms.tau * terms.tau) * kl / rows if terms.kl else 0.0
    value = terms.mse * sq / n + terms.cosine * cosine / rows + kl_part
    if out is None or not math.isfinite(value):
        return value, None
    if _overflows(peak, out.dtype):
        raise _GradientOverflow(peak, out.dtype)
    return value, out


def _accumulate(passes: Any, terms: _Terms, t: Any, s: Any, out: Any, n: int, rows: int, k: float) -> _Partial:
    """The sums of ``passes``'s rows (``t, s``, part of a layer of ``n``
    elements in ``rows`` rows), and their gradient, scaled by ``k``, written
    into ``out`` (or None); non-finite inputs are the caller's to report."""
    rx = passes.row_module  # where the per-row sums are, and the per-row math runs
    gamma = k * terms.kl * terms.tau / rows  # d KL / ds = tau (q - p), per row
    sq = cosine = kl = peak = 0.0
    deferred: list[tuple[_Sums, _Factors]] = []  # the value alone: the per-row math once, over every group
    for start in range(0, int(t.shape[0]), passes.group):
        block = slice(start, min(start + passes.group, int(t.shape[0])))
        factors = _Factors(mse=2 * terms.mse * k / n)
        sums = passes.sums(block)
        sq += sums.sq
        if terms.cosine:
            tt, ss, ts = sums.cos
            if not (bool(rx.isfinite(tt * ss).all()) and bool(rx.isfinite(ts).all())):
                # Huge float64 rows: cosine is scale-free, so scale each row to max 1.
                kt, ks = passes.row_max(t, block), passes.row_max(s, block)
                if not (bool(rx.isfinite(kt).all()) and bool(rx.isfinite(ks).all())):
                    return _NON_FINITE
                factors.kt, factors.ks = rx.where(kt == 0, 1.0, kt), rx.where(ks == 0, 1.0, ks)
                sums = passes.sums(block, factors.kt, factors.ks)
        if out is None:
            deferred.append((sums, factors))
            continue
        parts = _row_math(rx, terms, sums, factors, k / rows, gamma)
        cosine, kl = cosine + parts[0], kl + parts[1]
        if all(map(math.isfinite, (sq, cosine, kl))):
            peak = _peak(peak, passes.gradient_pass(block, factors, out[block]))
    if deferred:
        cosine, kl = _row_math(rx, terms, *_joined(rx, deferred), 0.0, 0.0)
    return _Partial(sq, cosine, kl, peak)


BATCH_MAX_ELEMENTS = 1 << 24
"""The most elements a tensor of a batch loss may have: those losses work on
float64 copies of whole tensors (128 MiB each at this size), not in blocks
(measured: attention transfer and similarity-preserving peak at about 3.6
times their float32 inputs). The logit losses and response distillation,
which hold about nine copies, take :data:`LOGITS_MAX_ELEMENTS`."""

LOGITS_MAX_ELEMENTS = 1 << 22
"""The most elements a tensor of a logit loss (KD, DIST, logit-standardized
KD) or of response distillation may have: about 300 MiB of float64 copies at
this size. The per-row ``kl_divergence``, which streams in blocks, takes
larger logits (the same value as ``kd`` for 2-D logits)."""

_LOGIT_LOSSES = (LossKind.KD, LossKind.DIST, LossKind.LOGIT_STANDARDIZED_KD, LossKind.RESPONSE)


def _evaluate_batch(
    loss: DistilLoss, teacher: Any, student: Any, scale: float | None, out: Any = None
) -> tuple[float, Any]:
    """A batch loss (:mod:`distill_server.relational`) and its gradient in the student's dtype."""
    xp = array_module(teacher)
    value, grad = relational.LOSSES[loss.kind.name.lower()].evaluate(
        xp, teacher, student, loss.params, scale is not None
    )
    if scale is None or grad is None or not math.isfinite(value):
        return value, None
    grad *= scale
    return value, _gradient_into(xp, grad, student, out)


def _evaluate_response(
    loss: DistilLoss, teacher: Any, student: Any, labels: Any, scale: float | None, out: Any = None
) -> tuple[float, Any]:
    """Response distillation: the cross-entropy of each row of student logits
    with its label, plus the soft loss per row (this module's, ``PER_ROW``),
    and the gradient of both in the student's dtype."""
    assert loss.soft_loss is not None  # checked when made
    xp = array_module(student)
    classes = int(student.shape[-1])
    s = student.reshape(-1, classes).astype(xp.float64)
    rows = s.shape[0]
    picked = (xp.arange(rows), xp.asarray(labels))
    with np.errstate(all="ignore"):  # non-finite logits: a non-finite value, reported by the caller
        shifted = s - s.max(axis=1, keepdims=True)
        log_z = xp.log(xp.exp(shifted).sum(axis=1))
        cross_entropy = float((log_z - shifted[picked]).sum()) / rows
    soft = replace(loss.soft_loss, reduction=Reduction.PER_ROW)
    into = None if scale is None else xp.empty(student.shape, dtype=xp.float64)
    soft_scale = None if scale is None else scale * loss.soft_label_weight
    soft_value, grad = _evaluate(soft, teacher, student, soft_scale, into)
    value = loss.hard_label_weight * cross_entropy + loss.soft_label_weight * soft_value
    if scale is None or grad is None or not math.isfinite(value):
        return value, None
    probabilities = xp.exp(shifted - log_z[:, None])  # d CE / d s = softmax(s) - onehot(label), per row
    probabilities[picked] -= 1.0
    grad = grad.reshape(rows, classes)
    grad += (scale * loss.hard_label_weight / rows) * probabilities
    return value, _gradient_into(xp, grad.reshape(student.shape), student, out)


def _gradient_into(xp: Any, grad: Any, student: Any, out: Any) -> Any:
    """A float64 gradient of the student's shape, in the student's dtype:
    into ``out`` if given, else a new array; a gradient beyond that dtype
    raises :class:`_GradientOverflow`."""
    peak = float(xp.abs(grad).max())
    if _overflows(peak, student.dtype):
        raise _GradientOverflow(peak, student.dtype)
    if out is None:
        out = xp.empty(student.shape, dtype=student.dtype)
    if xp is np:
        _store(out, grad)
    else:
        out[...] = grad
    return out


def _check_sizes(index: int, teacher: Any, student: Any, fields: Sequence[str]) -> None:
    """Teacher and student of one element count (the reference's ``TeacherStudentMismatch``)."""
    if teacher.size != student.size:
        raise TeacherStudentMismatch(
            f"layer {index}: {fields[0]} has {teacher.size} elements but {fields[1]} has {student.size}",
            layer=index,
            field=fields[1],
            teacher=teacher.size,
            student=student.size,
        )


def _check_response(
    index: int, loss: DistilLoss, teacher: Any, student: Any, labels: Any, fields: tuple[str, str, str]
) -> None:
    """Response distillation's inputs, in the reference's order: the student's
    logits, the teacher's, then the labels (one per row, each a class)."""
    for field, array in ((fields[1], student), (fields[0], teacher)):
        if array.size == 0:
            raise EmptyInput(f"layer {index}: {field} is empty", layer=index, field=field)
    _check_sizes(index, teacher, student, fields)
    if teacher.shape != student.shape or student.ndim not in (1, 2):
        raise ShapeMismatch(
            f"layer {index}: {loss!r} takes logits [batch, classes] (or one sample's [classes]) of one shape; "
            f"got {list(teacher.shape)} and {list(student.shape)}",
            layer=index,
            field=f"{fields[1]}.shape",
        )
    _check_elements(index, loss, (teacher, student), fields[:2])
    if labels is None:
        why = f"layer {index}: {loss!r} needs class labels; set {fields[2]}"
        raise InvalidArgument(why, layer=index, field=fields[2])
    rows, classes = (int(student.shape[0]) if student.ndim == 2 else 1), int(student.shape[-1])
    if labels.size != rows:
        raise DimensionMismatch(
            f"layer {index}: {labels.size} labels for {rows} sample(s) of logits",
            layer=index,
            field=fields[2],
            expected=rows,
            got=labels.size,
        )
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        at, label = int(bad[0]), int(labels[bad[0]])
        where = f"{fields[2]}[{at}]"
        if label < 0:
            raise InvalidArgument(f"layer {index}: {where} is {label}; expected a class >= 0", layer=index, field=where)
        raise DimensionMismatch(
            f"layer {index}: {where} is {label}, but the logits have {classes} classes",
            layer=index,
            field=where,
            expected=classes,
            got=label + 1,
        )


def _check_elements(index: int, loss: DistilLoss, arrays: Sequence[Any], fields: Sequence[str]) -> None:
    """A loss on whole float64 copies: each tensor within its limit
    (:data:`BATCH_MAX_ELEMENTS`, :data:`LOGITS_MAX_ELEMENTS`)."""
    limit = LOGITS_MAX_ELEMENTS if loss.kind in _LOGIT_LOSSES else BATCH_MAX_ELEMENTS
    for field, array in zip(fields, arrays, strict=True):
        if array.size > limit:
            raise LimitExceeded(
                f"layer {index}: {field} has {array.size} elements; {loss.kind.name.lower()} takes at most {limit} "
                "(split the batch)",
                layer=index,
                field=field,
                limit=limit,
                got=array.size,
            )


def _check_batch(index: int, loss: DistilLoss, teacher: Any, student: Any, fields: tuple[str, str]) -> None:
    """A batch loss's inputs: within the size limits, and shapes it can compare (any widths)."""
    if student.size == 0:
        raise EmptyInput(f"layer {index}: {fields[1]} is empty", layer=index, field=fields[1])
    name = loss.kind.name.lower()
    _check_elements(index, loss, (teacher, student), fields)
    batch, limit = int(teacher.shape[0]) if teacher.ndim else 1, relational.MAX_BATCH[name]
    if batch > limit:
        raise LimitExceeded(
            f"layer {index}: a batch of {batch} for {name}, which takes at most {limit} samples",
            layer=index,
            field=f"{fields[0]}.shape",
            limit=limit,
            got=batch,
        )
    problem = relational.LOSSES[name].check(tuple(teacher.shape), tuple(student.shape), loss.params)
    if problem is not None:
        raise ShapeMismatch(f"layer {index}: {loss!r}: {problem}", layer=index, field=f"{fields[1]}.shape")
    if name in relational.MAX_WORK:
        work, most = relational.MAX_WORK[name]
        needed = work(tuple(teacher.shape), tuple(student.shape))
        if needed > most:
            raise LimitExceeded(
                f"layer {index}: {name} of {list(teacher.shape)} and {list(student.shape)} is {needed:.3g} "
                f"multiply-adds; it takes at most {most:.3g} (fewer samples or channels per call)",
                layer=index,
                field=f"{fields[0]}.shape",
                limit=most,
                got=needed,
            )


# ---------------------------------------------------------------- one layer


def evaluate(loss: DistilLoss, teacher: Any, student: Any, gradient_scale: float | None = None) -> tuple[float, Any]:
    """A layer's unweighted loss and, when ``gradient_scale`` is given,
    ``gradient_scale * d loss / d student`` in the student's shape and dtype.

    The inputs are non-empty arrays of equal size (of equal shape for
    ``PER_ROW``; for a batch loss, shapes its ``check`` accepts). The value
    may be non-finite when the inputs are, and then no gradient is returned;
    :func:`layer_loss` and :func:`total_loss` turn that into an error.

    Raises:
        LossOverflow: the value is finite but the gradient does not fit the
            student's dtype (an element would round to infinity).
    """
    try:
        return _evaluate(loss, teacher, student, gradient_scale)
    except _GradientOverflow as exc:
        raise LossOverflow(f"the gradient of the {loss!r} loss {exc.describe()}", field="student") from None


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


def _check_pair(
    index: int, loss: DistilLoss, teacher: Any, student: Any, fields: tuple[str, str, str], labels: Any = None
) -> None:
    """The reference's checks in its order (empty teacher, lengths), then shapes for PER_ROW.

    ``fields``: the teacher's, the student's and the labels' request fields.
    """
    if loss.kind is LossKind.RESPONSE:
        _check_response(index, loss, teacher, student, labels, fields)
        return
    if teacher.size == 0:
        raise EmptyInput(f"layer {index}: {fields[0]} is empty", layer=index, field=fields[0])
    if loss.batched:
        _check_batch(index, loss, teacher, student, fields[:2])
        return
    _check_sizes(index, teacher, student, fields)
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


def _check_finite(index: int, teacher: Any, student: Any, fields: Sequence[str]) -> None:
    """NaN and infinity in the inputs are errors, naming the first one."""
    for field, array in zip(fields[:2], (teacher, student), strict=True):
        at = _first_non_finite(array)
        if at is not None:
            raise NonFiniteInput(
                f"layer {index}: {field} holds {float(array.reshape(-1)[at])} at flat index {at}; "
                "inputs must be finite",
                layer=index,
                field=f"{field}.data",
                index=at,
            )


def _compute(
    index: int,
    layer: Layer,
    teacher: Any,
    student: Any,
    fields: tuple[str, str, str],
    gradient: bool,
    out: Any = None,
    labels: Any = None,
) -> LayerResult:
    scale = layer.weight if gradient else None
    if layer.loss.kind not in ELEMENTWISE:  # whole tensors: a softmax can hide an infinity in a finite value
        _check_finite(index, teacher, student, fields)
    try:
        if layer.loss.kind is LossKind.RESPONSE:
            value, grad = _evaluate_response(layer.loss, teacher, student, labels, scale, out)
        else:
            value, grad = _evaluate(layer.loss, teacher, student, scale, out)
    except relational.Undefined as exc:
        field = fields[exc.role == "student"]
        raise InvalidArgument(f"layer {index}: {exc}", layer=index, field=f"{field}.data") from None
    except _GradientOverflow as exc:
        raise LossOverflow(
            f"layer {index}: the gradient for {fields[1]} of the {layer.loss!r} loss times weight {layer.weight} "
            f"{exc.describe()}",
            layer=index,
            field=fields[1],
        ) from None
    weighted = layer.weight * value
    if not math.isfinite(weighted):
        _check_finite(index, teacher, student, fields)
        terms = _Terms.of(layer.loss)
        why = ""
        if terms.kl and not math.isfinite(terms.tau * terms.tau):
            why = f" (temperature {terms.tau:g} squared overflows float64)"
        raise LossOverflow(
            f"layer {index}: the {layer.loss!r} loss of finite inputs times weight {layer.weight} "
            f"is {weighted}, beyond float64{why}",
            layer=index,
        )
    return LayerResult(LayerLoss(index, layer.name, value, weighted), grad)


def layer_loss(
    layers: Sequence[Layer],
    index: int,
    teacher: Any,
    student: Any,
    *,
    gradient: bool = False,
    out: Any = None,
    labels: Any = None,
) -> LayerResult:
    """The reference's ``compute_layer_loss``: layer ``index``'s weighted loss.

    With ``gradient``, also ``weight * d loss / d student``, written into
    ``out`` when given (an array of the student's shape and dtype: shared
    memory the client reads it from), else into a new array. ``labels``: the
    layer's class labels (an int64 array on the host), for a response loss.

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
    fields = ("teacher", "student", "labels")
    _check_pair(index, layers[index].loss, teacher, student, fields, labels)
    return _compute(index, layers[index], teacher, student, fields, gradient, out, labels)


def total_loss(
    layers: Sequence[Layer],
    teachers: Sequence[Any],
    students: Sequence[Any],
    *,
    gradient: bool = False,
    out: Sequence[Any] | None = None,
    labels: Mapping[int, Any] | None = None,
) -> tuple[float, list[LayerResult]]:
    """The reference's ``compute_total_loss``: the sum of every layer's weighted loss.

    Counts are checked first (teachers, then students); then every layer's
    inputs, so the first failing layer's error wins; only then is anything
    computed. With ``gradient``, each result holds the gradient of the total
    with respect to its student tensor, written into ``out[i]`` where that
    is an array (as in :func:`layer_loss`). ``labels``: layer index -> class
    labels, for the layers with a response loss.

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
    fields = [(f"teachers[{i}]", f"students[{i}]", f"labels[{i}]") for i in range(len(layers))]
    given = labels or {}
    for i, (layer, teacher, student) in enumerate(zip(layers, teachers, students, strict=True)):
        _check_pair(i, layer.loss, teacher, student, fields[i], given.get(i))
    outs = out if out is not None else [None] * len(layers)
    results = [
        _compute(i, layer, teacher, student, names, gradient, into, given.get(i))
        for i, (layer, teacher, student, names, into) in enumerate(
            zip(layers, teachers, students, fields, outs, strict=True)
        )
    ]
    try:
        total = math.fsum(result.loss.weighted_loss for result in results)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        raise LossOverflow(f"the total of {len(results)} finite layer losses overflows float64")
    return total, results
