"""Edge cases of the engine: tiny gaps, zero norms, overflow, extreme temperatures,
memory bounds, interruption; and of weight normalisation."""

from __future__ import annotations

import math
import threading
import tracemalloc
from decimal import Decimal, localcontext
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from distill_client import DistilLoss, RemoteFeatureDistiller
from distill_core.errors import LossOverflow
from distill_core.losses import LossKind, Reduction
from distill_server import backend, engine, interruption, parallel, relational, scratch
from distill_server.engine import Layer
from tests import seed
from tests.reference import reference

ROW = Reduction.PER_ROW
EVERY_LOSS = [
    DistilLoss.mse(),
    DistilLoss.cosine(),
    DistilLoss.kl_divergence(2.0),
    DistilLoss.combined(0.3, 0.7, 4.0),
    DistilLoss.cosine(reduction=ROW),
    DistilLoss.kl_divergence(0.5, reduction=ROW),
    DistilLoss.combined(0.6, 0.4, 3.0, reduction=ROW),
]


# ---------------------------------------------------------------- tiny gaps


@pytest.mark.parametrize("gap", [1e-8, 1e-13])
@pytest.mark.parametrize("n", [7, 3 * backend.CPU_BLOCK + 5], ids=["one-block", "three-blocks"])
def test_mse_gradient_is_exact_for_tiny_gaps(gap: float, n: int) -> None:
    rng = np.random.default_rng(11)
    t = rng.normal(size=n)
    s = t + gap * rng.normal(size=n)
    # s - t of float64 inputs is computed exactly (Sterbenz), so this is the gradient to rounding.
    exact = -1.5 * 2 * (s - t) / n
    _, grad = engine.evaluate(DistilLoss.mse(), t, s, -1.5)
    np.testing.assert_allclose(grad, exact, rtol=1e-12, atol=0)


def _softmax_gap(t: list[float], s: list[float], tau: float) -> list[Decimal]:
    """``q - p`` for one row in 60-digit decimal arithmetic: an independent oracle."""
    with localcontext() as ctx:
        ctx.prec = 60
        scale = Decimal(tau)
        ea = [(Decimal(x) / scale).exp() for x in t]
        eb = [(Decimal(x) / scale).exp() for x in s]
        za, zb = sum(ea), sum(eb)
        return [b / zb - a / za for a, b in zip(ea, eb, strict=True)]


def _exact_gradient(loss: DistilLoss, t: np.ndarray, s: np.ndarray, weight: float) -> np.ndarray:
    """``weight * d loss / ds`` for KL and combined losses, from :func:`_softmax_gap`."""
    rows = loss.reduction is ROW
    t2, s2 = (t.reshape(-1, t.shape[-1]), s.reshape(-1, t.shape[-1])) if rows else (t.reshape(1, -1), s.reshape(1, -1))
    kl_weight = 1.0 if loss.kind is LossKind.KL_DIVERGENCE else loss.kl_weight
    mse_weight = 0.0 if loss.kind is LossKind.KL_DIVERGENCE else loss.mse_weight
    out = np.empty(t2.shape)
    with localcontext() as ctx:
        ctx.prec = 60
        for r in range(t2.shape[0]):
            gaps = _softmax_gap(list(t2[r]), list(s2[r]), loss.temperature)
            for j, gap in enumerate(gaps):
                kl = Decimal(kl_weight) * Decimal(loss.temperature) * gap / t2.shape[0]
                mse = Decimal(mse_weight) * 2 * (Decimal(s2[r, j]) - Decimal(t2[r, j])) / t.size
                out[r, j] = float(Decimal(weight) * (kl + mse))
    return out.reshape(t.shape)


