"""The batch-relational losses against torchdistill, independent PyTorch code and central differences.

Values and gradients are float64 on both sides, computed by the same
formulas in different orders (BLAS blocking, reduction trees): they agree to
a few units of 1e-15, so the tests ask for relative 1e-12 on values and
1e-10 on gradients (atol 1e-12 of the largest element, for entries near 0).
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from distill_server import relational
from distill_server.relational import LOSSES, MAX_BATCH, NST_MAX_CHANNELS, Undefined

Params = Mapping[str, Any]
Reference = Callable[[Any, Any], Any]  # (teacher, student) torch tensors -> a scalar tensor

# The shapes of the comparisons: [B, C, H, W] maps whose channel counts differ
# (attention transfer), flattened by the others to widths 72 and 45; and flat
# batches of different widths.
MAPS = ((6, 8, 3, 3), (6, 5, 3, 3))
FLAT = ((6, 7), (6, 3))

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("similarity_preserving", {}),
    ("similarity_preserving", {"normalization": "l1"}),
    ("linear_cka", {}),
    ("pkt", {}),
    ("pkt", {"mode": "code"}),
    ("pkt", {"mode": "code", "eps": 1e-3}),
    ("attention_transfer", {}),
    ("attention_transfer", {"mode": "code"}),
    ("attention_transfer", {"p": 3.0}),
    ("attention_transfer", {"p": 1, "mode": "code"}),
    ("correlation_congruence", {}),
    ("correlation_congruence", {"kernel": "bilinear"}),
    ("correlation_congruence", {"mode": "code"}),
    ("correlation_congruence", {"mode": "code", "kernel": "bilinear"}),
    ("correlation_congruence", {"gamma": 0.1, "max_p": 4.0}),
    ("nst", {}),
    ("nst", {"degree": 3, "c": 0.5}),
    ("rkd", {}),
    ("rkd", {"distance_weight": 0.5, "angle_weight": 0}),
    ("rkd", {"distance_weight": 0, "angle_weight": 1.5}),
]
IDS = [f"{name}{params or ''}" for name, params in VARIANTS]
GRAMS = [(i, v) for i, v in zip(IDS, VARIANTS, strict=True) if v[0] not in ("attention_transfer", "nst")]
"""The variants whose Gram matrices and gradient products are taken in blocks of rows."""
SMALLEST = {
    "similarity_preserving": 2,
    "linear_cka": 3,
    "pkt": 3,
    "attention_transfer": 1,
    "correlation_congruence": 2,
    "nst": 1,
    "rkd": 3,
}
MAPPED = {"attention_transfer", "nst"}  # [B, C, spatial...] with spatial shapes that agree


def smallest(name: str, params: Params) -> int:
    return 2 if name == "pkt" and params.get("mode") == "code" else SMALLEST[name]


def pair(shapes: tuple[tuple[int, ...], tuple[int, ...]], seed: int, batch: int | None = None) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    t, s = (rng.normal(size=shape) for shape in shapes)
    return (t, s) if batch is None else (t[:batch], s[:batch])


def to_host(array: Any) -> np.ndarray:
    host: np.ndarray = array.get() if hasattr(array, "get") else array
    return host


def evaluate(name: str, t: Any, s: Any, params: Params, xp: ModuleType = np) -> tuple[float, np.ndarray]:
    """The loss and its gradient; ``check`` must accept the shapes first."""
    relational = LOSSES[name]
    assert relational.check(tuple(t.shape), tuple(s.shape), params) is None
    value, grad = relational.evaluate(xp, xp.asarray(t), xp.asarray(s), params, True)
    assert isinstance(value, float) and grad is not None
    grad = to_host(grad)
    assert grad.shape == s.shape and grad.dtype == np.float64
    return value, grad


# ---------------------------------------------------------------- references


def in_torchdistill(name: str, params: Params) -> bool:
    """Whether torchdistill has this variant."""
    return (
        (name == "similarity_preserving" and params.get("normalization") == "l1")
        or (name == "pkt" and params.get("mode") == "code")
        or (name == "attention_transfer" and params.get("p", 2) == 2)
        or (name == "correlation_congruence" and params.get("mode") == "code")
        or name == "rkd"
    )


def torchdistill_loss(name: str, params: Params) -> Reference | None:
    """torchdistill's class for this variant, called on io dicts; None where it has none."""
    if not in_torchdistill(name, params):
        return None
    mid = pytest.importorskip("torchdistill.losses.mid_level")
    student, teacher = {"path": "s", "io": "output"}, {"path": "t", "io": "output"}
    if name == "similarity_preserving" and params.get("normalization") == "l1":
        module = mid.SPKDLoss(student_output_path="s", teacher_output_path="t", reduction="batchmean")
        return lambda t, s: module({"s": {"output": s}}, {"t": {"output": t}})
    if name == "pkt" and params.get("mode") == "code":
        module = mid.PKTLoss("s", "output", "t", "output", eps=params.get("eps", 1e-7))
        return lambda t, s: module({"s": {"output": s.flatten(1)}}, {"t": {"output": t.flatten(1)}})
    if name == "attention_transfer" and params.get("p", 2) == 2:
        pairs = {"pair": {"teacher": teacher, "student": student, "weight": 1}}
        module = mid.ATLoss(pairs, mode=params.get("mode", "paper"))
        return lambda t, s: module({"s": {"output": s}}, {"t": {"output": t}})
    if name == "correlation_congruence" and params.get("mode") == "code":
        kernel = {"type": params.get("kernel", "gaussian"), "gamma": params.get("gamma", 0.4)}
        kernel["max_p"] = int(params.get("max_p", 2))
        module = mid.CCKDLoss("s", "t", kernel, reduction="batchmean")
        return lambda t, s: module({"s": {"output": s.flatten(1)}}, {"t": {"output": t.flatten(1)}})
    if name == "rkd":
        weights = params.get("distance_weight", 1.0), params.get("angle_weight", 2.0)
        module = mid.RKDLoss("s", "t", *weights, reduction="mean")
        return lambda t, s: module({"s": {"output": s}}, {"t": {"output": t}})
    return None


