"""DistillService over loopback against a bare gRPC call with the same bytes.

Part 1 times ``ComputeTotalLoss`` (one layer, MSE, float32) through
``DistillClient`` against a bare grpcio server that parses the same request
and computes the MSE with one NumPy ``dot`` (bench/bare_server.py), both
measured in this run, client and server on this machine. Part 2 times the
engine's losses against NumPy's textbook float32 expressions in-process.

    python bench/bench_loopback.py [--repeats N] [--sizes 1K,1M,16M,64M]

Prints a Markdown table (medians) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from distill.v1 import distill_pb2 as pb
from distill.v1 import distill_pb2_grpc as pb_grpc
from distill_client import DistillClient, DistilLoss, Reduction
from distill_server import engine

LIMIT = 512 * 1024 * 1024
SIZES = {"1K": 1 << 10, "1M": 1 << 20, "16M": 16 << 20, "64M": 64 << 20}


def median_seconds(fn: Callable[[], object], repeats: int, budget: float = 20.0) -> float:
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (time.perf_counter() - start < budget or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def start_distill_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill_server", "--port", "0", "--device", "cpu", "--max-message-mb", "512"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        match = re.search(r"ready on (\S+)", line)
        if match:
            return proc, match.group(1)
    raise RuntimeError("distill-server did not start")


def start_bare_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("bare_server.py"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, f"127.0.0.1:{int(proc.stdout.readline())}"


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def features(name: str) -> tuple[int, np.ndarray, np.ndarray]:
    """Element count and a teacher/student pair of float32 for a payload size."""
    n = SIZES[name] // 4
    rng = np.random.default_rng(0)
    return n, rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)


def row(label: str, ours: Callable[[], object], bare: Callable[[], object], n: int, repeats: int) -> str:
    """A table row: both medians and their ratio (fewer repeats for big payloads)."""
    reps = repeats if n < (1 << 22) else max(5, repeats // 10)
    a, b = median_seconds(ours, reps), median_seconds(bare, reps)
    return f"| {label} | {fmt(a)} | {fmt(b)} | {a / b:.2f}x |"


def measure(client: DistillClient, stub: pb_grpc.DistillServiceStub, name: str, repeats: int) -> str:
    """One table row: ``ComputeTotalLoss`` of one MSE layer, ours against bare."""
    n, t, s = features(name)
    layers = [(1.0, DistilLoss.mse())]

    def ours() -> float:
        return client.compute_total_loss(layers, [t], [s]).total

    def bare_call() -> float:
        request = pb.ComputeTotalLossRequest(
            layers=[pb.Layer(weight=1.0, loss=pb.Loss(mse=pb.Loss.Mse()))],
            teachers=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n], data=t.tobytes())],
            students=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n], data=s.tobytes())],
        )
        return float(stub.ComputeTotalLoss(request).total_loss)

    assert abs(ours() - bare_call()) <= 1e-3 * abs(ours())  # the bare dot sums in float32
    return row(f"2 x {name}B", ours, bare_call, n, repeats)


def measure_gradients(client: DistillClient, stub: pb_grpc.DistillServiceStub, name: str, repeats: int) -> str:
    """One table row: ``ComputeLayerLoss`` with the MSE gradient coming back."""
    n, t, s = features(name)
    layers = [(1.0, DistilLoss.mse())]

    def ours() -> np.ndarray:
        gradient = client.compute_layer_loss(layers, 0, t, s, gradients=True).gradient
        assert gradient is not None
        return gradient

    def bare_call() -> np.ndarray:
        request = pb.ComputeLayerLossRequest(
            layers=[pb.Layer(weight=1.0, loss=pb.Loss(mse=pb.Loss.Mse()))],
            teacher=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n], data=t.tobytes()),
            student=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n], data=s.tobytes()),
        )
        data = stub.ComputeLayerLoss(request).layer_loss.student_gradient.data
        return np.frombuffer(data, dtype=np.float32)

    np.testing.assert_allclose(ours(), bare_call(), rtol=1e-5, atol=1e-12)
    return row(f"2 x {name}B in, {name}B gradient out", ours, bare_call, n, repeats)


def transport(sizes: list[str], repeats: int) -> list[str]:
    distill, distill_target = start_distill_server()
    bare, bare_target = start_bare_server()
    rows = [
        "| payload | DistillService | bare gRPC, same bytes | ratio |",
        "|---|---|---|---|",
    ]
    try:
        client = DistillClient(distill_target, max_message_bytes=LIMIT)
        channel = grpc.insecure_channel(
            bare_target,
            options=[("grpc.max_send_message_length", LIMIT), ("grpc.max_receive_message_length", LIMIT)],
        )
        stub = pb_grpc.DistillServiceStub(channel)
        for name in sizes:
            rows.append(measure(client, stub, name, repeats))
            print(rows[-1], file=sys.stderr)
        for name in sizes:
            rows.append(measure_gradients(client, stub, name, repeats))
            print(rows[-1], file=sys.stderr)
        client.close()
        channel.close()
    finally:
        distill.terminate()
        distill.wait()
        assert bare.stdin is not None
        bare.stdin.close()
        bare.wait()
    return rows


def compute(repeats: int) -> list[str]:
    n = 16 << 20
    rng = np.random.default_rng(1)
    t = rng.normal(size=n).astype(np.float32)
    s = rng.normal(size=n).astype(np.float32)

    def numpy_kl() -> float:
        a, b = t / 2.0, s / 2.0
        log_p = a - a.max() - np.log(np.exp(a - a.max()).sum())
        log_q = b - b.max() - np.log(np.exp(b - b.max()).sum())
        return float(4.0 * (np.exp(log_p) * (log_p - log_q)).sum())

    per_row = DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW)

    def numpy_row_kl(t2: np.ndarray, s2: np.ndarray) -> float:
        a, b = t2 / 2.0, s2 / 2.0
        log_p = a - a.max(1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
        log_q = b - b.max(1, keepdims=True)
        log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
        return float(4.0 * (np.exp(log_p) * (log_p - log_q)).sum(1).mean())

    cases = [
        ("MSE", lambda: engine.loss_value(DistilLoss.mse(), t, s), lambda: float(np.mean((t - s) ** 2))),
        (
            "cosine",
            lambda: engine.loss_value(DistilLoss.cosine(), t, s),
            lambda: float(1 - np.dot(t, s) / (np.linalg.norm(t) * np.linalg.norm(s))),
        ),
        ("KL (tau 2)", lambda: engine.loss_value(DistilLoss.kl_divergence(2.0), t, s), numpy_kl),
        (
            "KL (tau 2) per row, 512 x 32768",
            lambda: engine.loss_value(per_row, t.reshape(512, -1), s.reshape(512, -1)),
            lambda: numpy_row_kl(t.reshape(512, -1), s.reshape(512, -1)),
        ),
    ]
    gb = 2 * t.nbytes / 1e9
    rows = [
        "| loss (2 x 64 MiB float32) | engine (float64 accumulation) | NumPy textbook float32 | engine / NumPy time |",
        "|---|---|---|---|",
    ]
    for name, ours, theirs in cases:
        a, b = median_seconds(ours, repeats), median_seconds(theirs, repeats)
        rows.append(f"| {name} | {fmt(a)} ({gb / a:.1f} GB/s) | {fmt(b)} ({gb / b:.1f} GB/s) | {a / b:.2f}x |")
        print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--skip-compute", action="store_true")
    args = parser.parse_args()
    print(
        f"Python {platform.python_version()}, numpy {np.__version__}, grpcio {grpc.__version__}, {platform.machine()}"
    )
    print()
    print("\n".join(transport(args.sizes.split(","), args.repeats)))
    if not args.skip_compute:
        print()
        print("\n".join(compute(max(5, args.repeats // 10))))


if __name__ == "__main__":
    main()