@pytest.mark.parametrize(
    "loss",
    [
        DistilLoss.kl_divergence(2.0),
        DistilLoss.combined(0.3, 0.7, 4.0),
        DistilLoss.kl_divergence(0.5, reduction=ROW),
        DistilLoss.combined(0.6, 0.4, 3.0, reduction=ROW),
    ],
    ids=repr,
)
@pytest.mark.parametrize("gap", [1e-8, 1e-13, "mixed"])
def test_kl_gradient_is_accurate_for_tiny_gaps(loss: DistilLoss, gap: Any) -> None:
    # q - p cancels when student and teacher nearly agree; the engine keeps it
    # accurate relative to the gap. "mixed": rows with tiny and ordinary gaps.
    rng = np.random.default_rng(12)
    t = rng.normal(size=(3, 9)) * 3
    spread = np.array([[1e-9], [0.5], [1e-3]]) if gap == "mixed" else gap
    s = t + spread * rng.normal(size=t.shape)
    _, grad = engine.evaluate(loss, t, s, -1.5)
    np.testing.assert_allclose(grad, _exact_gradient(loss, t, s, -1.5), rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss", EVERY_LOSS, ids=repr)
@pytest.mark.parametrize("gap", [1e-10, 0.3])
def test_column_chunks_agree_with_whole_rows(monkeypatch: pytest.MonkeyPatch, loss: DistilLoss, gap: float) -> None:
    # The same rows, once each in one block and once in column chunks of 64.
    rng = np.random.default_rng(13)
    t = rng.normal(size=(3, 1000)) * 2
    s = t + gap * rng.normal(size=t.shape)
    value, grad = engine.evaluate(loss, t, s, 0.75)
    monkeypatch.setattr(backend, "CPU_BLOCK", 64)
    chunked, chunked_grad = engine.evaluate(loss, t, s, 0.75)
    # Absolute terms where the value cancels (see tests/seed.py).
    atol = {LossKind.COSINE: seed.COSINE_ATOL}.get(loss.kind, seed.KL_ATOL * loss.temperature**2)
    assert chunked == pytest.approx(value, rel=1e-12, abs=atol)
    if loss.reduction is Reduction.FLATTEN:
        assert chunked == pytest.approx(reference(loss, t, s), rel=1e-12, abs=atol)
    # Cosine near c = 1: one rounding of c can cross the clamp at 1, where the
    # gradient (of size sqrt(2 (1 - c)) / |s|, here sqrt(2 eps) / |s|) drops to 0.
    scale = 0.75 / float(np.linalg.norm(s, axis=-1).min()) if loss.kind is LossKind.COSINE else 0.0
    # Elsewhere an element's rounding is relative to the largest (q - p cancels).
    atol = max(math.sqrt(2 * 2.3e-16) * scale, 1e-14 * float(np.abs(grad).max()))
    np.testing.assert_allclose(chunked_grad, grad, rtol=1e-11, atol=atol)


@pytest.mark.parametrize("loss", [loss for loss in EVERY_LOSS if loss.reduction is ROW], ids=repr)
def test_groups_of_rows_agree_with_one_group(monkeypatch: pytest.MonkeyPatch, loss: DistilLoss) -> None:
    # 40 rows in groups of 3 rows (blocks of 64): the value alone takes every
    # group's sums first and does the per-row math once over all rows; with a
    # gradient, group by group. Rows 7 and 30 are huge float64 (cosine scales
    # those groups' rows, and only those), so both ways meet scaled and unscaled groups.
    rng = np.random.default_rng(29)
    t = rng.normal(size=(40, 20)) * 2
    s = t + 0.5 * rng.normal(size=t.shape)
    rows = [reference(loss, t[i : i + 1], s[i : i + 1]) for i in range(len(t))]  # cosine is scale-free
    expected = math.fsum(rows) / len(rows)
    if loss.kind is LossKind.COSINE:
        t[[7, 30]] *= 1e200
        s[[7, 30]] *= 1e200
    whole = engine.loss_value(loss, t, s)
    monkeypatch.setattr(backend, "CPU_BLOCK", 64)
    grouped = engine.loss_value(loss, t, s)
    with_gradient, _ = engine.evaluate(loss, t, s, 1.0)
    assert grouped == pytest.approx(expected, rel=1e-13)
    assert grouped == pytest.approx(whole, rel=1e-13)
    assert with_gradient == pytest.approx(grouped, rel=1e-13)


# ---------------------------------------------------------------- zero norms


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64], ids=str)
def test_zero_student_has_a_zero_cosine_gradient(dtype: Any) -> None:
    # |t| |s| = 0 is below the 1e-12 floor: the value is the reference's 1, the
    # gradient 0 (the floor's own -t / 1e-12 would be 3e12 here: inf in float16).
    t = np.array([3.0, -1.0, 2.0], dtype)
    s = np.zeros(3, dtype)
    value, grad = engine.evaluate(DistilLoss.cosine(), t, s, 1.0)
    assert value == reference(DistilLoss.cosine(), t, s) == 1.0
    assert grad.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(grad.astype(np.float64), 0.0)


