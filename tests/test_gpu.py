"""The CUDA device end to end (skipped without a CUDA device and CuPy)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from distill_client import DistillClient, DistilLoss, LossOverflow, Reduction
from distill_server import engine
from distill_server.backend import STAGING_CHUNK, select
from distill_server.engine import Layer
from tests.devices import CUDA
from tests.reference import ALL_LOSSES, LOSSES_BOTH_REDUCTIONS
from tests.servers import InProcessServer, ServerProcess

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device and CuPy")]


def test_auto_picks_the_gpu() -> None:
    backend = select("auto")
    assert backend.device == "cuda:0" and "cupy" in backend.description


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    # The float64 gradients may differ in their last bits; rounded to the
    # student's dtype that is at most one ulp of it.
    [(np.float32, 2**-23), (np.float16, 2**-10), (ml_dtypes.bfloat16, 2**-7)],
    ids=["float32", "float16", "bfloat16"],
)
def test_gpu_server_agrees_with_the_cpu_server(
    start_server: type[ServerProcess], server: InProcessServer, dtype: object, rtol: float
) -> None:
    gpu = start_server(["--device", "cuda"])
    rng = np.random.default_rng(0)
    t = rng.normal(size=(64, 1000)).astype(dtype)
    s = (t.astype(np.float32) + rng.normal(size=t.shape).astype(np.float32)).astype(dtype)
    layers = [(0.5, loss) for loss in ALL_LOSSES]
    with DistillClient(gpu.target, timeout=60) as on_gpu, DistillClient(server.target, timeout=60) as on_cpu:
        assert on_gpu.server_info().device == "cuda:0"
        a = on_gpu.compute_total_loss(layers, [t] * 4, [s] * 4, gradients=True)
        b = on_cpu.compute_total_loss(layers, [t] * 4, [s] * 4, gradients=True)
    # Both accumulate in float64; only the summation order differs.
    assert a.total == pytest.approx(b.total, rel=1e-10)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.gradient is not None and y.gradient is not None and x.gradient.dtype == np.dtype(dtype)
        exact = y.gradient.astype(np.float64)
        np.testing.assert_allclose(
            x.gradient.astype(np.float64), exact, rtol=rtol, atol=rtol * float(np.abs(exact).max())
        )


# ---------------------------------------------------------------- the CUDA engine against the NumPy engine

TOLERANCE = {np.dtype(np.float32): 2**-23, np.dtype(np.float16): 2**-10, np.dtype(np.float64): 1e-13}
"""How far the CUDA engine's gradients may be from the NumPy engine's,
relative to each element and to the largest: both compute in float64 from
per-row sums taken in another order, so elements where ``q - p`` or
``alpha t + beta s`` cancel keep about 1e-13 of themselves; rounded to a
narrower student dtype, that is at most one ulp of it."""

SHAPES = {
    "one long row": (3, 100_003),  # flat: many segments of one row, merged by the finish kernel
    "many rows": (70_000, 3),  # more rows than a grid is high: rows taken in strides
    "wide rows": (40, 9_001),  # several segments per row
}


def _gpu_and_cpu(loss: DistilLoss, t: np.ndarray, s: np.ndarray, scale: float | None) -> tuple[Any, Any]:
    import cupy

    on_gpu = engine.evaluate(loss, cupy.asarray(t), cupy.asarray(s), scale)
    on_cpu = engine.evaluate(loss, t, s, scale)
    return on_gpu, on_cpu


def _assert_same_gradient(gpu: Any, cpu: np.ndarray, rtol: float) -> None:
    import cupy

    assert isinstance(gpu, cupy.ndarray) and gpu.dtype == cpu.dtype and gpu.shape == cpu.shape
    exact = cpu.astype(np.float64)
    np.testing.assert_allclose(gpu.get().astype(np.float64), exact, rtol=rtol, atol=rtol * float(np.abs(exact).max()))


@pytest.mark.parametrize("loss", LOSSES_BOTH_REDUCTIONS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cuda_engine_agrees_with_the_numpy_engine(loss: DistilLoss, dtype: Any, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    t = (3 * rng.normal(size=shape)).astype(dtype)
    s = (t.astype(np.float64) + rng.normal(size=shape)).astype(dtype)
    (value, gradient), (expected, exact) = _gpu_and_cpu(loss, t, s, -1.5)
    # Both accumulate in float64; only the order of the sums differs.
    assert value == pytest.approx(expected, rel=1e-10)
    _assert_same_gradient(gradient, exact, TOLERANCE[np.dtype(dtype)])
    assert engine.loss_value(loss, cupy_array(t), cupy_array(s)) == pytest.approx(expected, rel=1e-10)


def cupy_array(x: np.ndarray) -> Any:
    import cupy

    return cupy.asarray(x)


@pytest.mark.parametrize(
    "loss", [DistilLoss.kl_divergence(2.0), DistilLoss.kl_divergence(0.5, reduction=Reduction.PER_ROW)], ids=repr
)
def test_cuda_kl_gradient_of_nearly_equal_inputs_is_accurate(loss: DistilLoss) -> None:
    """Gaps of 1e-7: q - p cancels; both engines take the form accurate relative to the gap."""
    rng = np.random.default_rng(5)
    t = rng.normal(size=(64, 513))
    s = t + 1e-7 * rng.normal(size=t.shape)
    (value, gradient), (expected, exact) = _gpu_and_cpu(loss, t, s, 1.0)
    assert value == pytest.approx(expected, rel=1e-8)
    _assert_same_gradient(gradient, exact, 1e-9)


def test_cuda_cosine_of_huge_float64_rows_is_scaled() -> None:
    """Squared norms overflow float64: both engines scale each row to max 1 first."""
    rng = np.random.default_rng(6)
    t, s = 1e200 * rng.normal(size=(8, 1000)), 1e200 * rng.normal(size=(8, 1000))
    for loss in (DistilLoss.cosine(), DistilLoss.cosine(reduction=Reduction.PER_ROW)):
        (value, gradient), (expected, exact) = _gpu_and_cpu(loss, t, s, 1.0)
        assert math.isfinite(value) and value == pytest.approx(expected, rel=1e-10)
        _assert_same_gradient(gradient, exact, 1e-10)


def test_cuda_gradient_beyond_float16_is_an_error() -> None:
    t = np.zeros(1000, dtype=np.float16)
    s = np.full(1000, 60000, dtype=np.float16)
    layers = [Layer(1e6, DistilLoss.mse())]
    import cupy

    with pytest.raises(LossOverflow, match="beyond float16"):
        engine.total_loss(layers, [cupy.asarray(t)], [cupy.asarray(s)], gradient=True)
    with pytest.raises(LossOverflow, match="beyond float16"):
        engine.total_loss(layers, [t], [s], gradient=True)


def test_cuda_combined_loss_with_zero_weights_is_flat() -> None:
    t, s = np.arange(10.0), np.arange(10.0)[::-1].copy()
    (value, gradient), _ = _gpu_and_cpu(DistilLoss.combined(0.0, 0.0, 2.0), t, s, 1.0)
    assert value == 0.0 and not gradient.any()


@pytest.mark.parametrize("nbytes", [0, 4, STAGING_CHUNK - 4, STAGING_CHUNK, STAGING_CHUNK + 4, 5 * STAGING_CHUNK // 2])
def test_staging_moves_every_byte(nbytes: int) -> None:
    backend = select("cuda")
    host = np.random.default_rng(nbytes).normal(size=nbytes // 4).astype(np.float32)
    with backend.activate():
        device = backend.to_device(host)
        assert device.dtype == np.float32 and device.shape == host.shape
        back = backend.to_host(device * 2)
    np.testing.assert_array_equal(back, host * 2)


def test_staging_widens_bfloat16_exactly() -> None:
    backend = select("cuda")
    host = np.random.default_rng(1).normal(size=1000).astype(ml_dtypes.bfloat16)
    with backend.activate():
        device = backend.to_device(host)
        assert device.dtype == np.float32
        np.testing.assert_array_equal(backend.to_host(device), host.astype(np.float32))


def test_threads_compute_on_their_own_streams() -> None:
    """Calls on many threads at once (each its own stream and staging) get their own answers."""
    backend = select("cuda")
    rng = np.random.default_rng(2)
    pairs = [
        (rng.normal(size=300_000).astype(np.float32), rng.normal(size=300_000).astype(np.float32)) for _ in range(8)
    ]
    expected = [engine.evaluate(DistilLoss.kl_divergence(2.0), t, s, 1.0) for t, s in pairs]

    def call(index: int) -> tuple[float, np.ndarray]:
        t, s = pairs[index % len(pairs)]
        with backend.activate():
            value, gradient = engine.evaluate(
                DistilLoss.kl_divergence(2.0), backend.to_device(t), backend.to_device(s), 1.0
            )
            return value, backend.to_host(gradient)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(64)))
    for index, (value, gradient) in enumerate(results):
        want, exact = expected[index % len(pairs)]
        assert value == pytest.approx(want, rel=1e-10)
        np.testing.assert_allclose(gradient, exact, rtol=2**-23, atol=2**-23 * float(np.abs(exact).max()))