def paper_loss(name: str, params: Params) -> Reference:
    """The papers' formulas in PyTorch, written independently of the engine (no Gram-form shortcuts)."""
    torch = pytest.importorskip("torch")
    normalize = torch.nn.functional.normalize

    def similarity_preserving(t: Any, s: Any) -> Any:
        order = 1 if params.get("normalization") == "l1" else 2
        gt, gs = (normalize(x.flatten(1) @ x.flatten(1).T, p=order, dim=1) for x in (t, s))
        return ((gt - gs) ** 2).sum() / t.shape[0] ** 2

    def linear_cka(t: Any, s: Any) -> Any:
        x, y = (z.flatten(1) - z.flatten(1).mean(dim=0) for z in (t, s))
        fro = torch.linalg.matrix_norm
        return 1 - fro(y.T @ x) ** 2 / (fro(x.T @ x) * fro(y.T @ y))

    def pkt(t: Any, s: Any) -> Any:
        eps, code = params.get("eps", 1e-7), params.get("mode") == "code"
        keep = torch.ones(t.shape[0], t.shape[0], dtype=torch.float64) - (0 if code else torch.eye(t.shape[0]))

        def conditional(x: Any) -> Any:
            x = x.flatten(1)
            u = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)
            kernel = (torch.einsum("id,jd->ij", u, u) + 1) / 2 * keep
            return kernel / kernel.sum(dim=1, keepdim=True)

        p, q = conditional(t), conditional(s)
        total = (keep * p * torch.log((p + eps) / (q + eps))).sum()
        return total / t.shape[0] ** 2 if code else total

    def attention_transfer(t: Any, s: Any) -> Any:
        power, code = params.get("p", 2), params.get("mode") == "code"

        def attention(f: Any) -> Any:
            a = f.abs().pow(power).flatten(2)
            return normalize(a.mean(dim=1) if code else a.sum(dim=1), dim=1)

        diff = attention(s) - attention(t)
        return (diff**2).mean() if code else torch.linalg.vector_norm(diff, dim=1).mean()

    def correlation_congruence(t: Any, s: Any) -> Any:
        gamma, order = params.get("gamma", 0.4), int(params.get("max_p", 2))
        paper = params.get("mode", "paper") == "paper"

        def correlations(x: Any) -> Any:
            x = normalize(x.flatten(1), dim=1) if paper else x.flatten(1)
            g = torch.einsum("id,jd->ij", x, x)
            if params.get("kernel") == "bilinear":
                return g
            return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * g**p for p in range(order + 1))

        distance = torch.linalg.matrix_norm(correlations(s) - correlations(t))
        return (distance**2 if paper else distance) / t.shape[0] ** 2

    def nst(t: Any, s: Any) -> Any:
        """RepDistiller's ``NSTLoss.nst_loss`` (full_loss), with the paper's kernel ``(x . y + c)^d``."""
        degree, c = params.get("degree", 2), params.get("c", 0.0)
        ft, fs = (normalize(f.flatten(2), dim=2) for f in (t, s))

        def kernel(a: Any, b: Any) -> Any:
            return ((a.unsqueeze(1) * b.unsqueeze(2)).sum(-1) + c).pow(degree)

        return kernel(ft, ft).mean() + kernel(fs, fs).mean() - 2 * kernel(fs, ft).mean()

    functions: dict[str, Reference] = {
        "similarity_preserving": similarity_preserving,
        "linear_cka": linear_cka,
        "pkt": pkt,
        "attention_transfer": attention_transfer,
        "correlation_congruence": correlation_congruence,
        "nst": nst,
    }
    if name not in functions:
        pytest.skip(f"{name} follows torchdistill (compared with it below)")
    return functions[name]


def autograd(reference: Reference, t: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray]:
    torch = pytest.importorskip("torch")
    student = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    value = reference(torch.tensor(t, dtype=torch.float64), student)
    value.backward()
    return value.item(), student.grad.numpy()


def assert_matches(got: tuple[float, np.ndarray], expected: tuple[float, np.ndarray]) -> None:
    assert got[0] == pytest.approx(expected[0], rel=1e-12, abs=1e-15)
    scale = float(np.abs(expected[1]).max())
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-10, atol=1e-12 * scale)


# ---------------------------------------------------------------- value and gradient


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("shapes", [MAPS, FLAT], ids=["maps", "flat"])
def test_matches_the_papers_formulas(xp: ModuleType, name: str, params: Params, shapes: Any) -> None:
    if name in MAPPED and shapes is FLAT:
        shapes = ((6, 7, 4), (6, 3, 4))  # [B, C, L]: any rank >= 3
    t, s = pair(shapes, seed=1)
    assert_matches(evaluate(name, t, s, params, xp), autograd(paper_loss(name, params), t, s))


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=IDS)
def test_matches_torchdistill(xp: ModuleType, name: str, params: Params) -> None:
    reference = torchdistill_loss(name, params)
    if reference is None:
        pytest.skip("torchdistill has no such variant (compared with the paper's formula above)")
    t, s = pair(MAPS, seed=2)
    assert_matches(evaluate(name, t, s, params, xp), autograd(reference, t, s))


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=IDS)
def test_smallest_batches(xp: ModuleType, name: str, params: Params) -> None:
    """At the smallest batch each loss accepts, and one above, it still is the formula."""
    for batch in (smallest(name, params), smallest(name, params) + 1):
        t, s = pair(MAPS, seed=3, batch=batch)
        reference = torchdistill_loss(name, params) or paper_loss(name, params)
        assert_matches(evaluate(name, t, s, params, xp), autograd(reference, t, s))


