"""The reference's test vectors (tests/data/seed_vectors.json), decoded.

Each case was computed by the reference crate's own code, with a float64
reference value beside it; see the file's ``format`` entry.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from distill_client import DistilLoss

PATH = Path(__file__).parent / "data" / "seed_vectors.json"

RTOL = 1e-12
"""Relative tolerance against the float64 reference.

The engine accumulates in float64 (unit roundoff 1.1e-16) with pairwise
sums over blocks, so n <= 1e5 costs at most a few hundred ulps; the worst
MSE case measured is 2e-14. Two kinds cancel and get an absolute term too:
"""

COSINE_ATOL = 1e-15
"""``1 - cos`` cancels when cos is near 1: an absolute error of a few ulps of 1."""

KL_ATOL = 1e-14
"""Per unit of ``tau^2``: KL is ``w/za - ln za + ln zb`` (terms of size ln n),
so the float64 rounding of those terms, scaled by ``tau^2``, is absolute."""


@cache
def _data() -> dict[str, Any]:
    return json.loads(PATH.read_text())


def cases(*ops: str) -> list[dict[str, Any]]:
    """The cases of the given ops (e.g. ``DistilLoss.compute``)."""
    return [case for case in _data()["cases"] if case["op"] in ops]


def vector(value: Any) -> np.ndarray:
    """A case's vector as float32 (inline list or a named blob)."""
    if isinstance(value, dict):
        blob = _data()["blobs"][value["ref"]]
        assert blob["dtype"] == "float32-le"
        return np.frombuffer(base64.b64decode(blob["b64"]), dtype="<f4")
    return np.asarray(value, dtype=np.float32)


def number(value: Any) -> float:
    """A result number ('NaN' and 'Infinity' are strings in the file)."""
    return float(value)


def tolerance(reference: float, spec: dict[str, Any], weight: float = 1.0) -> float:
    """How far a result may be from ``reference`` (see RTOL)."""
    kind = spec["kind"]
    atol = 0.0
    if kind == "cosine":
        atol = COSINE_ATOL
    elif kind in ("kl_divergence", "combined"):
        factor = abs(spec.get("kl_weight", 1.0))
        atol = KL_ATOL * factor * max(spec["temperature"], 1e-6) ** 2
    return RTOL * abs(reference) + abs(weight) * atol


REFERENCE_MIN_TEMPERATURE = 1e-6
"""The reference computes KL at ``max(tau, 1e-6)``."""


def loss(spec: dict[str, Any]) -> DistilLoss:
    """The loss the reference computed a case with.

    The reference takes any temperature and floors it at 1e-6; the service
    rejects temperatures <= 0 (docs/semantics.md). A case with such a
    temperature is the reference's value at the floor, so it is built there.
    """
    kind = spec["kind"]
    if kind == "mse":
        return DistilLoss.mse()
    if kind == "cosine":
        return DistilLoss.cosine()
    tau = max(spec["temperature"], REFERENCE_MIN_TEMPERATURE)
    if kind == "kl_divergence":
        return DistilLoss.kl_divergence(tau)
    return DistilLoss.combined(spec["kl_weight"], spec["mse_weight"], tau)


def weights_of(distiller: dict[str, Any]) -> list[float]:
    """The layer weights the reference used: float32 values, as in the crate."""
    if distiller["ctor"] == "uniform_mse":
        n = distiller["n_layers"]
        return [float(np.float32(1.0) / np.float32(n))] * n
    return list(distiller["weights"])


def loss_of(distiller: dict[str, Any]) -> dict[str, Any]:
    return distiller.get("loss", {"kind": "mse"})


def case_id(case: dict[str, Any]) -> str:
    return str(case["id"])


def assert_seed_error(error: BaseException, result: dict[str, Any]) -> None:
    """``error`` is the reference's error kind, with the reference's fields."""
    from distill_client import DimensionMismatch, EmptyInput, TeacherStudentMismatch

    kinds = {
        "EmptyInput": (EmptyInput, ()),
        "TeacherStudentMismatch": (TeacherStudentMismatch, ("teacher", "student")),
        "DimensionMismatch": (DimensionMismatch, ("expected", "got")),
    }
    kind, fields = kinds[result["error"]]
    assert isinstance(error, kind), (error, result)
    for name in fields:
        assert getattr(error, name) == result[name], (name, getattr(error, name), result[name])
