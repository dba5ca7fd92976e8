"""The engine's sums and gradients as fused CUDA kernels (CuPy ``RawModule``).

The engine (:mod:`distill_server.engine`) defines the math once: what sums
each loss takes per row, how they become a value and per-row gradient
factors. On the CPU it takes those sums block by block with NumPy; on a GPU
these kernels take them in one pass over the inputs:

- :func:`row_sums`: every sum a loss needs, per row, accumulated in float64
  from the inputs' own dtype (float32, float16 or float64), each block of
  threads reducing one segment of a row, then one small launch merging the
  segments. KL's log-sum-exps are online (a running maximum rescales the
  sums), as in the NumPy engine, so one read of each input suffices.
- :func:`gradient`: the second pass, ``mse (s - t) + alpha t + beta s +
  (gamma q - gamma p)`` per element from the per-row factors, written
  straight into the gradient's dtype, with the largest magnitude reduced on
  the way (the engine's overflow check).

Each combination of terms and dtypes is compiled once (NVRTC, cached by
CuPy on disk) the first time it is used; the server's warm-up compiles the
common ones.
"""

from __future__ import annotations

import decimal
import functools
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BLOCKS_PER_SM", "FIELDS", "THREADS", "Sums", "gradient", "grid", "row_sums", "source"]

THREADS = 256
"""Threads per block."""

BLOCKS_PER_SM = 16
"""Blocks launched per multiprocessor for one call: enough loads in flight to
stream from HBM at full speed; rows are split into segments to get there."""

FIELDS = ("sq", "tt", "ss", "ts", "ma", "za", "w", "mb", "zb", "gap", "v")
"""Every per-row sum, in kernel order (see ``engine._Sums`` for their meaning)."""

_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double", np.dtype(np.float16): "__half"}

_GRID_Y = 65535
"""CUDA's largest grid height: more rows are taken in strides of it."""


def _exp_constants() -> dict[str, str]:
    """The table and reduction constants of the kernels' ``exp_neg``, computed
    to 60 digits and rounded once to float64."""
    with decimal.localcontext() as context:
        context.prec = 60
        ln2 = decimal.Decimal(2).ln()
        step = ln2 / 256
        mantissa, exponent = math.frexp(float(step))
        high = math.ldexp(math.floor(mantissa * 2**32) / 2**32, exponent)  # k * high is exact for |k| < 2**21
        table = ", ".join(repr(float(decimal.Decimal(2) ** (decimal.Decimal(j) / 256))) for j in range(256))
        return {
            "EXP_TABLE_VALUES": table,
            "EXP_N_OVER_LN2": repr(float(256 / ln2)),
            "EXP_LN2_N_HI": repr(high),
            "EXP_LN2_N_LO": repr(float(step - decimal.Decimal(high))),
        }