@pytest.mark.parametrize(("name", "params"), [v for _, v in GRAMS], ids=[i for i, _ in GRAMS])
def test_products_in_blocks_of_rows_are_the_formulas(
    monkeypatch: pytest.MonkeyPatch, xp: ModuleType, name: str, params: Params
) -> None:
    """With blocks of 2 rows (the last one shorter), every loss is still its formula."""
    monkeypatch.setattr(relational, "MIN_SLICE", 2)
    monkeypatch.setattr(relational, "PRODUCT_WORK", 1)
    t, s = pair(((7, 9), (7, 4)), seed=8)
    reference = torchdistill_loss(name, params) or paper_loss(name, params)
    assert_matches(evaluate(name, t, s, params, xp), autograd(reference, t, s))


def test_a_gram_matrix_in_blocks_is_exactly_symmetric(monkeypatch: pytest.MonkeyPatch, xp: ModuleType) -> None:
    monkeypatch.setattr(relational, "MIN_SLICE", 3)
    monkeypatch.setattr(relational, "PRODUCT_WORK", 1)
    x = np.random.default_rng(9).normal(size=(10, 33))
    g = to_host(relational._gram(xp, xp.asarray(x)))
    np.testing.assert_array_equal(g, g.T)
    np.testing.assert_allclose(g, x @ x.T, rtol=1e-13, atol=1e-13 * float(np.abs(g).max()))
    a = np.random.default_rng(10).normal(size=(10, 10))
    product = to_host(relational._product(xp, xp.asarray(a), xp.asarray(x)))
    np.testing.assert_allclose(product, a @ x, rtol=1e-13, atol=1e-13 * float(np.abs(a @ x).max()))


def central_differences(name: str, t: np.ndarray, s: np.ndarray, params: Params) -> np.ndarray:
    """``d loss / d s`` by central differences in float64, step 1e-6 of each element's scale."""
    numeric = np.empty_like(s)
    for i in np.ndindex(s.shape):
        h = 1e-6 * max(1.0, abs(s[i]))
        up, down = s.copy(), s.copy()
        up[i] += h
        down[i] -= h
        high = LOSSES[name].evaluate(np, t, up, params, False)[0]
        numeric[i] = (high - LOSSES[name].evaluate(np, t, down, params, False)[0]) / (2 * h)
    return numeric


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=IDS)
def test_gradient_matches_central_differences(name: str, params: Params) -> None:
    shapes = ((4, 3, 2, 1), (4, 2, 2, 1)) if name in MAPPED else ((4, 3), (4, 2))
    t, s = pair(shapes, seed=4)
    _, grad = evaluate(name, t, s, params)
    numeric = central_differences(name, t, s, params)
    # Step 1e-6: truncation and cancellation leave about 1e-9 of the loss's scale.
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_value_only_returns_no_gradient() -> None:
    t, s = pair(FLAT, seed=5)
    for name, params in VARIANTS:
        if name not in MAPPED:
            value, grad = LOSSES[name].evaluate(np, t, s, params, False)
            assert grad is None and value == evaluate(name, t, s, params)[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=IDS)
def test_low_precision_inputs_compute_in_float64(name: str, params: Params, dtype: Any) -> None:
    """Any float dtype is converted exactly, once: the results are those of the same values in float64."""
    t, s = (x.astype(dtype) for x in pair(MAPS, seed=6))
    value, grad = evaluate(name, t, s, params)
    wide_value, wide_grad = evaluate(name, t.astype(np.float64), s.astype(np.float64), params)
    assert value == wide_value
    np.testing.assert_array_equal(grad, wide_grad)


def test_inputs_are_not_modified() -> None:
    t, s = pair(MAPS, seed=7)
    before = t.copy(), s.copy()
    for name, params in VARIANTS:
        evaluate(name, t, s, params)
    np.testing.assert_array_equal(t, before[0])
    np.testing.assert_array_equal(s, before[1])


# ---------------------------------------------------------------- edges of the math


def test_similarity_preserving_floors_a_zero_samples_norm_as_torchdistill() -> None:
    t, s = pair(FLAT, seed=8)
    t[1], s[2] = 0.0, 0.0
    params = {"normalization": "l1"}
    reference = torchdistill_loss("similarity_preserving", params)
    assert reference is not None
    assert_matches(evaluate("similarity_preserving", t, s, params), autograd(reference, t, s))


def test_similarity_preserving_is_scale_free_per_loss() -> None:
    t, s = pair(FLAT, seed=9)
    for params in ({}, {"normalization": "l1"}):
        value = evaluate("similarity_preserving", t, s, params)[0]
        assert evaluate("similarity_preserving", 1e3 * t, 1e-3 * s, params)[0] == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("constant", [0.0, 0.1, -3.7e5])
def test_linear_cka_of_a_constant_batch_is_an_error(role: str, constant: float) -> None:
    """Identical samples centre to exactly 0 (0.1 * 3 / 3 is not 0.1: the engine does not rely on it)."""
    t, s = pair(FLAT, seed=10, batch=3)
    if role == "teacher":
        t[:] = constant
    else:
        s[:] = constant
    with pytest.raises(Undefined, match=f"linear CKA is undefined: every {role} sample is the same"):
        LOSSES["linear_cka"].evaluate(np, t, s, {}, True)


