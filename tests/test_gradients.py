"""Gradients of every loss against finite differences and PyTorch autograd."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from distill_client import DistilLoss, ShapeMismatch
from distill_core.losses import Reduction
from distill_server import backend, engine
from distill_server.engine import Layer
from tests.reference import reference
from tests.torch_reference import torch_loss

torch = pytest.importorskip("torch")

FLAT = [DistilLoss.mse(), DistilLoss.cosine(), DistilLoss.kl_divergence(2.0), DistilLoss.combined(0.3, 0.7, 4.0)]
ROWS = [
    DistilLoss.mse(reduction=Reduction.PER_ROW),
    DistilLoss.cosine(reduction=Reduction.PER_ROW),
    DistilLoss.kl_divergence(0.5, reduction=Reduction.PER_ROW),
    DistilLoss.combined(0.6, 0.4, 3.0, reduction=Reduction.PER_ROW),
]
SHAPES = [(7,), (3, 5), (2, 3, 4)]


def pair(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.normal(size=shape)
    return t, t + 0.7 * rng.normal(size=shape)


def autograd(loss: DistilLoss, t: np.ndarray, s: np.ndarray, weight: float) -> np.ndarray:
    student = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    (weight * torch_loss(loss, torch.tensor(t, dtype=torch.float64), student)).backward()
    return student.grad.numpy()  # type: ignore[no-any-return]


def finite_differences(loss: DistilLoss, t: np.ndarray, s: np.ndarray, weight: float) -> np.ndarray:
    grad = np.empty_like(s)
    for i in np.ndindex(s.shape):
        h = 1e-6 * max(1.0, abs(s[i]))
        up, down = s.copy(), s.copy()
        up[i] += h
        down[i] -= h
        grad[i] = weight * (engine.loss_value(loss, t, up) - engine.loss_value(loss, t, down)) / (2 * h)
    return grad


@pytest.mark.parametrize("loss", FLAT + ROWS, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradient_matches_finite_differences_and_autograd(xp: ModuleType, loss: DistilLoss, shape: Any) -> None:
    t, s = pair(shape, seed=len(shape))
    weight = -1.75
    value, grad = engine.evaluate(loss, xp.asarray(t), xp.asarray(s), weight)
    grad = grad.get() if hasattr(grad, "get") else grad
    assert grad.shape == s.shape and grad.dtype == np.float64
    # The value agrees with the float64 reference and with PyTorch.
    assert value == pytest.approx(float(torch_loss(loss, torch.tensor(t), torch.tensor(s))), rel=1e-12)
    if loss.reduction is Reduction.FLATTEN:
        assert value == pytest.approx(reference(loss, t, s), rel=1e-12)
    # Autograd of the same formula: agreement to float64 rounding.
    np.testing.assert_allclose(grad, autograd(loss, t, s, weight), rtol=1e-10, atol=1e-13)
    # Central differences (step 1e-6): truncation and cancellation leave about 1e-8.
    np.testing.assert_allclose(grad, finite_differences(loss, t, s, weight), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("loss", FLAT, ids=repr)
def test_gradients_across_blocks(loss: DistilLoss) -> None:
    t, s = pair((3 * backend.CPU_BLOCK + 11,), seed=9)
    _, grad = engine.evaluate(loss, t.astype(np.float32), s.astype(np.float32), 2.0)
    assert grad.dtype == np.float32
    expected = autograd(loss, t.astype(np.float32).astype(np.float64), s.astype(np.float32).astype(np.float64), 2.0)
    np.testing.assert_allclose(grad, expected, rtol=2e-6, atol=1e-12 * float(np.abs(expected).max()) + 1e-30)


@pytest.mark.parametrize("loss", FLAT + ROWS, ids=repr)
@pytest.mark.parametrize(
    ("dtype", "rtol"),
    # Computed in float64, then rounded once to the student's dtype: half an ulp.
    [(np.float16, 2**-11), (ml_dtypes.bfloat16, 2**-8), (np.float32, 2**-24)],
    ids=["float16", "bfloat16", "float32"],
)
def test_gradient_comes_back_in_the_students_dtype(loss: DistilLoss, dtype: Any, rtol: float) -> None:
    t, s = pair((4, 6), seed=3)
    t, s = t.astype(dtype), s.astype(dtype)
    _, grad = engine.evaluate(loss, t, s, 1.0)
    assert grad.dtype == np.dtype(dtype)
    exact = autograd(loss, t.astype(np.float64), s.astype(np.float64), 1.0)
    tiny = float(np.finfo(np.float16).tiny) if dtype is np.float16 else 0.0
    np.testing.assert_allclose(grad.astype(np.float64), exact, rtol=rtol, atol=tiny + 1e-7 * float(np.abs(exact).max()))


def test_per_row_needs_equal_shapes() -> None:
    layers = [Layer(1.0, DistilLoss.cosine(reduction=Reduction.PER_ROW))]
    with pytest.raises(ShapeMismatch) as info:
        engine.total_loss(layers, [np.ones((2, 6))], [np.ones((3, 4))])
    assert "[2, 6]" in info.value.message and "[3, 4]" in info.value.message
    assert info.value.field == "students[0].shape"
    # FLATTEN only needs equal lengths, as the reference.
    engine.total_loss([Layer(1.0, DistilLoss.cosine())], [np.ones((2, 6))], [np.ones((3, 4))])


def test_per_row_is_the_mean_of_rows() -> None:
    t, s = pair((5, 8), seed=4)
    for loss in ROWS[1:3]:
        flat = DistilLoss(loss.kind, loss.temperature, loss.kl_weight, loss.mse_weight)
        rows = [engine.loss_value(flat, t[r], s[r]) for r in range(5)]
        assert engine.loss_value(loss, t, s) == pytest.approx(np.mean(rows), rel=1e-13)
    assert engine.loss_value(ROWS[0], t, s) == engine.loss_value(FLAT[0], t, s)


def test_cosine_gradient_at_the_floor_and_the_clamp() -> None:
    # Both norms tiny: the denominator is floored at 1e-12. The value is the
    # reference's, 1 - dot(t, s) / 1e-12; the gradient is 0 there, not the
    # -t / 1e-12 of the floor, whose size is set by the guard (docs/gradients.md).
    t = np.array([1e-7, 0.0, 0.0])
    s = np.array([1e-7, 1e-7, 0.0])
    value, grad = engine.evaluate(DistilLoss.cosine(), t, s, 1.0)
    assert value == reference(DistilLoss.cosine(), t, s) == 1 - 1e-14 / 1e-12
    np.testing.assert_array_equal(grad, 0.0)
    # Identical vectors: c = 1 exactly, the gradient is zero.
    _, grad = engine.evaluate(DistilLoss.cosine(), t + 1, t + 1, 1.0)
    np.testing.assert_allclose(grad, 0.0, atol=1e-15)


def test_total_loss_gradients_are_per_layer_and_weighted() -> None:
    t0, s0 = pair((3, 4), seed=5)
    t1, s1 = pair((6,), seed=6)
    layers = [Layer(0.25, FLAT[2]), Layer(-2.0, ROWS[1])]
    _total, results = engine.total_loss(layers, [t0, t1], [s0, s1], gradient=True)
    np.testing.assert_allclose(results[0].gradient, autograd(FLAT[2], t0, s0, 0.25), rtol=1e-10)
    np.testing.assert_allclose(results[1].gradient, autograd(ROWS[1], t1, s1, -2.0), rtol=1e-10)
    _, plain = engine.total_loss(layers, [t0, t1], [s0, s1])
    assert all(r.gradient is None for r in plain)