def test_zero_student_row_has_a_zero_cosine_gradient() -> None:
    rng = np.random.default_rng(14)
    t, s = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    s[1] = 0.0
    loss = DistilLoss.cosine(reduction=ROW)
    value, grad = engine.evaluate(loss, t, s, 2.0)
    rows = [engine.evaluate(DistilLoss.cosine(), t[r], s[r], 2.0 / 3) for r in range(3)]
    assert value == pytest.approx(np.mean([v for v, _ in rows]), rel=1e-14)
    assert rows[1][0] == 1.0
    np.testing.assert_array_equal(grad[1], 0.0)
    np.testing.assert_allclose(grad[[0, 2]], np.stack([rows[0][1], rows[2][1]]), rtol=1e-13)


def test_huge_teacher_and_zero_student() -> None:
    # Squared norms overflow, so the rows are rescaled; the floor still applies.
    t = np.array([1e300, -1e300, 1e299])
    for loss in (DistilLoss.cosine(), DistilLoss.cosine(reduction=ROW)):
        value, grad = engine.evaluate(loss, t, np.zeros(3), 1.0)
        assert value == 1.0
        np.testing.assert_array_equal(grad, 0.0)


# ---------------------------------------------------------------- overflow into the student's dtype


@pytest.mark.parametrize(
    ("dtype", "big"), [(np.float16, 60000.0), (ml_dtypes.bfloat16, 3e38), (np.float32, 3e38)], ids=str
)
def test_gradient_overflow_is_an_error(dtype: Any, big: float) -> None:
    # MSE of [-big, 0] and [big, 0]: the gradient 2 * 2 big / 2 = 2 big is beyond the dtype.
    t, s = np.array([-big, 0.0], dtype), np.array([big, 0.0], dtype)
    layers = [Layer(1.0, DistilLoss.mse()), Layer(1.0, DistilLoss.mse())]
    ok = np.zeros(2, dtype)
    with pytest.raises(LossOverflow) as info:
        engine.total_loss(layers, [ok, t], [ok, s], gradient=True)
    error = info.value
    assert (error.layer, error.field, error.reason) == (1, "students[1]", "LOSS_OVERFLOW")
    name = np.dtype(dtype).name
    assert name in error.message and f"{2 * float(np.asarray(big, dtype)):.6g}" in error.message
    assert "layer 1" in error.message
    with pytest.raises(LossOverflow) as info:
        engine.layer_loss(layers, 0, t, s, gradient=True)
    assert (info.value.layer, info.value.field) == (0, "student")
    with pytest.raises(LossOverflow) as info:
        engine.evaluate(DistilLoss.mse(), t, s, 1.0)
    assert info.value.field == "student" and name in info.value.message
    # Without a gradient there is nothing to overflow: the float64 loss is finite.
    assert math.isfinite(engine.layer_loss(layers, 0, t, s).loss.loss)


def test_float16_overflow_threshold() -> None:
    # The largest float16 is 65504; values below 65520 round to it, 65520 rounds to inf.
    t, s = np.zeros(1, np.float16), np.ones(1, np.float16)  # d loss / ds = 2 (s - t) = 2
    _, grad = engine.evaluate(DistilLoss.mse(), t, s, 65519.0 / 2)
    assert float(grad[0]) == 65504.0
    with pytest.raises(LossOverflow):
        engine.evaluate(DistilLoss.mse(), t, s, 65520.0 / 2)