def test_linear_cka_of_nearly_constant_and_huge_batches() -> None:
    """CKA is scale-free: samples one ulp apart, or of magnitude 1e300, give finite, scale-free results."""
    t, s = pair(FLAT, seed=11)
    value, grad = evaluate("linear_cka", t, s, {})
    huge = evaluate("linear_cka", 1e300 * t, 1e-300 * s, {})
    assert huge[0] == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(huge[1] * 1e-300, grad, rtol=1e-10, atol=1e-12 * float(np.abs(grad).max()))
    near = np.full((4, 2), 0.1)
    near[1, 0] = np.nextafter(0.1, 1.0)
    value, grad = evaluate("linear_cka", near, s[:4], {})
    assert math.isfinite(value) and np.isfinite(grad).all()


def test_linear_cka_is_zero_for_a_linear_map_of_the_teacher() -> None:
    t, _ = pair(FLAT, seed=12)
    rotation = np.linalg.qr(np.random.default_rng(12).normal(size=(7, 7)))[0]
    value, grad = evaluate("linear_cka", t, 2.5 * t @ rotation + 4.0, {})
    assert abs(value) < 1e-14 and float(np.abs(grad).max()) < 1e-13


def test_pkt_of_equal_relations_is_zero() -> None:
    """A scaled student has the teacher's kernel, up to ``eps`` in the norms (1e-7 relative, squared)."""
    t, _ = pair(FLAT, seed=13)
    for mode in ("paper", "code"):
        value, grad = evaluate("pkt", t, 3.0 * t, {"mode": mode})
        assert abs(value) < 1e-13 and float(np.abs(grad).max()) < 1e-7


def test_rkd_with_identical_samples() -> None:
    """Coincident samples: torchdistill's value; the others' gradients are its, the pair's is finite."""
    t, s = pair(FLAT, seed=16)
    t[4], s[1] = t[2], s[3]
    reference = torchdistill_loss("rkd", {})
    assert reference is not None
    value, grad = evaluate("rkd", t, s, {})
    expected = autograd(reference, t, s)
    assert value == pytest.approx(expected[0], rel=1e-12)
    others = [0, 2, 4, 5]
    np.testing.assert_allclose(grad[others], expected[1][others], rtol=1e-10, atol=1e-14)
    assert float(np.abs(expected[1][[1, 3]]).max()) > 1e9  # F.normalize's floor on the zero difference
    assert float(np.abs(grad).max()) < 1.0


@pytest.mark.parametrize("name", ["similarity_preserving", "attention_transfer", "rkd"])
def test_overflow_shows_in_the_value_without_warnings(name: str) -> None:
    """Squares of float64 inputs beyond about 1e154 overflow: a non-finite value, for the caller to report."""
    t, s = pair(MAPS, seed=17)
    value, _ = LOSSES[name].evaluate(np, 1e200 * t, s, {}, True)
    assert not math.isfinite(value)


def test_attention_transfer_gradient_is_zero_where_the_maps_agree() -> None:
    t, _ = pair(MAPS, seed=14)
    value, grad = evaluate("attention_transfer", t, 2.0 * t, {})
    assert value < 1e-15 and not grad.any()


# ---------------------------------------------------------------- logit losses

LOGIT_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("kd", {}),
    ("kd", {"temperature": 4.0}),
    ("dist", {}),
    ("dist", {"beta": 2.0, "gamma": 0.5, "temperature": 4.0}),
    ("dist", {"beta": 0.0}),
    ("dist", {"gamma": 0.0, "temperature": 0.5}),
    ("logit_standardized_kd", {}),
    ("logit_standardized_kd", {"temperature": 1.0}),
]
LOGIT_IDS = [f"{name}{params or ''}" for name, params in LOGIT_VARIANTS]
LOGIT_LOSSES = {"kd", "dist", "logit_standardized_kd"}


def logit_smallest(name: str, params: Params) -> int:
    return 3 if name == "dist" and params.get("gamma", 1.0) else 1


def logit_shapes(name: str) -> list[tuple[int, ...]]:
    """The logits each loss is compared on: ``[B, C]``, and for KD also ``[B, C, H, W]``."""
    return [(6, 10), (6, 5, 3, 2)] if name == "kd" else [(6, 10)]


def temperature(name: str, params: Params) -> float:
    return float(params.get("temperature", 2.0 if name == "logit_standardized_kd" else 1.0))


def torchdistill_logit_loss(name: str, params: Params) -> Reference:
    """torchdistill's class, times ``tau^2`` for KD and logit-standardized KD (their
    classes return the KL without it unless they mix in the targets' cross-entropy)."""
    mid = pytest.importorskip("torchdistill.losses.mid_level")
    tau = temperature(name, params)
    if name == "kd":
        module, factor = mid.KDLoss("s", "output", "t", "output", temperature=tau, alpha=0.0), tau**2
    elif name == "dist":
        weights = {"beta": params.get("beta", 1.0), "gamma": params.get("gamma", 1.0)}
        module, factor = mid.DISTLoss("s", "output", "t", "output", tau=tau, **weights), 1.0
    else:
        module, factor = mid.LogitStdKDLoss("s", "output", "t", "output", temperature=tau, alpha=0.0), tau**2
    return lambda t, s: factor * module({"s": {"output": s}}, {"t": {"output": t}})


