"""The CUDA device end to end (skipped without a CUDA device and CuPy)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from distill_client import DistillClient
from distill_server.backend import select
from tests.devices import CUDA
from tests.reference import ALL_LOSSES
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
