"""Batch distillation losses: samples compared with samples, and logits.

The relational losses view the teacher ``[B, ...]`` and the student
``[B, ...]`` as batches of ``B`` samples and compare relations *between*
samples (Gram matrices, kernels, attention maps), so the teacher's and the
student's widths may differ; only the batch size (and attention transfer's
and NST's spatial shape) must agree: similarity-preserving KD, linear CKA,
PKT, attention transfer, correlation congruence, NST and RKD. The logit
losses compare teacher and student logits of equal shapes, the classes on
axis 1 (torchdistill's convention): KD (``[B, C, ...]``), DIST and
logit-standardized KD (``[B, C]``; DIST's intra-class term relates the
samples of a batch). Every loss is written once
for NumPy and CuPy (``xp``), computes in float64 (inputs of any float dtype
are converted once) and returns ``d loss / d student`` in closed form: no
autograd, no Python loop over elements. Their matrix products (Gram
matrices, the gradients' products) are taken in blocks of rows, each after
the interruption check, so a server stops abandoned work within a few tenths
of a second even at the size limits (``bench/bench_limits.py``).

A loss is a :class:`Relational`: ``check`` says, before any computation,
whether the shapes and parameters can be compared (``None``) or what is
wrong (one sentence); ``evaluate`` computes. :data:`MAX_BATCH` keeps the
float64 temporaries of a call under about 256 MiB (and ``rkd``'s ``B^3``
work under a second); the ``[B, width]`` float64 copies of the inputs are
bounded by the caller's limit on tensor sizes.

Where the authors' code (or torchdistill) departs from the paper, the
default follows the paper and the code's variant is an option
(``mode="code"``, ``mode="code"``, ``normalization="l1"``), as
torchdistill itself does for attention transfer. Wherever torchdistill
divides by a norm, the norm is floored at 1e-12 as ``F.normalize`` does,
and a floored norm passes no gradient: a zero sample (or channel map) gets
the floor's large but finite gradient, exactly as under PyTorch autograd
(except RKD's coincident samples: see :func:`_rkd_evaluate`). DIST's
Pearson correlations follow ``torch.nn.functional.cosine_similarity``
instead: each norm floored at 1e-8, the floor invisible to the gradient (see
:func:`_pearson`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill_core.losses import OPTIONS, LossKind, Option, option_problem
from distill_server.interruption import blocks, check

__all__ = ["LOSSES", "MAX_BATCH", "MAX_WORK", "NST_MAX_CHANNELS", "Relational", "Undefined"]

MAX_BATCH: dict[str, int] = {
    "similarity_preserving": 2048,
    "linear_cka": 2048,
    "pkt": 2048,
    "attention_transfer": 1 << 16,
    "correlation_congruence": 2048,
    "nst": 1 << 16,
    "rkd": 256,
    "kd": 1 << 16,
    "dist": 1 << 16,
    "logit_standardized_kd": 1 << 16,
}
"""The largest batch each loss accepts. A ``B x B`` float64 matrix at 2048 is
32 MiB, and the Gram losses hold at most seven at once (peak 224 MiB,
measured with the gradient). ``rkd``'s angles are ``B^3`` values, built in
blocks of anchors of 32 MiB (peak 166 MiB at 256, and 0.3 s on one core;
512 would take eight times that). Attention transfer and NST build nothing
between samples (a few float64 copies of the inputs, which the caller's
size limit bounds; NST's ``C x C`` channel kernels are per sample, in
blocks, and :data:`NST_MAX_CHANNELS` bounds them): their limit only keeps a
batch sensible. So do the logit losses (KD, DIST, logit-standardized KD):
at most about nine float64 arrays of the logits' shape at once (46 MiB at
``65536 x 10``, measured with the gradient; DIST's intra-class correlations
are over the columns of the ``[B, C]`` probabilities, nothing ``B x B``)."""

_NORMALIZE_EPS = 1e-12
"""``torch.nn.functional.normalize``'s floor of a norm, used where torchdistill normalizes."""

Check = Callable[[tuple[int, ...], tuple[int, ...], Mapping[str, Any]], "str | None"]
Evaluate = Callable[[Any, Any, Any, Mapping[str, Any], bool], "tuple[float, Any | None]"]


class Undefined(ValueError):
    """The loss has no value for these inputs (not an overflow: 0 / 0)."""

    def __init__(self, role: str, message: str) -> None:
        super().__init__(message)
        self.role = role
        """Whose values make it undefined: "teacher" or "student"."""


@dataclass(frozen=True)
class Relational:
    """A batch-relational loss.

    Attributes:
        check: ``check(teacher_shape, student_shape, params)``: None when the
            loss can compare these shapes with these parameters, else one
            sentence saying what is wrong (the expected and the actual).
        evaluate: ``evaluate(xp, teacher, student, params, gradient)``: the
            loss as a float and, with ``gradient``, ``d loss / d student`` as
            a float64 array of the student's shape (else None). Assumes
            ``check`` passed. Parameters absent from ``params`` take their
            defaults.
        defaults: Each parameter's default.
    """

    check: Check
    evaluate: Evaluate
    defaults: Mapping[str, Any]


# ---------------------------------------------------------------- parameters and shapes


Rule = Option
"""A parameter's default, and its allowed values or a test of a number (the contract's, :data:`OPTIONS`)."""