def logit_paper_loss(name: str, params: Params) -> Reference:
    """The logit losses' formulas in PyTorch, written independently of torchdistill."""
    torch = pytest.importorskip("torch")
    tau = temperature(name, params)

    def kd(t: Any, s: Any) -> Any:
        """``tau^2 / B`` times the KL of each position's class distribution, summed (classes moved last)."""
        lp, lq = (torch.log_softmax(x.movedim(1, -1) / tau, dim=-1) for x in (t, s))
        return tau**2 * (lp.exp() * (lp - lq)).sum() / t.shape[0]

    def dist(t: Any, s: Any) -> Any:
        """The paper's Pearson correlations, ``cov / (sigma sigma)``, without a floor."""
        pt, ps = (torch.softmax(x / tau, dim=1) for x in (t, s))

        def pearson(x: Any, y: Any, dim: int) -> Any:
            xc, yc = x - x.mean(dim=dim, keepdim=True), y - y.mean(dim=dim, keepdim=True)
            return (xc * yc).sum(dim) / torch.sqrt((xc * xc).sum(dim) * (yc * yc).sum(dim))

        inter, intra = 1 - pearson(ps, pt, 1).mean(), 1 - pearson(ps, pt, 0).mean()
        return tau**2 * (params.get("beta", 1.0) * inter + params.get("gamma", 1.0) * intra)

    def logit_standardized_kd(t: Any, s: Any) -> Any:
        """The authors' ``kd_loss`` with ``logit_stand``: z-scores, KL summed over classes, mean, ``* tau^2``."""
        zt, zs = ((x - x.mean(dim=-1, keepdim=True)) / (1e-7 + x.std(dim=-1, keepdim=True)) for x in (t, s))
        log_q, p = torch.log_softmax(zs / tau, dim=1), torch.softmax(zt / tau, dim=1)
        return torch.nn.functional.kl_div(log_q, p, reduction="none").sum(1).mean() * tau**2

    functions: dict[str, Reference] = {"kd": kd, "dist": dist, "logit_standardized_kd": logit_standardized_kd}
    return functions[name]


@pytest.mark.parametrize(("name", "params"), LOGIT_VARIANTS, ids=LOGIT_IDS)
def test_logit_losses_match_torchdistill(xp: ModuleType, name: str, params: Params) -> None:
    for shape in logit_shapes(name):
        t, s = pair((shape, shape), seed=20)
        assert_matches(evaluate(name, t, s, params, xp), autograd(torchdistill_logit_loss(name, params), t, s))


@pytest.mark.parametrize(("name", "params"), LOGIT_VARIANTS, ids=LOGIT_IDS)
def test_logit_losses_match_the_papers_formulas(xp: ModuleType, name: str, params: Params) -> None:
    for shape in logit_shapes(name):
        t, s = pair((shape, shape), seed=21)
        assert_matches(evaluate(name, t, s, params, xp), autograd(logit_paper_loss(name, params), t, s))


@pytest.mark.parametrize(("name", "params"), LOGIT_VARIANTS, ids=LOGIT_IDS)
def test_logit_losses_at_the_smallest_batches(xp: ModuleType, name: str, params: Params) -> None:
    for batch in (logit_smallest(name, params), logit_smallest(name, params) + 1):
        t, s = pair(((6, 10), (6, 10)), seed=22, batch=batch)
        assert_matches(evaluate(name, t, s, params, xp), autograd(torchdistill_logit_loss(name, params), t, s))


@pytest.mark.parametrize(("name", "params"), LOGIT_VARIANTS, ids=LOGIT_IDS)
def test_logit_gradients_match_central_differences(name: str, params: Params) -> None:
    for shape in [(4, 3), (2, 3, 2)] if name == "kd" else [(4, 3)]:
        t, s = pair((shape, shape), seed=23)
        _, grad = evaluate(name, t, s, params)
        numeric = central_differences(name, t, s, params)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("name", "params"), LOGIT_VARIANTS, ids=LOGIT_IDS)
def test_logit_losses_of_low_precision_inputs_compute_in_float64(name: str, params: Params, dtype: Any) -> None:
    for shape in logit_shapes(name):
        t, s = (x.astype(dtype) for x in pair((shape, shape), seed=24))
        value, grad = evaluate(name, t, s, params)
        wide_value, wide_grad = evaluate(name, t.astype(np.float64), s.astype(np.float64), params)
        assert value == wide_value
        np.testing.assert_array_equal(grad, wide_grad)


def test_logit_losses_value_only_and_inputs_untouched() -> None:
    t, s = pair(((6, 10), (6, 10)), seed=25)
    before = t.copy(), s.copy()
    for name, params in LOGIT_VARIANTS:
        value, grad = LOSSES[name].evaluate(np, t, s, params, False)
        assert grad is None and value == evaluate(name, t, s, params)[0]
    np.testing.assert_array_equal(t, before[0])
    np.testing.assert_array_equal(s, before[1])


@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("gap", [1e-9, 1e-6, 1e-3])
def test_kd_of_nearly_equal_logits_is_accurate_relative_to_the_gap(xp: ModuleType, gap: float, tau: float) -> None:
    """Logits a small ``d = (s - t) / tau`` apart: ``tau^2 KL`` is ``tau^2 Var_p(d) / 2`` and the
    gradient ``tau p (d - E_p d) / B``, up to a relative ``O(gap)``; the difference of two
    log-softmaxes would keep only about 1e-16 absolute (all of the value at 1e-9). Shifting the
    student (softmax ignores it) keeps that accuracy, but for the rounding of ``s - t`` itself."""
    t, noise = pair(((5, 8, 2), (5, 8, 2)), seed=26)
    s = t + gap * tau * noise
    d = (s - t) / tau
    p = np.exp(t / tau) / np.exp(t / tau).sum(axis=1, keepdims=True)
    centred = d - (p * d).sum(axis=1, keepdims=True)
    expected = tau**2 * float((p * centred**2).sum()) / 2 / 5, tau * p * centred / 5
    value, grad = evaluate("kd", t, s, {"temperature": tau}, xp)
    tolerance = 10 * gap + 1e-12
    assert value == pytest.approx(expected[0], rel=tolerance)
    scale = float(np.abs(expected[1]).max())  # the O(gap) term is relative to the largest element
    np.testing.assert_allclose(grad, expected[1], rtol=tolerance, atol=tolerance * scale)
    shifted = evaluate("kd", t, s + 4.0, {"temperature": tau}, xp)
    rounding = tolerance + 1e-14 / gap  # s + 4 - t is exact to ulp(4), 1e-15
    assert shifted[0] == pytest.approx(expected[0], rel=rounding)
    np.testing.assert_allclose(shifted[1], expected[1], rtol=rounding, atol=rounding * scale)