def test_float64_gradient_overflow_is_an_error() -> None:
    # A finite weighted loss whose float64 gradient overflows (weight * tau).
    t, s = np.array([0.0, 1.0]), np.array([1.0, 0.0])
    with pytest.raises(LossOverflow) as info:
        engine.layer_loss([Layer(1e300, DistilLoss.kl_divergence(1e10))], 0, t, s, gradient=True)
    assert "float64" in info.value.message


# ---------------------------------------------------------------- temperatures


def _kl_losses(tau: float) -> list[DistilLoss]:
    return [
        DistilLoss.kl_divergence(tau),
        DistilLoss.combined(0.5, 0.5, tau),
        DistilLoss.kl_divergence(tau, reduction=ROW),
        DistilLoss.combined(0.5, 0.5, tau, reduction=ROW),
    ]


@pytest.mark.parametrize("gradient", [False, True])
@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=str)
def test_extreme_temperatures_give_a_value_or_loss_overflow(gradient: bool, index: int, dtype: Any) -> None:
    rng = np.random.default_rng(15)
    t, s = rng.normal(size=(3, 5)).astype(dtype), rng.normal(size=(3, 5)).astype(dtype)
    # 1e-300 is floored at MIN_TEMPERATURE: exactly the loss there.
    tiny = engine.layer_loss([Layer(1.0, _kl_losses(1e-300)[index])], 0, t, s, gradient=gradient)
    floor = engine.layer_loss([Layer(1.0, _kl_losses(engine.MIN_TEMPERATURE)[index])], 0, t, s, gradient=gradient)
    assert tiny.loss == floor.loss and math.isfinite(tiny.loss.loss)
    if gradient:
        np.testing.assert_array_equal(tiny.gradient, floor.gradient)
    # 1e200: tau^2 overflows float64, so the loss is not representable.
    with pytest.raises(LossOverflow) as info:
        engine.layer_loss([Layer(1.0, _kl_losses(1e200)[index])], 0, t, s, gradient=gradient)
    assert "temperature 1e+200 squared overflows" in info.value.message
    with pytest.raises(LossOverflow):
        engine.total_loss([Layer(1.0, _kl_losses(1e200)[index])], [t], [s], gradient=gradient)


