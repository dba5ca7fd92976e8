"""The CPU loss engine against this machine's memory, measured in the same run.

Each loss on 2 x 64 MiB of features (``engine.loss_value``, float64
accumulation) and with its gradient (``engine.evaluate``), against two
baselines over the same bytes: a memcpy (``np.copyto``, bytes read) and a
one-pass float32 sum (``np.add.reduce``, the fastest a loss could read its
inputs here); NumPy's textbook float32 expression of each loss alongside.
Cases run in interleaved rounds after a warm-up, so a slow spell of a shared
machine lands on all of them; the table shows medians.

    python bench/bench_engine.py [--rounds 7] [--mib 64]

Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

# One OpenBLAS thread, as distill-server runs (set before NumPy loads OpenBLAS): with two, every
# block's dot product wakes a second thread, and the engine measured 2-4x slower here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import ml_dtypes
import numpy as np

from distill_client import DistilLoss, Reduction
from distill_server import engine

ROWS = 512
"""Rows of the per-row cases (each row then 32768 wide at 64 MiB of float32)."""


def textbook_kl(t: np.ndarray, s: np.ndarray, tau: float = 2.0) -> float:
    a, b = t / tau, s / tau
    log_p = a - a.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = b - b.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return float(tau * tau * (np.exp(log_p) * (log_p - log_q)).sum(-1).mean())


def textbook_cosine(t: np.ndarray, s: np.ndarray) -> float:
    dots = (t * s).sum(-1)
    return float((1 - dots / (np.linalg.norm(t, axis=-1) * np.linalg.norm(s, axis=-1))).mean())


CASES: list[tuple[str, DistilLoss, str, bool, Callable[[np.ndarray, np.ndarray], float] | None]] = [
    ("MSE", DistilLoss.mse(), "float32", False, lambda t, s: float(np.mean((t - s) ** 2))),
    ("cosine", DistilLoss.cosine(), "float32", False, textbook_cosine),
    ("KL (tau 2)", DistilLoss.kl_divergence(2.0), "float32", False, textbook_kl),
    ("KL+MSE (tau 2)", DistilLoss.combined(0.5, 0.5, 2.0), "float32", False, None),
    ("cosine per row", DistilLoss.cosine(reduction=Reduction.PER_ROW), "float32", True, textbook_cosine),
    ("KL per row (tau 2)", DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW), "float32", True, textbook_kl),
    ("MSE", DistilLoss.mse(), "float16", False, None),
    ("KL (tau 2)", DistilLoss.kl_divergence(2.0), "float16", False, None),
    ("MSE", DistilLoss.mse(), "bfloat16", False, None),
    ("KL (tau 2)", DistilLoss.kl_divergence(2.0), "bfloat16", False, None),
]

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mib", type=int, default=64, help="MiB of float32 per input")
    args = parser.parse_args()
    n = args.mib * (1 << 20) // 4
    rng = np.random.default_rng(1)
    base = {"t": rng.normal(size=n).astype(np.float32)}
    base["s"] = (base["t"] + rng.normal(size=n).astype(np.float32)).astype(np.float32)
    arrays = {name: (base["t"].astype(dtype), base["s"].astype(dtype)) for name, dtype in DTYPES.items()}
    both = np.concatenate([base["t"], base["s"]])
    copy = np.empty_like(both)

    timings: dict[str, list[float]] = {}

    def timed(key: str, fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        fn()
        timings.setdefault(key, []).append(time.perf_counter() - start)

    end = time.perf_counter() + 2  # let the clocks settle
    while time.perf_counter() < end:
        engine.loss_value(DistilLoss.mse(), *arrays["float32"])
    for _ in range(args.rounds):
        timed("memcpy", lambda: np.copyto(copy, both))
        timed("sum", lambda: np.add.reduce(both))
        for index, (_, loss, dtype, per_row, textbook) in enumerate(CASES):
            t, s = arrays[dtype]
            if per_row:
                t, s = t.reshape(ROWS, -1), s.reshape(ROWS, -1)
            timed(f"{index}/value", lambda loss=loss, t=t, s=s: engine.loss_value(loss, t, s))
            timed(f"{index}/gradient", lambda loss=loss, t=t, s=s: engine.evaluate(loss, t, s, 1.0))
            if textbook is not None:
                timed(f"{index}/textbook", lambda f=textbook, t=t, s=s: f(t, s))

    median = {key: statistics.median(values) for key, values in timings.items()}
    read = 2 * base["t"].nbytes / 1e9
    sum_rate = read / median["sum"]
    print(f"Baselines over 2 x {args.mib} MiB of float32 (bytes read per second):")
    print(f"memcpy {read / median['memcpy']:.1f} GB/s; one-pass sum {sum_rate:.1f} GB/s.\n")
    print("| loss | dtype | engine | of the sum's rate | with gradient | NumPy textbook float32 |")
    print("|---|---|---|---|---|---|")
    for index, (label, _, dtype, _, textbook) in enumerate(CASES):
        nbytes = 2 * arrays[dtype][0].nbytes / 1e9
        value, gradient = median[f"{index}/value"], median[f"{index}/gradient"]
        theirs = f"{nbytes / median[f'{index}/textbook']:.1f} GB/s" if textbook is not None else "-"
        share = f"{100 * nbytes / value / sum_rate:.0f}%"
        print(
            f"| {label} | {dtype} | {value * 1e3:.0f} ms, {nbytes / value:.2f} GB/s | {share} "
            f"| {gradient * 1e3:.0f} ms, {nbytes / gradient:.2f} GB/s | {theirs} |"
        )


if __name__ == "__main__":
    main()