def test_kd_gaps_across_the_threshold_match_torchdistill(xp: ModuleType) -> None:
    """Positions whose gaps are small take the expm1 forms, the others log-softmax; both are the KL."""
    t, noise = pair(((6, 10), (6, 10)), seed=27)
    s = t + np.array([1e-4, 3e-3, 9e-3, 2e-2, 0.1, 1.0])[:, None] * noise
    value, grad = evaluate("kd", t, s, {}, xp)
    expected_value, expected_grad = autograd(torchdistill_logit_loss("kd", {}), t, s)
    assert value == pytest.approx(expected_value, rel=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-12 * float(np.abs(expected_grad).max()))


def test_logit_standardized_kd_of_a_shifted_student_is_zero() -> None:
    """``t + 5`` standardizes to ``t``'s z-scores up to rounding: the KL is 0 to 1e-30, never negative.
    (``2 t`` would not: ``eps`` in ``1e-7 + std`` leaves z-scores 1e-7 apart.)"""
    t, _ = pair(((6, 10), (6, 10)), seed=28)
    value, grad = evaluate("logit_standardized_kd", t, t + 5.0, {})
    assert 0.0 <= value < 1e-28 and float(np.abs(grad).max()) < 1e-14


@pytest.mark.parametrize("which", ["student", "both"])
@pytest.mark.parametrize("spread", [0.0, 1e-9])
def test_dist_floors_norms_as_torch_cosine_similarity(which: str, spread: float) -> None:
    """Samples alike to ``spread``: each class's centred column has a norm below 1e-8 (0 at
    ``spread`` 0), floored as ``cosine_similarity`` floors it, the gradient passing through the
    true norm (a floor that passed no gradient would change it by a few per cent); the gradient
    is large (to 1e16) and torchdistill's. At 1e-9 the centred probabilities, differences of
    numbers 1e10 times larger, keep only about 7 digits: the comparison is to 1e-5."""
    t, noise = pair(((5, 6), (5, 6)), seed=29)
    s = t[:1] + spread * noise
    if which == "both":
        t = t[2:3] + spread * noise[::-1]
    got, expected = evaluate("dist", t, s, {}), autograd(torchdistill_logit_loss("dist", {}), t, s)
    if spread == 0:
        assert_matches(got, expected)
        return
    assert got[0] == pytest.approx(expected[0], rel=1e-5)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-7 * float(np.abs(expected[1]).max()))


def test_logit_standardized_kd_of_a_constant_student_row_is_torchdistills() -> None:
    """A constant row: std 0, z 0, and the gradient ``dz / 1e-7`` centred (torch masks std's 0 / 0)."""
    t, s = pair(((4, 6), (4, 6)), seed=30)
    s[1] = 2.5
    expected = autograd(torchdistill_logit_loss("logit_standardized_kd", {}), t, s)
    assert_matches(evaluate("logit_standardized_kd", t, s, {}), expected)
    assert float(np.abs(expected[1][1]).max()) > 1e5


def test_logit_standardized_kd_of_huge_logits_is_scale_free() -> None:
    """Logits beyond 1e154 (whose squares overflow) standardize as logits of 1e100 do (``eps`` is
    negligible at both scales): the same value, the gradient scaled."""
    t, s = pair(((4, 6), (4, 6)), seed=31)
    value, grad = evaluate("logit_standardized_kd", 1e100 * t, 1e100 * s, {})
    huge = evaluate("logit_standardized_kd", 1e200 * t, 1e200 * s, {})
    assert math.isfinite(huge[0]) and huge[0] == pytest.approx(value, rel=1e-12)
    scale = float(np.abs(grad).max())
    np.testing.assert_allclose(huge[1] * 1e100, grad, rtol=1e-10, atol=1e-12 * scale)


# ---------------------------------------------------------------- check