_SOURCE = r"""
#include <cuda_fp16.h>

#define NEG_INF (-__longlong_as_double(0x7ff0000000000000LL))
#define NAN_BITS 0x7ff8000000000000ULL

/* exp(x) for the engine's x <= 0 (exponents relative to a maximum), to about
   1 ulp in fewer operations than exp(): x = (k / 256) ln 2 + r with
   |r| <= ln 2 / 512 (Cody-Waite, ln 2 / 256 split in two), then
   exp(x) = 2^(k >> 8) * 2^((k & 255) / 256) * (1 + expm1(r)), the middle
   factor from a table of correctly rounded values in shared memory and
   expm1(r) from four Taylor terms (error below 4e-17). Below -708, where
   exp(x) < 1e-307 can no longer move a sum that holds a 1, it is 0; NaN
   stays NaN. Kernels that use it first call load_exp_table(). */
__device__ const double EXP_TABLE[256] = {EXP_TABLE_VALUES};
__shared__ double exp_table[256];

__device__ __forceinline__ void load_exp_table() {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) exp_table[i] = EXP_TABLE[i];
    __syncthreads();
}

__device__ __forceinline__ double exp_neg(double x) {
    if (x < -708.0) return 0.0;
    double k = rint(x * EXP_N_OVER_LN2);
    double r = fma(-k, EXP_LN2_N_HI, x);
    r = fma(-k, EXP_LN2_N_LO, r);
    int n = (int)k;
    double p = r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0))));
    double tj = exp_table[n & 255];
    return fma(tj, p, tj) * __longlong_as_double((long long)((n >> 8) + 1023) << 52);
}

__device__ __forceinline__ double load(const float* p, long long i) { return (double)__ldg(p + i); }
__device__ __forceinline__ double load(const double* p, long long i) { return __ldg(p + i); }
__device__ __forceinline__ double load(const __half* p, long long i) { return (double)__half2float(__ldg(p + i)); }
__device__ __forceinline__ void store(float* p, long long i, double v) { p[i] = (float)v; }
__device__ __forceinline__ void store(double* p, long long i, double v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, long long i, double v) { p[i] = __double2half(v); }

__device__ __forceinline__ void init(double* f) {
    #pragma unroll
    for (int k = 0; k < NF; ++k) f[k] = 0.0;
#if KL
    f[I_MA] = NEG_INF;
    f[I_MB] = NEG_INF;
#endif
}

/* A group of N elements, t and s as loaded (divided by the row's scales, if
   any). KL's maxima move once per group, so the group's exponentials do not
   wait on each other. */
template <int N>
__device__ __forceinline__ void update(double* f, const double* t, const double* s, double inv_tau) {
#if MSE
    double sq = 0.0;
    #pragma unroll
    for (int i = 0; i < N; ++i) { double d = s[i] - t[i]; sq += d * d; }
    f[I_SQ] += sq;
#endif
#if COS
    double tt = 0.0, ss = 0.0, ts = 0.0;
    #pragma unroll
    for (int i = 0; i < N; ++i) { tt += t[i] * t[i]; ss += s[i] * s[i]; ts += t[i] * s[i]; }
    f[I_TT] += tt; f[I_SS] += ss; f[I_TS] += ts;
#endif
#if KL
    double a[N], b[N], top = NEG_INF, bottom = NEG_INF;
    #pragma unroll
    for (int i = 0; i < N; ++i) {
        a[i] = t[i] * inv_tau;
        b[i] = s[i] * inv_tau;
        top = fmax(top, a[i]);
        bottom = fmax(bottom, b[i]);
    }
    if (top > f[I_MA]) {  /* a new maximum: earlier sums rescale to it */
        double r = exp_neg(f[I_MA] - top);
        f[I_ZA] *= r;
        f[I_W] *= r;
#if KLGRAD
        f[I_V] *= r;
#endif
        f[I_MA] = top;
    }
    if (bottom > f[I_MB]) {
        f[I_ZB] *= exp_neg(f[I_MB] - bottom);
        f[I_MB] = bottom;
    }
    double za = 0.0, w = 0.0, zb = 0.0;
#if KLGRAD
    double v = 0.0;
#endif
    #pragma unroll
    for (int i = 0; i < N; ++i) {
        double e = exp_neg(a[i] - f[I_MA]);  /* NaN for a NaN input, or a row of -inf */
        za += e;
        w += e * (a[i] - b[i]);
        zb += exp_neg(b[i] - f[I_MB]);
#if KLGRAD
        double d = (s[i] - t[i]) * inv_tau;
        v += e * expm1(d);
        f[I_GAP] = fmax(f[I_GAP], fabs(d));
#endif
    }
    f[I_ZA] += za;
    f[I_W] += w;
    f[I_ZB] += zb;
#if KLGRAD
    f[I_V] += v;
#endif
#endif
}

/* f <- f merged with g (sums add; log-sum-exps rescale to the larger maximum). */
__device__ __forceinline__ void merge(double* f, const double* g) {
#if MSE
    f[I_SQ] += g[I_SQ];
#endif
#if COS
    f[I_TT] += g[I_TT]; f[I_SS] += g[I_SS]; f[I_TS] += g[I_TS];
#endif
#if KL
    double top = fmax(f[I_MA], g[I_MA]);
    double rf = f[I_MA] == NEG_INF ? 0.0 : exp_neg(f[I_MA] - top);
    double rg = g[I_MA] == NEG_INF ? 0.0 : exp_neg(g[I_MA] - top);
    f[I_ZA] = f[I_ZA] * rf + g[I_ZA] * rg;
    f[I_W] = f[I_W] * rf + g[I_W] * rg;
#if KLGRAD
    f[I_V] = f[I_V] * rf + g[I_V] * rg;
    f[I_GAP] = fmax(f[I_GAP], g[I_GAP]);
#endif
    f[I_MA] = top;
    double bottom = fmax(f[I_MB], g[I_MB]);
    double sf = f[I_MB] == NEG_INF ? 0.0 : exp_neg(f[I_MB] - bottom);
    double sg = g[I_MB] == NEG_INF ? 0.0 : exp_neg(g[I_MB] - bottom);
    f[I_ZB] = f[I_ZB] * sf + g[I_ZB] * sg;
    f[I_MB] = bottom;
#endif
}

/* Merge the block's accumulators into thread 0's. */
__device__ __forceinline__ void block_merge(double* f) {
    __shared__ double lanes[32][NF];
    double g[NF];
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        #pragma unroll
        for (int k = 0; k < NF; ++k) g[k] = __shfl_down_sync(0xffffffffu, f[k], offset);
        merge(f, g);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        #pragma unroll
        for (int k = 0; k < NF; ++k) lanes[warp][k] = f[k];
    }
    __syncthreads();
    if (warp == 0) {
        if (lane < (int)(blockDim.x >> 5)) {
            #pragma unroll
            for (int k = 0; k < NF; ++k) f[k] = lanes[lane][k];
        } else {
            init(f);
        }
        #pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            #pragma unroll
            for (int k = 0; k < NF; ++k) g[k] = __shfl_down_sync(0xffffffffu, f[k], offset);
            merge(f, g);
        }
    }
    __syncthreads();  /* lanes is reused by the next row */
}

/* Block (x, y) reduces segment x of rows y, y + gridDim.y, ... into
   partials[(field * rows + row) * gridDim.x + x]. */
extern "C" __global__ void row_sums(const T_TYPE* __restrict__ t, const S_TYPE* __restrict__ s,
                                    long long rows, long long width, long long segment, double inv_tau,
                                    const double* __restrict__ kt, const double* __restrict__ ks,
                                    double* __restrict__ partials) {
#if KL
    load_exp_table();
#endif
    const long long step = blockDim.x;
    for (long long row = blockIdx.y; row < rows; row += gridDim.y) {
        const T_TYPE* tr = t + row * width;
        const S_TYPE* sr = s + row * width;
        long long begin = blockIdx.x * segment;
        long long end = min(begin + segment, width);
#if SCALED
        const double ut = kt[row], us = ks[row];
#define LOAD_T(j) (load(tr, j) / ut)
#define LOAD_S(j) (load(sr, j) / us)
#else
#define LOAD_T(j) load(tr, j)
#define LOAD_S(j) load(sr, j)
#endif
        double f[NF];
        init(f);
        long long j = begin + threadIdx.x;
        for (; j + 3 * step < end; j += 4 * step) {
            double tv[4], sv[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                tv[i] = LOAD_T(j + i * step);
                sv[i] = LOAD_S(j + i * step);
            }
            update<4>(f, tv, sv, inv_tau);
        }
        for (; j < end; j += step) {
            double tv = LOAD_T(j), sv = LOAD_S(j);
            update<1>(f, &tv, &sv, inv_tau);
        }
#undef LOAD_T
#undef LOAD_S
        block_merge(f);
        if (threadIdx.x == 0) {
            #pragma unroll
            for (int k = 0; k < NF; ++k) partials[(k * rows + row) * gridDim.x + blockIdx.x] = f[k];
        }
    }
}

/* Block y merges the `segments` partials of rows y, y + gridDim.x, ... into out[field * rows + row]. */
extern "C" __global__ void finish(const double* __restrict__ partials, long long rows, int segments,
                                  double* __restrict__ out) {
#if KL
    load_exp_table();
#endif
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        double f[NF], g[NF];
        init(f);
        for (int x = threadIdx.x; x < segments; x += blockDim.x) {
            #pragma unroll
            for (int k = 0; k < NF; ++k) g[k] = partials[(k * rows + row) * segments + x];
            merge(f, g);
        }
        block_merge(f);
        if (threadIdx.x == 0) {
            #pragma unroll
            for (int k = 0; k < NF; ++k) out[k * rows + row] = f[k];
        }
    }
}

/* out = mse (s - t) + alpha t + beta s + (gamma q - gamma p), per element, from
   per-row factors; peak = the largest |out| before rounding (NaN if any is). */
extern "C" __global__ void gradient(const T_TYPE* __restrict__ t, const S_TYPE* __restrict__ s,
                                    G_TYPE* __restrict__ out, long long rows, long long width, long long segment,
                                    double mse, const double* __restrict__ alpha, const double* __restrict__ beta,
                                    const double* __restrict__ kt, const double* __restrict__ ks,
                                    double inv_tau, const double* __restrict__ ma, const double* __restrict__ mb,
                                    const double* __restrict__ p_unit, const double* __restrict__ q_unit,
                                    const double* __restrict__ delta, const unsigned char* __restrict__ small,
                                    unsigned long long* peak) {
#if KL
    load_exp_table();
#endif
    double top = 0.0;
    bool nan = false;
    for (long long row = blockIdx.y; row < rows; row += gridDim.y) {
        long long begin = blockIdx.x * segment;
        long long end = min(begin + segment, width);
        long long base = row * width;
#if COS
        const double al = alpha[row], be = beta[row];
#endif
#if SCALED
        const double ut = kt[row], us = ks[row];
#endif
#if KL
        const double mar = ma[row], mbr = mb[row], pu = p_unit[row], qu = q_unit[row], de = delta[row];
        const bool sm = small[row] != 0;
#endif
        for (long long j = begin + threadIdx.x; j < end; j += blockDim.x) {
            double tv = load(t, base + j), sv = load(s, base + j);
#if SCALED
            tv /= ut;
            sv /= us;
#endif
            double g = 0.0;
#if MSE
            g = (sv - tv) * mse;
#endif
#if COS
            g = tv * al + sv * be;
#endif
#if KL
            double gp = pu * exp_neg(tv * inv_tau - mar);
            double k = sm ? gp * expm1((sv - tv) * inv_tau - de) : qu * exp_neg(sv * inv_tau - mbr) - gp;
            g += k;
#endif
            store(out, base + j, g);
            nan |= (g != g);
            top = fmax(top, fabs(g));
        }
    }
    unsigned long long bits = nan ? NAN_BITS : (unsigned long long)__double_as_longlong(top);
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        unsigned long long other = __shfl_down_sync(0xffffffffu, bits, offset);
        bits = other > bits ? other : bits;  /* |x| as bits orders like |x|; NaN above infinity */
    }
    if ((threadIdx.x & 31) == 0) atomicMax(peak, bits);
}
"""


