"""The loss engine against the reference's vectors, on every array module."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from distill_client import DistilLoss
from distill_core.errors import (
    DimensionMismatch,
    DistillError,
    LayerIndexOutOfRange,
    LossOverflow,
    NonFiniteInput,
)
from distill_server import backend, engine
from distill_server.engine import Layer
from tests import seed
from tests.reference import ALL_LOSSES, reference


def on(xp: ModuleType, values: Any) -> Any:
    return xp.asarray(values)


def assert_close(value: float, case: dict[str, Any], spec: dict[str, Any], weight: float = 1.0) -> None:
    result = case["result"]
    reference = result["ref64"]
    error = abs(value - reference)
    assert error <= seed.tolerance(reference, spec, weight), (case["id"], value, reference)
    # At least as accurate as the reference implementation itself.
    seed_value = seed.number(result["seed"]["value"]) if "seed" in result else math.nan
    if math.isfinite(seed_value):
        assert error <= abs(seed_value - reference) + seed.tolerance(reference, spec, weight)


LOSS_CASES = [
    c for c in seed.cases("DistilLoss.compute") if c["result"]["type"] == "value" and c["result"]["ref64"] is not None
]


@pytest.mark.parametrize("case", LOSS_CASES, ids=seed.case_id)
def test_loss_matches_float64_reference(xp: ModuleType, case: dict[str, Any]) -> None:
    t, s = (on(xp, seed.vector(case["args"][k])) for k in ("teacher", "student"))
    value = engine.loss_value(seed.loss(case["loss"]), t, s)
    assert_close(value, case, case["loss"])


ERROR_CASES = [c for c in seed.cases("DistilLoss.compute") if c["result"]["type"] == "error"]


@pytest.mark.parametrize("case", ERROR_CASES, ids=seed.case_id)
def test_loss_errors_are_the_seeds(xp: ModuleType, case: dict[str, Any]) -> None:
    t, s = (on(xp, seed.vector(case["args"][k])) for k in ("teacher", "student"))
    layers = [Layer(1.0, seed.loss(case["loss"]))]
    with pytest.raises(DistillError) as info:
        engine.layer_loss(layers, 0, t, s)
    seed.assert_seed_error(info.value, case["result"])


NON_FINITE_CASES = [c for c in seed.cases("DistilLoss.compute") if c["category"] == "loss_nonfinite_input"]


@pytest.mark.parametrize("case", NON_FINITE_CASES, ids=seed.case_id)
def test_non_finite_seed_inputs_are_an_error(xp: ModuleType, case: dict[str, Any]) -> None:
    t, s = (on(xp, seed.vector(case["args"][k])) for k in ("teacher", "student"))
    with pytest.raises(NonFiniteInput):
        engine.layer_loss([Layer(1.0, seed.loss(case["loss"]))], 0, t, s)


def _layers(distiller: dict[str, Any]) -> list[Layer]:
    loss = seed.loss(seed.loss_of(distiller))
    return [Layer(w, loss) for w in seed.weights_of(distiller)]


@pytest.mark.parametrize("case", seed.cases("FeatureDistiller.compute_layer_loss"), ids=seed.case_id)
def test_layer_loss_cases(xp: ModuleType, case: dict[str, Any]) -> None:
    layers = _layers(case["distiller"])
    args = case["args"]
    t, s = on(xp, seed.vector(args["teacher"])), on(xp, seed.vector(args["student"]))
    if case["result"]["type"] == "error":
        with pytest.raises(DistillError) as info:
            engine.layer_loss(layers, args["layer_index"], t, s)
        seed.assert_seed_error(info.value, case["result"])
        return
    result = engine.layer_loss(layers, args["layer_index"], t, s).loss
    weight = layers[args["layer_index"]].weight
    assert result.weighted_loss == weight * result.loss
    assert_close(result.weighted_loss, case, seed.loss_of(case["distiller"]), weight)


@pytest.mark.parametrize("case", seed.cases("FeatureDistiller.compute_total_loss"), ids=seed.case_id)
def test_total_loss_cases(xp: ModuleType, case: dict[str, Any]) -> None:
    layers = _layers(case["distiller"])
    teachers = [on(xp, seed.vector(v)) for v in case["args"]["teacher_feats"]]
    students = [on(xp, seed.vector(v)) for v in case["args"]["student_feats"]]
    if case["result"]["type"] == "error":
        with pytest.raises(DistillError) as info:
            engine.total_loss(layers, teachers, students)
        seed.assert_seed_error(info.value, case["result"])
        return
    total, results = engine.total_loss(layers, teachers, students)
    assert total == math.fsum(r.loss.weighted_loss for r in results)
    assert [r.loss.index for r in results] == list(range(len(layers)))
    weight = sum(abs(layer.weight) for layer in layers)
    assert_close(total, case, seed.loss_of(case["distiller"]), weight)


def test_layer_index_error_is_a_dimension_mismatch_with_the_seeds_fields() -> None:
    layers = [Layer(0.5, DistilLoss.mse())] * 2
    with pytest.raises(LayerIndexOutOfRange) as info:
        engine.layer_loss(layers, 2, np.ones(3, np.float32), np.ones(3, np.float32))
    assert isinstance(info.value, DimensionMismatch)
    assert (info.value.expected, info.value.got, info.value.field) == (2, 3, "layer_index")


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
@pytest.mark.parametrize(
    "n", [1, 7, backend.CPU_BLOCK - 1, backend.CPU_BLOCK, backend.CPU_BLOCK + 1, 3 * backend.CPU_BLOCK + 5]
)
def test_block_boundaries(xp: ModuleType, loss: DistilLoss, n: int) -> None:
    rng = np.random.default_rng(n)
    t = rng.normal(size=n).astype(np.float32) * 3
    s = (t + rng.normal(size=n).astype(np.float32)).astype(np.float32)
    expected = reference(loss, t, s)
    assert engine.loss_value(loss, on(xp, t), on(xp, s)) == pytest.approx(expected, rel=1e-11, abs=1e-14)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [
        # Inputs are exact in their dtype and cast exactly to float64, so the
        # dtype does not change the accuracy: the reference sees the same values.
        (np.float16, 1e-11),
        (ml_dtypes.bfloat16, 1e-11),
        (np.float64, 1e-11),
    ],
    ids=["float16", "bfloat16", "float64"],
)
def test_other_dtypes_against_float64(loss: DistilLoss, dtype: Any, rtol: float) -> None:
    rng = np.random.default_rng(1)
    t = rng.normal(size=(4, 33, 17)).astype(dtype)
    s = (t.astype(np.float32) + rng.normal(size=t.shape).astype(np.float32) * 0.3).astype(dtype)
    assert engine.loss_value(loss, t, s) == pytest.approx(reference(loss, t, s), rel=rtol, abs=1e-14)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["teacher", "student"])
@pytest.mark.parametrize("at", [0, 5, backend.CPU_BLOCK + 3])
def test_every_non_finite_input_is_found(xp: ModuleType, loss: DistilLoss, bad: float, which: str, at: int) -> None:
    n = backend.CPU_BLOCK + 10
    arrays = {"teacher": np.linspace(-1, 1, n, dtype=np.float32), "student": np.linspace(1, -1, n, dtype=np.float32)}
    arrays[which][at] = bad
    with pytest.raises(NonFiniteInput) as info:
        engine.total_loss([Layer(0.0, loss)], [on(xp, arrays["teacher"])], [on(xp, arrays["student"])])
    error = info.value
    assert (error.index, error.layer, error.field) == (at, 0, f"{which}s[0].data")


def test_overflowing_float64_inputs() -> None:
    big = np.array([1e200, -1e200, 3e199])
    with pytest.raises(LossOverflow):
        engine.layer_loss([Layer(1.0, DistilLoss.mse())], 0, big, -big)
    # Cosine is scale-free: huge parallel vectors are at distance 0, not NaN.
    cosine = DistilLoss.cosine()
    assert engine.loss_value(cosine, big, big * 1e-300) == pytest.approx(0.0, abs=1e-15)
    assert engine.loss_value(cosine, big, -big) == pytest.approx(2.0)
    assert engine.loss_value(cosine, np.zeros(3), big) == 1.0


def test_weight_overflow_is_an_error() -> None:
    t, s = np.array([0.0, 1e30], np.float32), np.array([1e30, 0.0], np.float32)
    with pytest.raises(LossOverflow):
        engine.total_loss([Layer(1e300, DistilLoss.mse())], [t], [s])


def test_kl_stays_exact_where_the_seed_clamps() -> None:
    # Logit gap 1000: the reference clamps ln q at ln 1e-12 and gives 27.6.
    t = np.array([1000.0, 0.0, 0.0], np.float32)
    s = np.array([0.0, 1000.0, 0.0], np.float32)
    assert engine.loss_value(DistilLoss.kl_divergence(1.0), t, s) == pytest.approx(1000.0, rel=1e-12)


def test_temperature_is_floored_as_the_reference_does() -> None:
    """Temperatures in (0, 1e-6) are computed at 1e-6, as by the reference
    (which floors 0 and negative ones too; the service rejects those)."""
    t = np.array([0.5, 0.1, -0.2], np.float32)
    s = np.array([0.1, 0.5, -0.2], np.float32)

    def kl(tau: float) -> float:
        return engine.loss_value(DistilLoss.kl_divergence(tau), t, s)

    floor = kl(seed.REFERENCE_MIN_TEMPERATURE)
    assert kl(1e-9) == kl(1e-300) == floor
    assert kl(2e-6) != floor


def test_shapes_are_flattened(xp: ModuleType) -> None:
    rng = np.random.default_rng(3)
    t = rng.normal(size=(2, 3, 4)).astype(np.float32)
    s = rng.normal(size=(24,)).astype(np.float32)
    for loss in ALL_LOSSES:
        assert engine.loss_value(loss, on(xp, t), on(xp, s)) == engine.loss_value(loss, on(xp, t.ravel()), on(xp, s))


def test_zero_layers_give_zero() -> None:
    assert engine.total_loss([], [], []) == (0.0, [])


@pytest.mark.parametrize("weight", [1e-4, 1e-2, 1.0, 1e2, 1e4])
@pytest.mark.parametrize("loss", [DistilLoss.mse(), DistilLoss.kl_divergence(2.0)], ids=repr)
def test_float16_gradients_are_numpys_rounding_of_float64(loss: DistilLoss, weight: float) -> None:
    """A float16 student's gradient is the float64 gradient rounded by NumPy's
    cast, bit for bit: its subnormals (most of a mean's gradient, at small
    weights) are rounded by the engine itself, the rest by NumPy."""
    rng = np.random.default_rng(int(weight * 1e4) % 1000)
    t = rng.normal(size=(3, 5000)).astype(np.float16)
    s = (t + rng.normal(size=t.shape)).astype(np.float16)
    _, narrow = engine.evaluate(loss, t, s, weight)
    _, wide = engine.evaluate(loss, t.astype(np.float64), s.astype(np.float64), weight)
    assert narrow.dtype == np.float16
    with np.errstate(all="ignore"):
        expected = wide.astype(np.float16)
    assert np.any(np.abs(expected) < 2.0**-14) or weight >= 1e2  # the subnormal path is exercised
    np.testing.assert_array_equal(narrow.view(np.uint16), expected.view(np.uint16))