@pytest.mark.parametrize(
    ("name", "teacher", "student", "params", "sentence"),
    [
        ("similarity_preserving", (8, 4), (4, 4), {}, "the batch sizes differ: teacher 8, student 4"),
        ("similarity_preserving", (1, 4), (1, 9), {}, "similarity-preserving KD needs a batch of at least 2, not 1: "
         "a batch of 1 has no pairs to compare"),
        ("similarity_preserving", (8,), (8, 4), {}, "similarity-preserving KD needs [batch, features...] inputs of "
         "at least 2 axes: the teacher has shape [8]"),
        ("similarity_preserving", (8, 4), (8, 0, 3), {}, "similarity-preserving KD needs non-empty samples: "
         "the student has shape [8, 0, 3]"),
        ("similarity_preserving", (0, 4), (0, 4), {}, "similarity-preserving KD needs non-empty samples: "
         "the teacher has shape [0, 4]"),
        ("linear_cka", (2, 5), (2, 3), {}, "linear CKA needs a batch of at least 3, not 2: centred over the batch, "
         "1 sample is all zeros and 2 samples always give CKA 1"),
        ("pkt", (2, 5), (2, 3), {}, "PKT needs a batch of at least 3, not 2: without its own sample, each of 2 "
         "has a single neighbour, of probability 1"),
        ("pkt", (1, 5), (1, 3), {"mode": "code"}, "PKT needs a batch of at least 2, not 1: "
         "a batch of 1 has no pairs to compare"),
        ("attention_transfer", (8, 64, 7, 7), (8, 32, 14, 14), {}, "attention transfer needs the same spatial size: "
         "teacher [8, 64, 7, 7], student [8, 32, 14, 14]"),
        ("attention_transfer", (8, 64, 49), (8, 32, 7, 7), {}, "attention transfer needs the same spatial size: "
         "teacher [8, 64, 49], student [8, 32, 7, 7]"),
        ("attention_transfer", (8, 64), (8, 64), {}, "attention transfer needs [batch, channels, spatial...] inputs "
         "of at least 3 axes: the teacher has shape [8, 64]"),
        ("correlation_congruence", (1, 5), (1, 3), {}, "correlation congruence needs a batch of at least 2, not 1: "
         "a batch of 1 has no pairs to compare"),
        ("nst", (4, 8, 7, 7), (4, 4, 14, 14), {}, "NST needs the same spatial size: teacher [4, 8, 7, 7], "
         "student [4, 4, 14, 14]"),
        ("nst", (4, 4096, 7, 7), (4, 4, 7, 7), {}, "NST takes at most 2048 channels, not 4096 (the teacher's)"),
        ("rkd", (2, 5), (2, 3), {}, "RKD needs a batch of at least 3, not 2: normalized distances and angles of 2 "
         "samples are constant"),
        ("rkd", (257, 5), (257, 3), {}, "RKD takes a batch of at most 256 samples, not 257"),
        ("kd", (8, 10), (8, 12), {}, "KD needs logits of equal shapes: teacher [8, 10], student [8, 12]"),
        ("kd", (8, 10, 4), (8, 10, 2, 2), {}, "KD needs logits of equal shapes: teacher [8, 10, 4], "
         "student [8, 10, 2, 2]"),
        ("kd", (8, 10), (4, 10), {}, "the batch sizes differ: teacher 8, student 4"),
        ("kd", (8,), (8, 10), {}, "KD needs [batch, classes, ...] inputs of at least 2 axes: "
         "the teacher has shape [8]"),
        ("kd", (8, 1, 7, 7), (8, 1, 7, 7), {}, "KD needs at least 2 classes (axis 1), not 1: "
         "the softmax of a single class is 1 whatever the logits"),
        ("kd", (8, 0), (8, 0), {}, "KD needs non-empty samples: the teacher has shape [8, 0]"),
        ("kd", (65537, 10), (65537, 10), {}, "KD takes a batch of at most 65536 samples, not 65537"),
        ("dist", (2, 10), (2, 10), {}, "DIST needs a batch of at least 3, not 2: the intra-class correlations "
         "are over the batch: of 2 samples always 1 or -1, of 1 sample 0 / 0 (gamma = 0 drops them)"),
        ("dist", (1, 10), (1, 10), {"beta": 0.5}, "DIST needs a batch of at least 3, not 1: the intra-class "
         "correlations are over the batch: of 2 samples always 1 or -1, of 1 sample 0 / 0 (gamma = 0 drops them)"),
        ("dist", (8, 10, 2), (8, 10, 2), {}, "DIST needs [batch, classes] inputs of exactly 2 axes: "
         "the teacher has shape [8, 10, 2]"),
        ("dist", (8, 10), (8, 10, 1), {}, "DIST needs [batch, classes] inputs of exactly 2 axes: "
         "the student has shape [8, 10, 1]"),
        ("dist", (8, 10), (8, 11), {}, "DIST needs logits of equal shapes: teacher [8, 10], student [8, 11]"),
        ("dist", (8, 1), (8, 1), {}, "DIST needs at least 2 classes (axis 1), not 1: "
         "the softmax of a single class is 1 whatever the logits"),
        ("logit_standardized_kd", (8, 1), (8, 1), {}, "logit-standardized KD needs at least 2 classes (axis 1), "
         "not 1: the unbiased standard deviation of one class is 0 / 0"),
        ("logit_standardized_kd", (8, 10), (8, 9), {}, "logit-standardized KD needs logits of equal shapes: "
         "teacher [8, 10], student [8, 9]"),
        ("logit_standardized_kd", (8, 10, 1, 1), (8, 10, 1, 1), {}, "logit-standardized KD needs [batch, classes] "
         "inputs of exactly 2 axes: the teacher has shape [8, 10, 1, 1]"),
    ],
)  # fmt: skip
def test_check_says_what_is_wrong(
    name: str, teacher: tuple[int, ...], student: tuple[int, ...], params: Params, sentence: str
) -> None:
    assert LOSSES[name].check(teacher, student, params) == sentence