@dataclass(frozen=True)
class Sums:
    """Which sums a kernel takes: the loss's terms, and KL's gradient extras."""

    mse: bool
    cosine: bool
    kl: bool
    kl_gradient: bool = False

    @property
    def fields(self) -> tuple[str, ...]:
        """The per-row sums taken, in kernel order."""
        wanted = {"sq": self.mse, "tt": self.cosine, "ss": self.cosine, "ts": self.cosine}
        wanted |= {name: self.kl for name in ("ma", "za", "w", "mb", "zb")}
        wanted |= {"gap": self.kl and self.kl_gradient, "v": self.kl and self.kl_gradient}
        return tuple(name for name in FIELDS if wanted[name])


def source(sums: Sums, t: Any, s: Any, g: Any, scaled: bool) -> str:
    """The CUDA source for these sums and element types (``g``: the gradient's, or None)."""
    defines = {
        "NF": max(len(sums.fields), 1),
        "MSE": int(sums.mse),
        "COS": int(sums.cosine),
        "KL": int(sums.kl),
        "KLGRAD": int(sums.kl and sums.kl_gradient),
        "SCALED": int(scaled),
        "T_TYPE": _TYPES[np.dtype(t)],
        "S_TYPE": _TYPES[np.dtype(s)],
        "G_TYPE": _TYPES[np.dtype(g if g is not None else np.float64)],
    }
    defines |= {f"I_{name.upper()}": index for index, name in enumerate(sums.fields)}
    defines |= _EXP_CONSTANTS
    return "".join(f"#define {key} {value}\n" for key, value in defines.items()) + _SOURCE