def test_huge_temperature_without_kl_is_finite() -> None:
    # kl_weight 0: the KL term is absent, not 0 * inf.
    t, s = np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.0, 2.0])
    result = engine.layer_loss([Layer(1.0, DistilLoss.combined(0.0, 1.0, 1e200))], 0, t, s, gradient=True)
    assert result.loss.loss == reference(DistilLoss.mse(), t, s)
    np.testing.assert_allclose(result.gradient, 2 * (s - t) / 3, rtol=1e-15)


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "loss", [DistilLoss.kl_divergence(2.0, reduction=ROW), DistilLoss.cosine(reduction=ROW)], ids=repr
)
def test_wide_rows_take_a_few_blocks_of_memory(monkeypatch: pytest.MonkeyPatch, loss: DistilLoss, threads: int) -> None:
    # Two rows of 4M float16 (16 MB each input): rows far wider than a block.
    # Bound: the float16 gradient itself (student.nbytes) plus a few float64
    # blocks per thread computing (five scratch buffers of CPU_BLOCK float64,
    # 5 MiB, two more for rounding a block into float16, and small per-row
    # vectors): student.nbytes + 8 MiB a thread, under the 32 MB of inputs
    # with two. Whole rows in float64 and full-size temporaries took 13x the inputs.
    monkeypatch.setattr(parallel, "cores", parallel.Cores(threads))
    monkeypatch.setattr(scratch, "_free", [])  # the scratch buffers are allocated, and counted, here
    rng = np.random.default_rng(16)
    t = rng.normal(size=(2, 4_000_000)).astype(np.float16)
    s = (t + rng.normal(size=t.shape).astype(np.float16)).astype(np.float16)
    few_blocks = threads * 7 * 8 * backend.CPU_BLOCK + (1 << 20)
    tracemalloc.start()
    try:
        engine.evaluate(loss, t, s)
        _, value_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        value, grad = engine.evaluate(loss, t, s, 1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert math.isfinite(value) and grad.dtype == np.float16
    assert peak < s.nbytes + few_blocks, peak
    assert peak < t.nbytes + s.nbytes
    assert value_peak < few_blocks, value_peak


# ---------------------------------------------------------------- interruption


class Stop(Exception):
    """What a test's check raises."""


class Counter:
    """A check that counts its calls (from any thread) and raises :class:`Stop`
    from call ``stop_at`` on, as a server's check does once work is abandoned."""

    def __init__(self, stop_at: int = 0) -> None:
        self.calls, self.stop_at = 0, stop_at
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.calls += 1
            stop = self.stop_at and self.calls >= self.stop_at
        if stop:
            raise Stop


@pytest.mark.parametrize("threads", [1, 2])
def test_a_check_stops_a_large_computation(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    monkeypatch.setattr(parallel, "cores", parallel.Cores(threads))
    n = 64 * backend.CPU_BLOCK
    t, s = np.linspace(-1, 1, n, dtype=np.float32), np.linspace(1, -1, n, dtype=np.float32)
    layers = [Layer(1.0, DistilLoss.combined(0.5, 0.5, 2.0))]
    check = Counter(stop_at=5)
    with interruption.interruptible(check), pytest.raises(Stop):
        engine.total_loss(layers, [t], [s], gradient=True)
    # Stopped at once, not after the remaining 123 blocks: each thread at its next block.
    assert 5 <= check.calls <= 4 + threads


def test_a_check_stops_a_batch_loss_between_its_blocks() -> None:
    rng = np.random.default_rng(3)
    t, s = rng.normal(size=(256, 64)), rng.normal(size=(256, 16))  # RKD at its batch limit: angles in blocks
    layers = [Layer(1.0, DistilLoss.rkd())]
    before, between = Counter(stop_at=1), Counter(stop_at=3)
    with interruption.interruptible(before), pytest.raises(Stop):
        engine.total_loss(layers, [t], [s], gradient=True)
    with interruption.interruptible(between), pytest.raises(Stop):
        engine.total_loss(layers, [t], [s], gradient=True)
    assert (before.calls, between.calls) == (1, 3)  # before any work, then between the blocks of anchors
    counted = Counter()
    with interruption.interruptible(counted):
        engine.total_loss(layers, [t], [s], gradient=True)
    assert counted.calls > 3


@pytest.mark.parametrize(
    "loss",
    [
        DistilLoss.similarity_preserving(),
        DistilLoss.linear_cka(),
        DistilLoss.pkt(),
        DistilLoss.correlation_congruence(),
    ],
    ids=lambda loss: loss.kind.value,
)
def test_a_check_stops_a_gram_loss_between_the_blocks_of_its_products(
    monkeypatch: pytest.MonkeyPatch, loss: DistilLoss
) -> None:
    monkeypatch.setattr(relational, "MIN_SLICE", 4)
    monkeypatch.setattr(relational, "PRODUCT_WORK", 1)
    rng = np.random.default_rng(4)
    t, s = rng.normal(size=(16, 8)), rng.normal(size=(16, 5))
    layers = [Layer(1.0, loss)]
    counted = Counter()
    with interruption.interruptible(counted):
        engine.total_loss(layers, [t], [s], gradient=True)
    # Before any work, then before each block of 4 rows: two Gram matrices and the gradient's product.
    assert counted.calls >= 1 + 3 * 4
    stopped = Counter(stop_at=5)
    with interruption.interruptible(stopped), pytest.raises(Stop):
        engine.total_loss(layers, [t], [s], gradient=True)
    assert stopped.calls == 5


BLOCK = backend.CPU_BLOCK


@pytest.mark.parametrize(
    ("loss", "shape", "blocks"),
    [
        (DistilLoss.mse(), (10 * BLOCK + 3,), 11),
        (DistilLoss.kl_divergence(2.0), (4, 3 * BLOCK), 12),
        (DistilLoss.cosine(reduction=ROW), (2, 6 * BLOCK + 1), 8),  # column chunks (the value's: two blocks)
        (DistilLoss.kl_divergence(2.0, reduction=ROW), (2, 3 * BLOCK + 1), 8),
        (DistilLoss.combined(0.5, 0.5, 2.0, reduction=ROW), (4 * BLOCK // 100, 100), 4),  # groups of whole rows
    ],
    ids=["flat-mse", "flat-kl", "row-cosine-chunks", "row-kl-chunks", "row-combined-groups"],
)
def test_the_check_runs_once_per_block_in_every_pass(loss: DistilLoss, shape: Any, blocks: int) -> None:
    rng = np.random.default_rng(17)
    t = rng.normal(size=shape).astype(np.float32)
    s = rng.normal(size=shape).astype(np.float32)
    value_pass, both_passes = Counter(), Counter()
    with interruption.interruptible(value_pass):
        engine.evaluate(loss, t, s)
    with interruption.interruptible(both_passes):
        engine.evaluate(loss, t, s, 1.0)
    assert value_pass.calls >= blocks
    assert both_passes.calls >= 2 * blocks


def test_the_check_runs_in_the_rescaled_cosine_passes() -> None:
    # Huge float64: the sums, the row maxima and the rescaled sums, then the gradient.
    n = 3 * BLOCK
    t = np.full(n, 1e200)
    s = np.linspace(1e199, 2e199, n)
    check = Counter()
    with interruption.interruptible(check):
        value, _ = engine.evaluate(DistilLoss.cosine(), t, s, 1.0)
    assert value == pytest.approx(reference(DistilLoss.cosine(), t / 1e200, s / 1e199), abs=1e-15)
    assert check.calls >= 5 * 3


def test_without_interruptible_there_is_no_check() -> None:
    t = np.ones(3 * BLOCK, np.float32)
    check = Counter()
    with interruption.interruptible(check):
        engine.loss_value(DistilLoss.mse(), t, t)
    calls = check.calls
    engine.loss_value(DistilLoss.mse(), t, t)
    assert check.calls == calls > 0


def test_interruptible_nests_and_is_per_thread() -> None:
    t = np.ones(2 * BLOCK, np.float32)
    outer, inner, other = Counter(), Counter(), Counter()
    with interruption.interruptible(outer):
        with interruption.interruptible(inner):
            engine.loss_value(DistilLoss.mse(), t, t)
        assert (outer.calls, inner.calls) == (0, 2)
        engine.loss_value(DistilLoss.mse(), t, t)
        assert outer.calls == 2
        # Another thread does not see this thread's check.
        worker = threading.Thread(target=engine.loss_value, args=(DistilLoss.mse(), t, t))
        worker.start()
        worker.join()
        assert outer.calls == 2
    with interruption.interruptible(other):
        thread = threading.Thread(target=lambda: engine.loss_value(DistilLoss.mse(), t, t))
        thread.start()
        thread.join()
    assert other.calls == 0


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ([1e308, -1e308], [0.5, -0.5]),
        ([1e308, 1e308, 1e308, 1e308], [0.25, 0.25, 0.25, 0.25]),
        ([1.7976931348623157e308, 1.7976931348623157e308], [0.5, 0.5]),
        ([2.0, 3.0, 5.0], [0.2, 0.3, 0.5]),
        # The reference's floor: sum(|w|) < 1e-12 divides by 1e-12.
        ([1e-14, -3e-14], [0.01, -0.03]),
        ([0.0, 0.0], [0.0, 0.0]),
        ([], []),
    ],
)
def test_normalise_weights_near_the_float64_limits(weights: list[float], expected: list[float]) -> None:
    with RemoteFeatureDistiller.with_weights(weights, DistilLoss.mse(), target="127.0.0.1:1") as distiller:
        distiller.normalise_weights()
        assert [w for w, _ in distiller.layers] == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("reduction", [Reduction.FLATTEN, Reduction.PER_ROW])
def test_a_loss_with_no_terms_has_a_zero_gradient(reduction: Reduction) -> None:
    t = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    loss = DistilLoss.combined(0.0, 0.0, 2.0, reduction=reduction)
    total, results = engine.total_loss([engine.Layer(1.5, loss)], [t], [t[::-1].copy()], gradient=True)
    assert total == 0.0
    assert results[0].gradient.shape == t.shape and not results[0].gradient.any()