def _resolve(rules: Mapping[str, Rule], params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with the defaults of the absent ones filled in."""
    return {name: params.get(name, default) for name, (default, _) in rules.items()}


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _checker(
    name: str,
    title: str,
    rules: Mapping[str, Rule],
    minimum: Callable[[dict[str, Any]], tuple[int, str]],
    rank: int = 2,
    spatial: bool = False,
    extra: Callable[[tuple[int, ...], tuple[int, ...], dict[str, Any]], str | None] | None = None,
    layout: str | None = None,
    exact: bool = False,
) -> Check:
    """A ``check`` for a loss: parameters, ranks, batch sizes, widths, limits.

    ``minimum(params)`` gives the smallest meaningful batch and why smaller
    ones mean nothing; ``spatial``: axes 2 on must agree (attention maps);
    ``extra``: a last check of the loss's own; ``layout``: the inputs' axes
    as the sentences name them; ``exact``: exactly ``rank`` axes, not at least.
    """

    kind = LossKind[name.upper()]
    if layout is None:
        layout = "[batch, channels, spatial...]" if spatial else "[batch, features...]"
    axes = f"{'exactly' if exact else 'at least'} {rank} axes"

    def check(teacher: tuple[int, ...], student: tuple[int, ...], params: Mapping[str, Any]) -> str | None:
        problem = option_problem(kind, params)
        if problem is not None:
            return f"{title}: {problem[1]}"
        for role, shape in (("teacher", teacher), ("student", student)):
            if len(shape) < rank or (exact and len(shape) != rank):
                return f"{title} needs {layout} inputs of {axes}: the {role} has shape {_shape(shape)}"
        if teacher[0] != student[0]:
            return f"the batch sizes differ: teacher {teacher[0]}, student {student[0]}"
        batch = teacher[0]
        for role, shape in (("teacher", teacher), ("student", student)):
            if math.prod(shape[1:]) == 0 or batch == 0:
                return f"{title} needs non-empty samples: the {role} has shape {_shape(shape)}"
        if spatial and teacher[2:] != student[2:]:
            return f"{title} needs the same spatial size: teacher {_shape(teacher)}, student {_shape(student)}"
        smallest, reason = minimum(_resolve(rules, params))
        if batch < smallest:
            return f"{title} needs a batch of at least {smallest}, not {batch}: {reason}"
        if batch > MAX_BATCH[name]:
            return f"{title} takes a batch of at most {MAX_BATCH[name]} samples, not {batch}"
        return None if extra is None else extra(teacher, student, _resolve(rules, params))

    return check


def _quiet(evaluate: Evaluate) -> Evaluate:
    """``evaluate`` without NumPy's floating-point warnings (an overflow, float64
    inputs beyond about 1e150 whose squares overflow, shows in the value,
    which the caller checks), after the installed interruption check."""

    @functools.wraps(evaluate)
    def quiet(xp: Any, teacher: Any, student: Any, params: Mapping[str, Any], gradient: bool) -> tuple[float, Any]:
        check()  # abandoned while queued: stop before any work (the blocked losses also check per block)
        with np.errstate(all="ignore"):
            return evaluate(xp, teacher, student, params, gradient)

    return quiet


def _rows(xp: Any, x: Any) -> Any:
    """``x`` as float64 ``[batch, features]``: the one conversion (may share ``x``'s memory)."""
    return xp.asarray(x, dtype=xp.float64).reshape(int(x.shape[0]), -1)


PRODUCT_WORK = 1 << 30
"""Multiply-adds of one block of a matrix product, unless :data:`MIN_SLICE`
makes it more: a server stops abandoned work between blocks (a Gram matrix
of 2048 samples of 8192 floats takes about a second on one core)."""

MIN_SLICE = 256
"""The fewest rows a block of a product takes. Each block reads the whole
other operand again (measured on one core, 2048 x 8192 float64: blocks of 64
rows took 1.37x one product, of 256 rows 1.04-1.06x)."""


def _slice(work: int) -> int:
    """Rows of a block, where each row takes ``work`` multiply-adds."""
    return max(MIN_SLICE, PRODUCT_WORK // max(1, work))


def _gram(xp: Any, x: Any) -> Any:
    """``x x^T`` in blocks of rows (the installed check before each). Each
    block's part below the diagonal is computed and mirrored (its diagonal
    block's too: a GPU's product need not be symmetric), so the result is
    exactly symmetric and costs what one symmetric product does."""
    b, d = int(x.shape[0]), int(x.shape[1])
    g = xp.empty((b, b), dtype=x.dtype)
    for block in blocks(b, _slice(b * d)):
        rows, below = x[block], slice(0, block.start)
        square = rows @ rows.T
        g[block, block] = xp.tril(square) + xp.tril(square, -1).T
        if block.start:
            g[block, below] = rows @ x[below].T
            g[below, block] = g[block, below].T
    return g


def _product(xp: Any, a: Any, b: Any) -> Any:
    """``a @ b`` in blocks of ``a``'s rows (the installed check before each)."""
    (m, k), n = a.shape, int(b.shape[1])
    out = xp.empty((int(m), n), dtype=xp.result_type(a, b))
    for rows in blocks(int(m), _slice(int(k) * n)):
        xp.matmul(a[rows], b, out=out[rows])
    return out


# ---------------------------------------------------------------- similarity-preserving


_SP_RULES = OPTIONS[LossKind.SIMILARITY_PRESERVING]


def _normalized_gram(xp: Any, x: Any, order: int) -> tuple[Any, Any, Any, Any]:
    """``(N, G, raw, norm)``: ``G = x x^T``, its rows' L1/L2 norms ``raw``,
    ``norm = max(raw, 1e-12)`` and ``N = G / norm`` (``F.normalize``)."""
    g = _gram(xp, x)
    raw = xp.abs(g).sum(axis=1) if order == 1 else xp.sqrt((g * g).sum(axis=1))
    norm = xp.maximum(raw, _NORMALIZE_EPS)
    return g / norm[:, None], g, raw, norm


def _normalize_backward(xp: Any, upstream: Any, n: Any, g: Any, raw: Any, norm: Any, order: int) -> Any:
    """``d / d G`` of a loss whose gradient in ``N = G / max(|G_i|_p, eps)`` is ``upstream``
    (rows ``G_i`` along the last axis).

    ``dN_ik / dG_ij = delta_jk / n_i - N_ik / n_i * d|G_i| / dG_ij``, where
    ``d|G_i|_2 / dG_ij = N_ij`` and ``d|G_i|_1 / dG_ij = sign(G_ij)``; a
    floored norm is a constant (as ``clamp_min``'s gradient is 0 there).
    """
    coefficient = xp.where(raw >= _NORMALIZE_EPS, (upstream * n).sum(axis=-1), 0.0)
    direction = n if order == 2 else xp.sign(g)
    return (upstream - coefficient[..., None] * direction) / norm[..., None]


def _sp_evaluate(xp: Any, teacher: Any, student: Any, params: Mapping[str, Any], gradient: bool) -> tuple[float, Any]:
    """Similarity-preserving KD (Tung and Mori, ICCV 2019).

    ``G = X X^T`` of the batch flattened to ``[B, D]``, each row divided by
    its L2 norm (``"l2"``, the paper) or L1 norm (``"l1"``, torchdistill's
    ``SPKDLoss``: ``normalize(G, 1)``), both floored at 1e-12 as
    ``F.normalize`` does; ``loss = ||N_t - N_s||_F^2 / B^2`` (the paper's
    ``1/b^2``, torchdistill's ``reduction="batchmean"``). A batch of 1 is
    refused: its one normalized entry is 1 whatever the inputs.
    """
    order = 1 if _resolve(_SP_RULES, params)["normalization"] == "l1" else 2
    t, s = _rows(xp, teacher), _rows(xp, student)
    b = t.shape[0]
    nt = _normalized_gram(xp, t, order)[0]
    ns, g, raw, norm = _normalized_gram(xp, s, order)
    diff = ns - nt
    value = float((diff * diff).sum()) / (b * b)
    if not gradient:
        return value, None
    diff *= 2.0 / (b * b)  # d loss / d N_s
    dg = _normalize_backward(xp, diff, ns, g, raw, norm, order)
    return value, _product(xp, dg + dg.T, s).reshape(student.shape)


# ---------------------------------------------------------------- linear CKA


def _centred_unit(xp: Any, x: Any, role: str) -> tuple[Any, float]:
    """``(y, k)``: ``x`` centred over the batch and divided by ``k = max |centred|``.

    The first sample is subtracted before the mean: differences of close
    samples are then exact, and a batch of identical samples centres to
    exactly 0 (the mean of equal numbers need not round to them). CKA is
    scale-free, so dividing by ``k`` only keeps the Gram matrices finite.
    """
    y = x - x[:1]
    y -= y.mean(axis=0)
    k = float(xp.abs(y).max())
    if k == 0:
        why = f"every {role} sample is the same (zero variance over the batch)"
        raise Undefined(role, f"linear CKA is undefined: {why}")
    y /= k
    return y, k


def _cka_evaluate(xp: Any, teacher: Any, student: Any, params: Mapping[str, Any], gradient: bool) -> tuple[float, Any]:
    """``1 - CKA`` with linear kernels (Kornblith et al., ICML 2019).

    With ``X``, ``Y`` the centred teacher and student batches,
    ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, computed through the
    ``B x B`` Gram matrices ``G_t = X X^T``, ``G_s = Y Y^T`` as
    ``<G_t, G_s> / (||G_t||_F ||G_s||_F)`` (widths may be large). Batches of 1 and 2
    are refused: after centring, one sample is 0 and two samples always give
    CKA 1.

    Raises:
        Undefined: every teacher (or student) sample is the same, so a
            centred batch is 0 and CKA is 0 / 0.
    """
    x, _ = _centred_unit(xp, _rows(xp, teacher), "teacher")
    y, scale = _centred_unit(xp, _rows(xp, student), "student")
    gt, gs = _gram(xp, x), _gram(xp, y)
    nt, ns = math.sqrt(float((gt * gt).sum())), math.sqrt(float((gs * gs).sum()))
    cka = float((gt * gs).sum()) / (nt * ns)
    if not gradient:
        return 1.0 - cka, None
    # d CKA / d G_s = (G_t / |G_t| - CKA G_s / |G_s|) / |G_s|; G_s = Y Y^T, Y = H S / scale.
    m = (gt / nt - (cka / ns) * gs) / ns
    dy = _product(xp, m, y)
    dy *= -2.0 / scale
    dy -= dy.mean(axis=0)  # H (already 0 up to rounding: M 1 = 0)
    return 1.0 - cka, dy.reshape(student.shape)


# ---------------------------------------------------------------- PKT

_PKT_RULES = OPTIONS[LossKind.PKT]


def _pkt_kernel(xp: Any, x: Any, eps: float, paper: bool) -> tuple[Any, Any, Any, Any]:
    """``(P, K_row_sums, u, |x|)``: the cosine kernel ``(u u^T + 1) / 2``
    with ``u = x / (|x| + eps)``, the paper's zero diagonal, rows normalized."""
    n = xp.sqrt((x * x).sum(axis=1))
    u = x / (n + eps)[:, None]
    k = (_gram(xp, u) + 1.0) / 2.0
    if paper:
        xp.fill_diagonal(k, 0.0)
    r = k.sum(axis=1)
    r = xp.where(r > 0, r, 1.0)  # a sample exactly opposite to all others: no neighbours
    return k / r[:, None], r, u, n


def _pkt_evaluate(xp: Any, teacher: Any, student: Any, params: Mapping[str, Any], gradient: bool) -> tuple[float, Any]:
    """Probabilistic knowledge transfer (Passalis and Tefas, ECCV 2018).

    The cosine kernel ``K(a, b) = (cos(a, b) + 1) / 2`` (norms as
    ``|x| + eps``), conditional probabilities ``p_{j|i} = K_ij / sum_k K_ik``
    of the teacher (``P``) and the student (``Q``), and
    ``sum_ij P_ij log((P_ij + eps) / (Q_ij + eps))``:

    - ``mode="paper"`` (default): ``k, j != i`` (a sample is not its own
      neighbour) and the loss summed over the batch, ``sum_i sum_{j != i}``,
      as the paper writes it (not divided by ``B``); needs 3 samples (with 2,
      each sample has one neighbour, of probability 1).
    - ``mode="code"``: the authors' code and torchdistill's ``PKTLoss``: the
      diagonal included and the mean over all ``B^2`` entries; needs 2.

    ``eps`` (1e-7) keeps both logarithms finite, as in the code, in both modes.
    """
    options = _resolve(_PKT_RULES, params)
    eps, paper = float(options["eps"]), options["mode"] == "paper"
    t, s = _rows(xp, teacher), _rows(xp, student)
    b = t.shape[0]
    weight = 1.0 if paper else 1.0 / (b * b)
    p = _pkt_kernel(xp, t, eps, paper)[0]
    q, r, u, n = _pkt_kernel(xp, s, eps, paper)
    value = weight * float((p * xp.log((p + eps) / (q + eps))).sum())
    if not gradient:
        return value, None
    dq = (-weight) * p / (q + eps)
    dk = (dq - (dq * q).sum(axis=1)[:, None]) / r[:, None]
    if paper:
        xp.fill_diagonal(dk, 0.0)
    du = _product(xp, (dk + dk.T) / 2.0, u)
    # u = s / (|s| + eps): du/ds = I / (|s| + eps) - s s^T / ((|s| + eps)^2 |s|) (0 at s = 0).
    radial = (du * s).sum(axis=1) / ((n + eps) ** 2 * xp.where(n > 0, n, 1.0))
    ds = du / (n + eps)[:, None] - radial[:, None] * s
    return value, ds.reshape(student.shape)


# ---------------------------------------------------------------- attention transfer

_AT_RULES = OPTIONS[LossKind.ATTENTION_TRANSFER]


def _attention(xp: Any, f: Any, power: float, code: bool, gradient: bool) -> tuple[Any, Any]:
    """``(a, da/df or None)``: ``a = sum_c |f_c|^p`` (the mean over ``c`` for
    ``code``), with at most one temporary of ``f``'s size besides the slope."""
    scale = 1.0 / f.shape[1] if code else 1.0
    slope = None
    if power == 2:
        a = xp.einsum("bcn,bcn->bn", f, f)
        if gradient:
            slope = 2.0 * f
    elif power == 1:
        a = xp.abs(f).sum(axis=1)
        if gradient:
            slope = xp.sign(f)
    else:
        m = xp.abs(f)
        if gradient:
            slope = xp.power(m, power - 1)
            a = xp.einsum("bcn,bcn->bn", slope, m)  # sum |f|^(p-1) |f|: no array of |f|^p
            xp.copysign(slope, f, out=slope)
            slope *= power
        else:
            a = xp.power(m, power, out=m).sum(axis=1)
    if code:
        a *= scale
        if slope is not None:
            slope *= scale
    return a, slope


def _at_evaluate(xp: Any, teacher: Any, student: Any, params: Mapping[str, Any], gradient: bool) -> tuple[float, Any]:
    """Attention transfer (Zagoruyko and Komodakis, ICLR 2017).

    Feature maps ``[B, C, spatial...]`` (channel counts may differ, spatial
    shapes must agree): the attention map ``a = sum_c |f_c|^p`` (``F^p_sum``,
    the paper; ``p`` default 2, from 1 to 16), flattened and divided by its L2
    norm (floored at 1e-12): ``q = a / |a|``.

    - ``mode="paper"`` (default): ``sum_i |q_t,i - q_s,i|_2 / B`` (eq. 2 per
      sample, averaged: torchdistill ``ATLoss(mode="paper")``).
    - ``mode="code"``: the authors' code, torchdistill's default:
      ``a = mean_c |f_c|^p``, the mean of ``(q_t - q_s)^2`` over ``B x HW``.

    A batch of 1 is fine: each sample is compared with its teacher. Where
    ``q_s,i = q_t,i`` exactly, the paper mode's gradient is 0 (the norm's
    subgradient torch uses).
    """
    options = _resolve(_AT_RULES, params)
    power, code = float(options["p"]), options["mode"] == "code"
    b = int(teacher.shape[0])
    ft = xp.asarray(teacher, dtype=xp.float64).reshape(b, int(teacher.shape[1]), -1)
    fs = xp.asarray(student, dtype=xp.float64).reshape(b, int(student.shape[1]), -1)
    at = _attention(xp, ft, power, code, False)[0]
    qt = at / xp.maximum(xp.sqrt((at * at).sum(axis=1)), _NORMALIZE_EPS)[:, None]
    a, slope = _attention(xp, fs, power, code, gradient)
    raw = xp.sqrt((a * a).sum(axis=1))
    norm = xp.maximum(raw, _NORMALIZE_EPS)
    qs = a / norm[:, None]
    diff = qs - qt
    if code:
        value = float((diff * diff).sum()) / diff.size
        upstream = diff * (2.0 / diff.size)
    else:
        distance = xp.sqrt((diff * diff).sum(axis=1))
        value = float(distance.sum()) / b
        upstream = diff / (b * xp.where(distance > 0, distance, math.inf))[:, None]
    if not gradient:
        return value, None
    da = _normalize_backward(xp, upstream, qs, a, raw, norm, 2)
    slope *= da[:, None, :]  # the gradient, in the slope's memory
    return value, slope.reshape(student.shape)


# ---------------------------------------------------------------- correlation congruence


def _unit(xp: Any, x: Any) -> tuple[Any, Any, Any]:
    """``(u, raw, norm)``: ``x`` along its last axis divided by ``norm = max(|x|_2, 1e-12)`` (``F.normalize``)."""
    raw = xp.sqrt((x * x).sum(axis=-1))
    norm = xp.maximum(raw, _NORMALIZE_EPS)
    return x / norm[..., None], raw, norm


_CC_RULES = OPTIONS[LossKind.CORRELATION_CONGRUENCE]


def _cc_matrix(xp: Any, g: Any, options: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(C, dC/dG)`` elementwise: ``G`` itself (bilinear), or the Gaussian RBF's
    Taylor series ``e^{-2 gamma} sum_{p <= P} (2 gamma)^p / p! G^p``."""
    if options["kernel"] == "bilinear":
        return g, None
    gamma, order = float(options["gamma"]), int(options["max_p"])
    c, slope, power = xp.ones_like(g), xp.zeros_like(g), xp.ones_like(g)
    for p in range(1, order + 1):
        factor = (2 * gamma) ** p / math.factorial(p)
        slope += (factor * p) * power  # power is G^{p-1}
        power = power * g
        c += factor * power
    scale = math.exp(-2 * gamma)
    return c * scale, slope * scale


def _cc_evaluate(xp: Any, teacher: Any, student: Any, params: Mapping[str, Any], gradient: bool) -> tuple[float, Any]:
    """Correlation congruence (Peng et al., ICCV 2019).

    The correlation matrix ``C = k(f_i, f_j)`` of the batch flattened to
    ``[B, D]``, with ``kernel="gaussian"`` (default) the ``max_p``-order
    Taylor series of the Gaussian RBF, ``e^{-2 gamma} sum_p (2 gamma)^p / p!
    (f_i . f_j)^p`` (``gamma`` 0.4, ``max_p`` 2, the paper's), or
    ``kernel="bilinear"``, ``f_i . f_j``:

    - ``mode="paper"`` (default): samples L2-normalized first (the series is
      ``exp(-gamma |f_i - f_j|^2)``'s only for unit vectors), and
      ``||C_t - C_s||_F^2 / B^2``;
    - ``mode="code"``: ``CCKDLoss(reduction="batchmean")``: raw
      features, and the norm itself, not squared: ``||C_t - C_s||_F / B^2``
      (its gradient is 0 where ``C_t = C_s``).

    A batch of 1 is refused: its one correlation compares a sample with itself.
    """
    options = _resolve(_CC_RULES, params)
    paper = options["mode"] == "paper"
    t, s = _rows(xp, teacher), _rows(xp, student)
    b = t.shape[0]
    ct = _cc_matrix(xp, _gram(xp, _unit(xp, t)[0] if paper else t), options)[0]
    u, raw, norm = _unit(xp, s) if paper else (s, None, None)
    cs, slope = _cc_matrix(xp, _gram(xp, u), options)
    diff = cs - ct
    squares = float((diff * diff).sum())
    value = squares / (b * b) if paper else math.sqrt(squares) / (b * b)
    if not gradient:
        return value, None
    if paper:
        diff *= 2.0 / (b * b)
    else:
        diff *= 1.0 / (b * b * math.sqrt(squares)) if squares > 0 else 0.0
    if slope is not None:
        diff *= slope  # d loss / d G
    du = _product(xp, diff + diff.T, u)
    ds = _normalize_backward(xp, du, u, None, raw, norm, 2) if paper else du
    return value, ds.reshape(student.shape)


# ---------------------------------------------------------------- neural selectivity transfer

_NST_RULES = OPTIONS[LossKind.NST]

NST_MAX_CHANNELS = 2048
"""The most channels NST takes: it compares channels pairwise, ``C x C``
float64 per sample (32 MiB at this size, a few at once)."""

_NST_BLOCK = 1 << 22
"""Elements of the channel-kernel matrices NST builds at once (a block of samples)."""


def _nst_work(teacher: tuple[int, ...], student: tuple[int, ...]) -> int:
    """NST's channel kernels: ``batch x (Ct^2 + Cs^2 + Ct Cs)`` entries, each a
    dot product over the spatial positions plus a fixed cost (about 40
    multiply-adds' worth, measured with one position)."""
    batch, ct, cs = teacher[0], teacher[1], student[1]
    return batch * (ct * ct + cs * cs + ct * cs) * (math.prod(teacher[2:]) + 40)


MAX_WORK: dict[str, tuple[Callable[[tuple[int, ...], tuple[int, ...]], int], int]] = {"nst": (_nst_work, 1 << 34)}
"""Losses whose work grows faster than their inputs and beyond what their batch
and size limits bound: ``(work(teacher_shape, student_shape), the most
work)``, about 1.7e10 multiply-adds (a few seconds of one core). A batch of
8192 samples of 2048 channels would otherwise keep a worker for minutes."""


def _nst_channels(teacher: tuple[int, ...], student: tuple[int, ...], _: dict[str, Any]) -> str | None:
    for role, shape in (("teacher", teacher), ("student", student)):
        if shape[1] > NST_MAX_CHANNELS:
            return f"NST takes at most {NST_MAX_CHANNELS} channels, not {shape[1]} (the {role}'s)"
    return None


def _nst_evaluate(xp: Any, teacher: Any, student: Any, params: Mapping[str, Any], gradient: bool) -> tuple[float, Any]:
    """Neural selectivity transfer (Huang and Wang, 2017), as RepDistiller's ``NSTLoss``.

    Per sample, each channel's spatial map is a point, L2-normalized
    (``F.normalize``, floor 1e-12); the loss is the squared MMD between the
    teacher's ``C_t`` and the student's ``C_s`` points with the polynomial
    kernel ``k(x, y) = (x . y + c)^degree`` (``degree`` 2, ``c`` 0: the
    paper's choice): ``mean k(t, t') + mean k(s, s') - 2 mean k(s, t)``,
    averaged over the batch. Channel counts may differ (at most
    :data:`NST_MAX_CHANNELS`); spatial shapes must agree (RepDistiller
    pools the larger map: pool it before sending). A batch of 1 is fine.
    """
    options = _resolve(_NST_RULES, params)
    degree, c = int(options["degree"]), float(options["c"])
    b = int(teacher.shape[0])
    ut = _unit(xp, xp.asarray(teacher, dtype=xp.float64).reshape(b, int(teacher.shape[1]), -1))[0]
    us, raw, norm = _unit(xp, xp.asarray(student, dtype=xp.float64).reshape(b, int(student.shape[1]), -1))
    n_t, n_s = ut.shape[1], us.shape[1]
    grad = xp.empty_like(us) if gradient else None
    total = 0.0
    step = max(1, _NST_BLOCK // (n_t * n_t + n_s * n_s + n_s * n_t))
    for block in blocks(b, step):
        bt, bs = ut[block], us[block]
        factors: dict[bool, Any] = {}  # is the other side the student -> d loss / d kernel
        for (x, y), weight in zip(
            ((bt, bt), (bs, bs), (bs, bt)), (1 / n_t**2, 1 / n_s**2, -2 / (n_s * n_t)), strict=True
        ):
            k = x @ y.transpose(0, 2, 1)
            k += c
            total += weight * float((k**degree).sum())
            if grad is not None and x is bs:  # d/dk of the term: weight degree k^(degree - 1) / B
                xp.power(k, degree - 1, out=k)
                k *= weight * degree / b
                factors[y is bs] = k
        if grad is not None:
            upstream = factors[False] @ bt
            upstream += (factors[True] + factors[True].transpose(0, 2, 1)) @ bs
            grad[block] = _normalize_backward(xp, upstream, bs, None, raw[block], norm[block], 2)
    value = total / b
    return value, None if grad is None else grad.reshape(student.shape)


# ---------------------------------------------------------------- relational KD

_RKD_RULES = OPTIONS[LossKind.RKD]

_RKD_BLOCK = 1 << 22
"""Elements of the ``anchors x B x B`` angle arrays RKD builds at once."""

_COINCIDENT = 1e-12
"""Two samples are coincident for RKD's angles when ``|x_i - x_j|^2`` is at
most this times ``|x_i|^2 + |x_j|^2`` (centred): closer than about 1e-6 of
their norms, where the Gram form's rounding (about 1e-16 of the squared
norms) would be a sizeable part of the difference."""


def _huber(xp: Any, diff: Any) -> float:
    """``sum smooth_l1(diff)`` (``beta`` 1); ``diff`` becomes its derivative ``clip(diff, -1, 1)``."""
    magnitude = xp.abs(diff)
    clipped = xp.minimum(magnitude, 1.0)
    value = 0.5 * float((clipped * clipped).sum()) + float((magnitude - clipped).sum())
    xp.clip(diff, -1.0, 1.0, out=diff)
    return value


class _Geometry:
    """A batch's pairwise squared distances and the unit difference vectors' Gram form.

    Computed from the Gram matrix ``G`` of the centred batch (distances and
    angles do not move with the batch; centring keeps ``G`` small relative
    to the distances). ``sq_ij = G_ii + G_jj - 2 G_ij``; torchdistill's
    ``pdist`` clamps it at 1e-12 before the root. For angles,
    ``e_ij = x_j - x_i``, ``u_ij = 1 / max(|e_ij|, 1e-12)`` (0 for ``j = i``)
    and ``<e_ij, e_ik> = G_jk - G_ij - G_ik + G_ii``.
    """

    def __init__(self, xp: Any, x: Any) -> None:
        self.xp = xp
        self.x = x - x[:1]
        self.x -= self.x.mean(axis=0)
        self.g = _gram(xp, self.x)
        self.diagonal = xp.diagonal(self.g).copy()
        self.sq = self.diagonal[:, None] + self.diagonal[None, :] - 2.0 * self.g

    def distances(self) -> tuple[Any, Any, float]:
        """``(d / mean d, clamped, mean d)``: torchdistill's normalized ``pdist``."""
        xp, b = self.xp, self.g.shape[0]
        clamped = self.sq < 1e-12
        d = xp.sqrt(xp.maximum(self.sq, 1e-12))
        xp.fill_diagonal(d, 0.0)
        mean = float(d.sum()) / (b * (b - 1))
        return d / mean, clamped, mean

    def inverse_lengths(self) -> tuple[Any, Any]:
        """``(u, free)``: ``u_ij = 1 / max(|e_ij|, 1e-12)``, 0 for coincident samples
        (``i = j`` included); ``free``: where ``u`` depends on ``sq`` (not coincident, not floored)."""
        xp = self.xp
        length = xp.sqrt(xp.maximum(self.sq, 0.0))
        coincident = self.sq <= _COINCIDENT * (self.diagonal[:, None] + self.diagonal[None, :])
        free = (length >= _NORMALIZE_EPS) & ~coincident
        u = xp.where(coincident, 0.0, 1.0 / xp.maximum(length, _NORMALIZE_EPS))
        return u, free

    def angles(self, block: slice, u: Any) -> Any:
        """``A_ijk = <e_ij, e_ik> u_ij u_ik`` for the anchors ``i`` in ``block``."""
        g, a = self.g, self.g[None, :, :] - self.g[block, :, None]
        a -= g[block, None, :]
        a += self.diagonal[block, None, None]
        a *= u[block, :, None]
        a *= u[block, None, :]
        return a


def _rkd_evaluate(xp: Any, teacher: Any, student: Any, params: Mapping[str, Any], gradient: bool) -> tuple[float, Any]:
    """Relational knowledge distillation (Park et al., CVPR 2019), as torchdistill's ``RKDLoss``.

    ``distance_weight * L_D + angle_weight * L_A`` (defaults 1 and 2, the
    paper's) over the batch flattened to ``[B, D]``, with the smooth L1 loss
    (``beta`` 1) averaged, as the authors' code and torchdistill do, over
    all ``B^2`` pairs and ``B^3`` triplets (the paper writes sums; its
    weights are for these means):

    - ``L_D``: distances ``|x_i - x_j|`` divided by their mean over the
      ``B (B - 1)`` pairs ``i != j`` (the diagonal is 0);
    - ``L_A``: the cosines ``<e_ij, e_ik> / (|e_ij| |e_ik|)`` of the angles at
      each ``x_i``, ``e_ij = x_j - x_i`` (0 where ``j`` or ``k`` is ``i``).

    Computed from the centred batch's Gram matrix (``B^3`` work, not
    torchdistill's ``B^2 D``), angles in blocks of anchors. That form cannot
    resolve the direction between two samples closer than about 1e-6 of
    their norms: such coincident pairs have no direction (their cosines are
    0 and pass no gradient). For identical samples torchdistill gives the
    same cosines, 0, but a gradient of about 1e12 (``F.normalize``'s floor
    on a zero difference); the other samples' gradients are the same.
    Needs 3 samples: with 2, both terms are constant.
    """
    options = _resolve(_RKD_RULES, params)
    w_distance, w_angle = float(options["distance_weight"]), float(options["angle_weight"])
    t, s = _Geometry(xp, _rows(xp, teacher)), _Geometry(xp, _rows(xp, student))
    b = s.g.shape[0]
    value = 0.0
    dsq = xp.zeros_like(s.g)  # d loss / d sq_ij
    dg = xp.zeros_like(s.g)  # d loss / d G, beyond what goes through sq
    if w_distance:
        ds, clamped, mean = s.distances()
        diff = ds - t.distances()[0]
        value += w_distance * _huber(xp, diff) / (b * b)
        if gradient:
            diff *= w_distance / (b * b)  # d loss / d (d / mean d)
            dd = (diff - float((diff * ds).sum()) / (b * (b - 1))) / mean
            xp.fill_diagonal(dd, 0.0)
            dsq += xp.where(clamped, 0.0, dd / (2.0 * ds * mean + clamped))
    if w_angle:
        ut, us = t.inverse_lengths()[0], s.inverse_lengths()
        step = max(1, _RKD_BLOCK // (b * b))
        for block in blocks(b, step):
            a = s.angles(block, us[0])
            h = a - t.angles(block, ut)
            value += w_angle * _huber(xp, h) / b**3
            if not gradient:
                continue
            h *= w_angle / b**3  # d loss / d A
            a *= h
            # u_ij dL/du_ij = sum_k h A_ijk + sum_k h A_ikj; du/dsq = -u^3 / 2.
            radial = a.sum(axis=2) + a.sum(axis=1)
            dsq[block] -= xp.where(us[1][block], 0.5 * us[0][block] ** 2 * radial, 0.0)
            h *= us[0][block, :, None]
            h *= us[0][block, None, :]  # d loss / d <e_ij, e_ik>
            dg += h.sum(axis=0)
            dg[block] -= h.sum(axis=2) + h.sum(axis=1)
            dg[block, block] += xp.diag(h.sum(axis=(1, 2)))
    if not gradient:
        return value, None
    # sq_ij = G_ii + G_jj - 2 G_ij
    dg -= 2.0 * dsq
    dg += xp.diag(dsq.sum(axis=1) + dsq.sum(axis=0))
    dx = _product(xp, dg + dg.T, s.x)
    dx -= dx.mean(axis=0)
    return value, dx.reshape(student.shape)


# ---------------------------------------------------------------- logits

_KD_RULES = OPTIONS[LossKind.KD]
_DIST_RULES = OPTIONS[LossKind.DIST]
_LSKD_RULES = OPTIONS[LossKind.LOGIT_STANDARDIZED_KD]

_SMALL_GAP = 1e-2
"""KL positions whose logit gaps ``(s - t) / tau``, centred, are all at most
this get the forms accurate relative to the gap (see :func:`_softmax_kl`);
wider gaps do not cancel enough to need them."""

_PEARSON_EPS = 1e-8
"""DIST's floor of each centred vector's norm (torchdistill's ``eps``, passed to ``cosine_similarity``)."""

_STANDARDIZE_EPS = 1e-7
"""Logit standardization's ``eps`` in ``(x - mean) / (eps + std)`` (the authors' code and torchdistill's)."""


def _log_softmax(xp: Any, x: Any) -> Any:
    """``log softmax(x)`` over axis 1 (stable: the maximum subtracted first)."""
    y = x - x.max(axis=1, keepdims=True)
    y -= xp.log(xp.exp(y).sum(axis=1, keepdims=True))
    return y


def _expm1_minus(x: Any) -> Any:
    """``exp(x) - 1 - x`` for ``|x| <= 2 _SMALL_GAP``, to a relative 1e-17: its
    Taylor series ``sum_{k >= 2} x^k / k!`` to ``k = 8`` (``expm1(x) - x`` would
    cancel down to an absolute accuracy of ``ulp(x)``)."""
    y = x * (1 / math.factorial(8))
    for k in range(7, 1, -1):
        y += 1 / math.factorial(k)
        y *= x
    return y * x


def _softmax_kl(xp: Any, t: Any, s: Any, tau: float, gradient: bool) -> tuple[float, Any | None]:
    """``(sum of KL(p || q), q - p or None)``: ``p = softmax(t / tau)``,
    ``q = softmax(s / tau)`` over axis 1, the KL summed over every other position.

    Through log-softmax, ``KL = sum_c p (log p - log q)``: finite and exact
    where a probability underflows. Where a position's gaps
    ``d = (s - t) / tau``, centred by their mean under ``p``, are all at most
    :data:`_SMALL_GAP`, the two distributions nearly agree and both forms
    would cancel; there ``e = log q - log p = d - log1p(sum_c p expm1(d))``,
    ``KL = sum_c p (exp(e) - 1 - e)`` (nonnegative terms, since
    ``sum_c p exp(e) = 1``) and ``q - p = p expm1(e)``, accurate relative to
    the gap.
    """
    lp, lq = _log_softmax(xp, t / tau), _log_softmax(xp, s / tau)
    p = xp.exp(lp)
    kl = (p * (lp - lq)).sum(axis=1)
    diff = xp.exp(lq) - p if gradient else None
    d = (s - t) / tau
    d -= (p * d).sum(axis=1, keepdims=True)
    small = xp.abs(d).max(axis=1, keepdims=True) <= _SMALL_GAP
    if bool(small.any()):
        d = xp.where(small, d, 0.0)
        d -= xp.log1p((p * xp.expm1(d)).sum(axis=1, keepdims=True))  # e = log q - log p
        kl = xp.where(small[:, 0], (p * _expm1_minus(d)).sum(axis=1), kl)
        if diff is not None:
            diff = xp.where(small, p * xp.expm1(d), diff)
    return float(kl.sum()), diff


def _kd_evaluate(xp: Any, teacher: Any, student: Any, params: Mapping[str, Any], gradient: bool) -> tuple[float, Any]:
    """Knowledge distillation (Hinton et al., 2015) as torchdistill's ``KDLoss`` soft term, times ``tau^2``.

    Logits ``[B, C, ...]`` of equal shapes; ``p = softmax(t / tau)`` and
    ``q = softmax(s / tau)`` over the classes, axis 1;
    ``tau^2 sum KL(p || q) / B``, the KL summed over every other position
    (``KLDivLoss(reduction="batchmean")``, which divides by the batch size
    whatever the rank). torchdistill's ``KDLoss`` returns the soft term
    without ``tau^2`` (it applies ``tau^2`` only when mixing in the
    cross-entropy of targets); the paper's ``tau^2`` keeps the gradient's
    scale across temperatures. ``d / d s = tau (q - p) / B``.
    """
    tau = float(_resolve(_KD_RULES, params)["temperature"])
    t, s = xp.asarray(teacher, dtype=xp.float64), xp.asarray(student, dtype=xp.float64)
    b = int(t.shape[0])
    total, diff = _softmax_kl(xp, t, s, tau, gradient)
    value = tau * tau * total / b
    if diff is None:
        return value, None
    diff *= tau / b
    return value, diff.reshape(student.shape)


def _softmax(xp: Any, x: Any) -> Any:
    """``softmax(x)`` over axis 1."""
    y = xp.exp(x - x.max(axis=1, keepdims=True))
    y /= y.sum(axis=1, keepdims=True)
    return y


def _pearson(xp: Any, x: Any, y: Any, axis: int, gradient: bool) -> tuple[Any, Any | None]:
    """``(r, d sum(r) / dx or None)``: Pearson correlations of ``x`` and ``y`` along ``axis``,
    as ``cosine_similarity`` of the centred vectors (``eps`` :data:`_PEARSON_EPS`).

    PyTorch (2.x) divides each vector by its norm floored at ``eps``,
    ``r = <x, y> / (max(|x|, eps) max(|y|, eps))``, and floors the norms
    out of autograd's sight: a floored norm still passes the gradient of the
    true norm, ``x / |x|`` (0 where ``|x| = 0``), which this reproduces.
    """
    xc = x - x.mean(axis=axis, keepdims=True)
    yc = y - y.mean(axis=axis, keepdims=True)
    nx = xp.sqrt((xc * xc).sum(axis=axis, keepdims=True))
    floored_x = xp.maximum(nx, _PEARSON_EPS)
    floored_y = xp.maximum(xp.sqrt((yc * yc).sum(axis=axis, keepdims=True)), _PEARSON_EPS)
    r = (xc * yc).sum(axis=axis, keepdims=True) / (floored_x * floored_y)
    if not gradient:
        return r, None
    # dr/dxc = yc / (|x|' |y|') - r / |x|' * xc / |x|; centring: subtract the mean along the axis.
    dx = yc / (floored_x * floored_y) - (r / floored_x) * xc / xp.where(nx > 0, nx, math.inf)
    dx -= dx.mean(axis=axis, keepdims=True)
    return r, dx


def _dist_evaluate(xp: Any, teacher: Any, student: Any, params: Mapping[str, Any], gradient: bool) -> tuple[float, Any]:
    """DIST (Huang et al., NeurIPS 2022), as torchdistill's ``DISTLoss``.

    Logits ``[B, C]`` of equal shapes; ``p_t``, ``p_s`` the softmaxes of
    ``t / tau`` and ``s / tau`` over the classes;
    ``tau^2 (beta (1 - mean_i r(p_s[i, :], p_t[i, :])) + gamma (1 - mean_c r(p_s[:, c], p_t[:, c])))``
    with ``r`` the Pearson correlation: the inter-class relation of each
    sample's distribution and the intra-class relation of each class over
    the batch. ``r`` is ``cosine_similarity`` of the centred vectors, each
    norm floored at 1e-8 as PyTorch does (:func:`_pearson`): a class whose
    probability is the same for every sample (to about 1e-8) has ``r``
    near 0 and a large gradient, as under autograd. A term whose factor is 0
    is skipped. The intra-class term needs 3 samples: the correlation of
    two samples' centred columns, ``(u, -u)`` and ``(v, -v)``, is always 1 or
    -1 (a loss without gradient), and of one sample's, 0 / 0; with
    ``gamma = 0`` one sample is fine.
    """
    options = _resolve(_DIST_RULES, params)
    tau = float(options["temperature"])
    t, s = xp.asarray(teacher, dtype=xp.float64), xp.asarray(student, dtype=xp.float64)
    pt, ps = _softmax(xp, t / tau), _softmax(xp, s / tau)
    value = 0.0
    dp = xp.zeros_like(ps) if gradient else None  # d loss / d p_s
    for axis, weight in ((1, float(options["beta"])), (0, float(options["gamma"]))):
        if weight == 0:
            continue
        r, dr = _pearson(xp, ps, pt, axis, gradient)
        value += weight * tau * tau * (1.0 - float(r.mean()))
        if dp is not None:
            dp -= (weight * tau * tau / r.size) * dr
    if dp is None:
        return value, None
    # softmax: dz = p (dp - <dp, p>), and z = s / tau.
    dp -= (dp * ps).sum(axis=1, keepdims=True)
    dp *= ps
    dp /= tau
    return value, dp.reshape(student.shape)


def _standardize(xp: Any, x: Any) -> tuple[Any, Any]:
    """``(z, std)``: ``z = (x - mean) / (1e-7 + std)`` per row, ``std`` unbiased (``C - 1``).

    The squares are taken of the centred row divided by its largest
    magnitude, so logits beyond 1e154 standardize without overflow.
    """
    c = x - x.mean(axis=1, keepdims=True)
    k = xp.abs(c).max(axis=1, keepdims=True)
    k = xp.where(k > 0, k, 1.0)
    u = c / k
    std = k * xp.sqrt((u * u).sum(axis=1, keepdims=True) / (x.shape[1] - 1))
    return c / (_STANDARDIZE_EPS + std), std


def _lskd_evaluate(xp: Any, teacher: Any, student: Any, params: Mapping[str, Any], gradient: bool) -> tuple[float, Any]:
    """Logit-standardized KD (Sun et al., CVPR 2024): KD of z-scored logits.

    Logits ``[B, C]`` of equal shapes, each row standardized over the
    classes, ``z = (x - mean) / (1e-7 + std)`` with the unbiased ``std``
    (``torch.std``'s default, as the authors' code); then
    ``tau^2 sum_i KL(softmax(z_t,i / tau) || softmax(z_s,i / tau)) / B``
    (``tau`` default 2). The ``tau^2`` is the paper's and its code's
    (``loss_kd *= temperature**2``); torchdistill's ``LogitStdKDLoss``
    without targets returns the KL without it, so this is ``tau^2`` times
    torchdistill's value. A constant student row has ``std`` 0, ``z`` 0 and
    the gradient ``dz / 1e-7`` centred (the std's gradient masked, as
    PyTorch's). Needs 2 classes: the unbiased std of one is 0 / 0.
    """
    tau = float(_resolve(_LSKD_RULES, params)["temperature"])
    t, s = xp.asarray(teacher, dtype=xp.float64), xp.asarray(student, dtype=xp.float64)
    b, classes = int(t.shape[0]), int(t.shape[1])
    zt = _standardize(xp, t)[0]
    zs, std = _standardize(xp, s)
    total, dz = _softmax_kl(xp, zt, zs, tau, gradient)
    value = tau * tau * total / b
    if dz is None:
        return value, None
    dz *= tau / b  # d loss / d z_s
    # z = c / (eps + std), d std / d c = c / ((C - 1) std): dc = dz / (eps + std) - <dz, z> z / ((C - 1) std).
    dc = dz / (_STANDARDIZE_EPS + std)
    dc -= (dz * zs).sum(axis=1, keepdims=True) * zs / ((classes - 1) * xp.where(std > 0, std, math.inf))
    dc -= dc.mean(axis=1, keepdims=True)
    return value, dc.reshape(student.shape)


def _logit_classes(title: str, why: str) -> Callable[[tuple[int, ...], tuple[int, ...], dict[str, Any]], str | None]:
    """A logit loss's last check: equal shapes, and at least 2 classes (axis 1)."""

    def check(teacher: tuple[int, ...], student: tuple[int, ...], _: dict[str, Any]) -> str | None:
        if teacher != student:
            return f"{title} needs logits of equal shapes: teacher {_shape(teacher)}, student {_shape(student)}"
        if teacher[1] < 2:
            return f"{title} needs at least 2 classes (axis 1), not {teacher[1]}: {why}"
        return None

    return check


_CONSTANT_SOFTMAX = "the softmax of a single class is 1 whatever the logits"


# ---------------------------------------------------------------- the table


def _at_least(count: int, reason: str) -> Callable[[dict[str, Any]], tuple[int, str]]:
    return lambda _: (count, reason)


def _dist_minimum(options: dict[str, Any]) -> tuple[int, str]:
    if options["gamma"] == 0:
        return 1, "the batch is empty"
    why = "the intra-class correlations are over the batch: of 2 samples always 1 or -1, of 1 sample 0 / 0"
    return 3, f"{why} (gamma = 0 drops them)"


def _pkt_minimum(options: dict[str, Any]) -> tuple[int, str]:
    if options["mode"] == "paper":
        return 3, "without its own sample, each of 2 has a single neighbour, of probability 1"
    return 2, "a batch of 1 has no pairs to compare"


LOSSES: dict[str, Relational] = {
    "similarity_preserving": Relational(
        _checker(
            "similarity_preserving",
            "similarity-preserving KD",
            _SP_RULES,
            _at_least(2, "a batch of 1 has no pairs to compare"),
        ),
        _quiet(_sp_evaluate),
        _resolve(_SP_RULES, {}),
    ),
    "linear_cka": Relational(
        _checker(
            "linear_cka",
            "linear CKA",
            {},
            _at_least(3, "centred over the batch, 1 sample is all zeros and 2 samples always give CKA 1"),
        ),
        _quiet(_cka_evaluate),
        {},
    ),
    "pkt": Relational(
        _checker("pkt", "PKT", _PKT_RULES, _pkt_minimum), _quiet(_pkt_evaluate), _resolve(_PKT_RULES, {})
    ),
    "attention_transfer": Relational(
        _checker(
            "attention_transfer",
            "attention transfer",
            _AT_RULES,
            _at_least(1, "the batch is empty"),
            rank=3,
            spatial=True,
        ),
        _quiet(_at_evaluate),
        _resolve(_AT_RULES, {}),
    ),
    "correlation_congruence": Relational(
        _checker(
            "correlation_congruence",
            "correlation congruence",
            _CC_RULES,
            _at_least(2, "a batch of 1 has no pairs to compare"),
        ),
        _quiet(_cc_evaluate),
        _resolve(_CC_RULES, {}),
    ),
    "nst": Relational(
        _checker("nst", "NST", _NST_RULES, _at_least(1, "the batch is empty"), 3, True, _nst_channels),
        _quiet(_nst_evaluate),
        _resolve(_NST_RULES, {}),
    ),
    "rkd": Relational(
        _checker(
            "rkd",
            "RKD",
            _RKD_RULES,
            _at_least(3, "normalized distances and angles of 2 samples are constant"),
        ),
        _quiet(_rkd_evaluate),
        _resolve(_RKD_RULES, {}),
    ),
    "kd": Relational(
        _checker(
            "kd",
            "KD",
            _KD_RULES,
            _at_least(1, "the batch is empty"),
            extra=_logit_classes("KD", _CONSTANT_SOFTMAX),
            layout="[batch, classes, ...]",
        ),
        _quiet(_kd_evaluate),
        _resolve(_KD_RULES, {}),
    ),
    "dist": Relational(
        _checker(
            "dist",
            "DIST",
            _DIST_RULES,
            _dist_minimum,
            extra=_logit_classes("DIST", _CONSTANT_SOFTMAX),
            layout="[batch, classes]",
            exact=True,
        ),
        _quiet(_dist_evaluate),
        _resolve(_DIST_RULES, {}),
    ),
    "logit_standardized_kd": Relational(
        _checker(
            "logit_standardized_kd",
            "logit-standardized KD",
            _LSKD_RULES,
            _at_least(1, "the batch is empty"),
            extra=_logit_classes("logit-standardized KD", "the unbiased standard deviation of one class is 0 / 0"),
            layout="[batch, classes]",
            exact=True,
        ),
        _quiet(_lskd_evaluate),
        _resolve(_LSKD_RULES, {}),
    ),
}
"""The batch losses (relational and logit) by name."""