_EXP_CONSTANTS = _exp_constants()
_modules: dict[tuple[Any, ...], Any] = {}
_lock = threading.Lock()


def _module(sums: Sums, t: Any, s: Any, g: Any, scaled: bool) -> Any:
    key = (sums, np.dtype(t), np.dtype(s), None if g is None else np.dtype(g), scaled)
    with _lock:
        module = _modules.get(key)
        if module is None:
            import cupy

            module = cupy.RawModule(code=source(sums, t, s, g, scaled), options=("-std=c++17",))
            _modules[key] = module
    return module


@functools.cache
def _processors(device: int) -> int:
    import cupy

    return int(cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device))


def grid(rows: int, width: int, processors: int) -> tuple[int, int]:
    """``(segments per row, segment length)`` for rows of ``width``: about
    BLOCKS_PER_SM blocks per multiprocessor, a row split into segments of at
    least a block's threads, none empty."""
    wanted = math.ceil(processors * BLOCKS_PER_SM / max(rows, 1))
    segments = max(1, min(wanted, math.ceil(width / THREADS)))
    segment = max(1, math.ceil(width / segments))
    return max(1, math.ceil(width / segment)), segment


def _grid(rows: int, width: int) -> tuple[int, int]:
    import cupy

    return grid(rows, width, _processors(cupy.cuda.runtime.getDevice()))