@pytest.mark.parametrize(
    ("name", "params", "sentence"),
    [
        ("similarity_preserving", {"normalization": "l3"},
         "similarity-preserving KD: normalization is 'l3'; expected one of 'l2', 'l1'"),
        ("linear_cka", {"eps": 1e-7}, "linear CKA: linear_cka has no option 'eps'; its options: none"),
        ("pkt", {"eps": 0.0}, "PKT: eps is 0.0; expected a finite number > 0"),
        ("pkt", {"eps": True}, "PKT: eps is True; expected a finite number > 0"),
        ("pkt", {"temperature": 2.0}, "PKT: pkt has no option 'temperature'; its options: eps, mode"),
        ("attention_transfer", {"p": 0.5}, "attention transfer: p is 0.5; expected a number from 1 to 16"),
        ("attention_transfer", {"p": 17}, "attention transfer: p is 17; expected a number from 1 to 16"),
        ("attention_transfer", {"p": math.inf}, "attention transfer: p is inf; expected a number from 1 to 16"),
        ("attention_transfer", {"mode": "Paper"},
         "attention transfer: mode is 'Paper'; expected one of 'paper', 'code'"),
        ("correlation_congruence", {"max_p": 2.5},
         "correlation congruence: max_p is 2.5; expected a whole number from 1 to 8"),
        ("correlation_congruence", {"max_p": 1e9},
         "correlation congruence: max_p is 1000000000.0; expected a whole number from 1 to 8"),
        ("correlation_congruence", {"kernel": "rbf"},
         "correlation congruence: kernel is 'rbf'; expected one of 'gaussian', 'bilinear'"),
        ("correlation_congruence", {"mode": "torchdistill"},
         "correlation congruence: mode is 'torchdistill'; expected one of 'paper', 'code'"),
        ("nst", {"c": -1.0}, "NST: c is -1.0; expected a finite number >= 0"),
        ("rkd", {"distance_weight": 0.0, "angle_weight": 0},
         "RKD: distance_weight and angle_weight are both 0; expected at least one > 0"),
        ("kd", {"temperature": 0.0}, "KD: temperature is 0.0; expected a finite number > 0"),
        ("kd", {"alpha": 0.5}, "KD: kd has no option 'alpha'; its options: temperature"),
        ("dist", {"beta": 0, "gamma": 0.0}, "DIST: beta and gamma are both 0; expected at least one > 0"),
        ("dist", {"gamma": -1.0}, "DIST: gamma is -1.0; expected a finite number >= 0"),
        ("dist", {"tau": 2.0}, "DIST: dist has no option 'tau'; its options: beta, gamma, temperature"),
        ("logit_standardized_kd", {"temperature": math.inf},
         "logit-standardized KD: temperature is inf; expected a finite number > 0"),
    ],
)  # fmt: skip
def test_check_refuses_options_out_of_the_contract(name: str, params: Params, sentence: str) -> None:
    shape = (8, 4, 2, 2)  # any loss takes it
    assert LOSSES[name].check(shape, shape, params) == sentence


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=IDS)
def test_check_accepts_different_widths(name: str, params: Params) -> None:
    batch = smallest(name, params)
    assert LOSSES[name].check((batch, 64, 7, 7), (batch, 3, 7, 7), params) is None
    if name not in MAPPED:
        assert LOSSES[name].check((batch, 100), (batch, 3, 2), params) is None


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_check_refuses_batches_beyond_the_limit(name: str) -> None:
    limit = MAX_BATCH[name]
    widths = ((3,), (3,)) if name in LOGIT_LOSSES else ((2, 1), (3, 1))  # logits: [B, C] of equal shapes
    assert LOSSES[name].check((limit, *widths[0]), (limit, *widths[1]), {}) is None
    sentence = LOSSES[name].check((limit + 1, *widths[0]), (limit + 1, *widths[1]), {})
    assert sentence is not None and sentence.endswith(f"takes a batch of at most {limit} samples, not {limit + 1}")


def test_every_loss_has_a_limit_and_its_defaults() -> None:
    assert set(MAX_BATCH) == set(LOSSES)
    assert {name: dict(loss.defaults) for name, loss in LOSSES.items()} == {
        "similarity_preserving": {"normalization": "l2"},
        "linear_cka": {},
        "pkt": {"eps": 1e-7, "mode": "paper"},
        "attention_transfer": {"p": 2.0, "mode": "paper"},
        "correlation_congruence": {"kernel": "gaussian", "gamma": 0.4, "max_p": 2, "mode": "paper"},
        "nst": {"degree": 2, "c": 0.0},
        "rkd": {"distance_weight": 1.0, "angle_weight": 2.0},
        "kd": {"temperature": 1.0},
        "dist": {"beta": 1.0, "gamma": 1.0, "temperature": 1.0},
        "logit_standardized_kd": {"temperature": 2.0},
    }


@pytest.mark.parametrize(
    ("name", "params", "shapes"),
    [
        ("similarity_preserving", {"normalization": "l1"}, None),
        ("linear_cka", {}, None),
        ("pkt", {}, None),
        ("correlation_congruence", {}, None),
        ("rkd", {}, None),
        ("nst", {}, ((2, NST_MAX_CHANNELS, 3, 3), (2, NST_MAX_CHANNELS, 3, 3))),
        ("kd", {}, ((MAX_BATCH["kd"], 10), (MAX_BATCH["kd"], 10))),
        ("dist", {}, ((MAX_BATCH["dist"], 10), (MAX_BATCH["dist"], 10))),
        ("logit_standardized_kd", {}, ((MAX_BATCH["logit_standardized_kd"], 10),) * 2),
    ],
    ids=["similarity_preserving", "linear_cka", "pkt", "correlation_congruence", "rkd", "nst", "kd", "dist", "lskd"],
)
def test_memory_at_the_limits(name: str, params: Params, shapes: Any) -> None:
    """The float64 temporaries of the largest batch (for NST, of the most channels; for the
    logit losses, of 10 classes), gradient included, stay under 256 MiB (measured: 224, 128,
    160, 224, 166 and 102 MiB; KD, DIST and logit-standardized KD: 31, 46 and 42 MiB)."""
    t, s = pair(shapes or ((MAX_BATCH[name], 3), (MAX_BATCH[name], 2)), seed=15)
    tracemalloc.start()
    try:
        LOSSES[name].evaluate(np, t, s, params, True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 << 20