def _per_row(arrays: list[Any]) -> list[Any]:
    """Per-row float64 values on the device, for a kernel's arguments: those
    on the host go in one copy; None stays None."""
    import cupy

    out = list(arrays)
    host = [i for i, x in enumerate(arrays) if x is not None and not isinstance(x, cupy.ndarray)]
    if host:
        stacked = cupy.asarray(np.stack([np.asarray(arrays[i], dtype=np.float64).reshape(-1) for i in host]))
        for row, i in enumerate(host):
            out[i] = stacked[row]
    return [None if x is None else cupy.ascontiguousarray(x, dtype=cupy.float64) for x in out]


def row_sums(
    sums: Sums, t: Any, s: Any, tau: float, kt: Any = None, ks: Any = None, *, host: bool = False
) -> dict[str, Any]:
    """Each per-row sum of ``sums`` over the ``(rows, width)`` arrays ``t, s``:
    float64 arrays of one value per row, by field name, on the device, or
    with ``host`` in NumPy (all fetched in one copy).

    ``kt, ks``: per-row divisors applied as the rows are loaded, or None.
    """
    import cupy

    t, s = cupy.ascontiguousarray(t), cupy.ascontiguousarray(s)
    rows, width = int(t.shape[0]), int(t.shape[1])
    scaled = kt is not None
    kt, ks = _per_row([kt, ks])
    module = _module(sums, t.dtype, s.dtype, None, scaled)
    count = max(len(sums.fields), 1)
    segments, segment = _grid(rows, width)
    partials = cupy.empty(count * rows * segments, dtype=cupy.float64)
    unused = cupy.empty(1, dtype=cupy.float64)
    module.get_function("row_sums")(
        (segments, min(rows, _GRID_Y)),
        (THREADS,),
        (
            t,
            s,
            np.int64(rows),
            np.int64(width),
            np.int64(segment),
            np.float64(1.0 / tau),
            kt if scaled else unused,
            ks if scaled else unused,
            partials,
        ),
    )
    if segments == 1:
        out = partials
    else:
        out = cupy.empty(count * rows, dtype=cupy.float64)
        module.get_function("finish")(
            (min(rows, _GRID_Y),), (THREADS,), (partials, np.int64(rows), np.int32(segments), out)
        )
    out = out.reshape(count, rows)
    if host:
        out = out.get()
    return {name: out[index] for index, name in enumerate(sums.fields)}


def gradient(
    sums: Sums,
    t: Any,
    s: Any,
    out: Any,
    tau: float,
    *,
    mse: float = 0.0,
    alpha: Any = None,
    beta: Any = None,
    kt: Any = None,
    ks: Any = None,
    ma: Any = None,
    mb: Any = None,
    p_unit: Any = None,
    q_unit: Any = None,
    delta: Any = None,
    small: Any = None,
) -> float:
    """Write the gradient of ``(rows, width)`` arrays ``t, s`` into ``out``
    (contiguous, any supported dtype) from per-row factors (see
    ``engine._Factors``); returns its largest magnitude before rounding, NaN
    if some element is NaN."""
    import cupy

    rows, width = int(t.shape[0]), int(t.shape[1])
    t, s = cupy.ascontiguousarray(t), cupy.ascontiguousarray(s)
    if not out.flags.c_contiguous:
        raise ValueError("the gradient is written into a contiguous array")
    scaled = kt is not None
    module = _module(Sums(sums.mse, sums.cosine, sums.kl), t.dtype, s.dtype, out.dtype, scaled)
    segments, segment = _grid(rows, width)
    unused = cupy.empty(1, dtype=cupy.float64)
    if sums.kl and small is None:
        small = np.zeros(rows, dtype=bool)
    alpha, beta, kt, ks, ma, mb, p_unit, q_unit, delta, small = _per_row(
        [alpha, beta, kt, ks, ma, mb, p_unit, q_unit, delta, small]
    )
    peak = cupy.zeros(1, dtype=cupy.uint64)

    def row(x: Any) -> Any:
        return unused if x is None else x

    module.get_function("gradient")(
        (segments, min(rows, _GRID_Y)),
        (THREADS,),
        (
            t,
            s,
            out,
            np.int64(rows),
            np.int64(width),
            np.int64(segment),
            np.float64(mse),
            row(alpha),
            row(beta),
            row(kt),
            row(ks),
            np.float64(1.0 / tau),
            row(ma),
            row(mb),
            row(p_unit),
            row(q_unit),
            row(delta),
            cupy.empty(1, dtype=cupy.uint8) if small is None else (small != 0).astype(cupy.uint8),
            peak,
        ),
    )
    return float(peak.view(cupy.float64).get()[0])
