"""DistillService over loopback against a bare gRPC call with the same bytes.

Part 1 times ``ComputeTotalLoss`` (one layer, MSE, float32) through
``DistillClient(transport="grpc")`` against a bare grpcio server that parses
the same request and computes the MSE with one NumPy ``dot``
(bench/bare_server.py), both measured in this run, client and server on
this machine. The shared-memory table times the same calls through
``transport="shm"`` (the client copies the arrays into a registered region)
and through arrays of ``DistillClient.shared_arrays`` (no copy), against a
raw TCP socket carrying the same bytes to a NumPy MSE (bench/raw_server.py,
the floor) and the bare gRPC call above, with a memcpy of the same bytes and
the engine's own time alongside. The engine alone, against this machine's
memory: bench/bench_engine.py.

    python bench/bench_loopback.py [--repeats N] [--sizes 1K,1M,16M,64M] [--shm-sizes 1M,16M,64M]

Prints Markdown tables (medians) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from raw_server import GRADIENT, HEADER, receive_into

from distill.v1 import distill_pb2 as pb
from distill.v1 import distill_pb2_grpc as pb_grpc
from distill_client import DistillClient, DistilLoss
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


def settled_median(fn: Callable[[], object], repeats: int) -> float:
    """:func:`median_seconds` after a pause: NumPy's OpenBLAS threads spin for
    about 0.1 s after a call (here and in the servers), which would otherwise
    land on whatever is timed next."""
    time.sleep(0.3)
    return median_seconds(fn, repeats)


def start_distill_server(device: str = "cpu") -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill_server", "--port", "0", "--device", device, "--max-message-mb", "512"],
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


def start_raw_server() -> tuple[subprocess.Popen[str], tuple[str, int]]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("raw_server.py"))],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},  # as distill-server sets it: the same BLAS on both
    )
    assert proc.stdout is not None
    return proc, ("127.0.0.1", int(proc.stdout.readline()))


class RawClient:
    """The client side of the floor: the arrays' own buffers go to ``sendall``
    (no copy), answers are received with ``recv_into``."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.connection = socket.create_connection(address)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._answer = bytearray(8)

    def _send(self, t: np.ndarray, s: np.ndarray, flags: int) -> float:
        self.connection.sendall(HEADER.pack(t.size, flags))
        self.connection.sendall(t)
        self.connection.sendall(s)
        if not receive_into(self.connection, memoryview(self._answer)):
            raise ConnectionError("the raw server closed the connection")
        return float(struct.unpack("<d", self._answer)[0])

    def mse(self, t: np.ndarray, s: np.ndarray) -> float:
        return self._send(t, s, 0)

    def gradient(self, t: np.ndarray, s: np.ndarray) -> np.ndarray:
        self._send(t, s, GRADIENT)
        out = np.empty(t.size, dtype=np.float32)  # a new array, as a DistillService call returns
        if not receive_into(self.connection, memoryview(out)):
            raise ConnectionError("the raw server closed the connection")
        return out

    def close(self) -> None:
        self.connection.close()


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def features(name: str) -> tuple[int, np.ndarray, np.ndarray]:
    """Element count and a teacher/student pair of float32 for a payload size."""
    n = SIZES[name] // 4
    rng = np.random.default_rng(0)
    return n, rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)


def row(label: str, ours: Callable[[], object], bare: Callable[[], object], n: int, repeats: int) -> tuple[str, float]:
    """A table row: both medians and their ratio (fewer repeats for big
    payloads); and the bare call's median."""
    reps = repeats if n < (1 << 22) else max(5, repeats // 10)
    a, b = median_seconds(ours, reps), median_seconds(bare, reps)
    return f"| {label} | {fmt(a)} | {fmt(b)} | {a / b:.2f}x |", b


def measure(client: DistillClient, stub: pb_grpc.DistillServiceStub, name: str, repeats: int) -> tuple[str, float]:
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


def measure_gradients(
    client: DistillClient, stub: pb_grpc.DistillServiceStub, name: str, repeats: int
) -> tuple[str, float]:
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


SHARED_HEADER = [
    '| payload | raw TCP + NumPy (floor) | bare gRPC | transport="shm" (copied in) | shared_arrays (no copy) '
    "| shm / floor | no copy / floor | bare / shm | bare / no copy | memcpy of the same bytes | engine alone |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def measure_shared(client: DistillClient, raw: RawClient, name: str, bare: float, repeats: int, gradients: bool) -> str:
    """One row of the shared-memory table: the floor, ``transport="shm"``
    (arrays copied into a pooled region), arrays of ``shared_arrays`` (no
    copy), a memcpy of the bytes the call carries (np.copyto into an existing
    buffer: the inputs, and the gradient) and the engine alone, in-process;
    each timed back to back like part 1, with the bare gRPC call's median
    from part 1."""
    n, t, s = features(name)
    layers = [(1.0, DistilLoss.mse())]
    mse = DistilLoss.mse()
    st, ss = client.shared_arrays([(n,), (n,)], dtype=np.float32)
    np.copyto(st, t)
    np.copyto(ss, s)
    copies = 3 if gradients else 2
    target = np.ones(copies * n, dtype=np.float32)  # pages touched: a copy into memory in use

    def memcpy() -> None:
        for i, source in enumerate((t, s, t)[:copies]):
            np.copyto(target[i * n : (i + 1) * n], source)

    def call(a: np.ndarray, b: np.ndarray) -> Callable[[], object]:
        if gradients:
            return lambda: client.compute_layer_loss(layers, 0, a, b, gradients=True).gradient
        return lambda: client.compute_total_loss(layers, [a], [b]).total

    fns: dict[str, Callable[[], object]] = {
        "floor": (lambda: raw.gradient(t, s)) if gradients else (lambda: raw.mse(t, s)),
        "shm": call(t, s),
        "none": call(st, ss),
        "memcpy": memcpy,
        "engine": lambda: engine.evaluate(mse, t, s, 1.0 if gradients else None),
    }
    if gradients:  # the same gradient every way (the floor's is computed in float32)
        expected = raw.gradient(t, s)
        for a, b in ((t, s), (st, ss)):
            np.testing.assert_allclose(call(a, b)(), expected, rtol=1e-5, atol=1e-12)
        del expected
    else:  # the same loss every way (the floor sums in float32)
        value = client.compute_total_loss(layers, [t], [s]).total
        assert client.compute_total_loss(layers, [st], [ss]).total == value
        assert abs(raw.mse(t, s) - value) <= 1e-3 * value
    reps = repeats if n < (1 << 22) else max(10, repeats // 2)
    times = {key: settled_median(fn, reps) for key, fn in fns.items()}
    del st, ss  # the region is released once its arrays are gone
    floor, shm, none = times["floor"], times["shm"], times["none"]
    label = f"2 x {name}B in, {name}B gradient out" if gradients else f"2 x {name}B"
    return (
        f"| {label} | {fmt(floor)} | {fmt(bare)} | {fmt(shm)} | {fmt(none)} | {shm / floor:.2f}x | {none / floor:.2f}x "
        f"| {bare / shm:.1f}x | {bare / none:.1f}x | {fmt(times['memcpy'])} | {fmt(times['engine'])} |"
    )


def transport(sizes: list[str], shm_sizes: list[str], repeats: int) -> tuple[list[str], list[str]]:
    """Part 1's table and the shared-memory table, from one set of servers."""
    distill, distill_target = start_distill_server()
    bare, bare_target = start_bare_server()
    raw, raw_address = start_raw_server()
    rows = [
        "| payload | DistillService | bare gRPC, same bytes | ratio |",
        "|---|---|---|---|",
    ]
    shared_rows = list(SHARED_HEADER)
    try:
        client = DistillClient(distill_target, max_message_bytes=LIMIT, transport="grpc")
        channel = grpc.insecure_channel(
            bare_target,
            options=[("grpc.max_send_message_length", LIMIT), ("grpc.max_receive_message_length", LIMIT)],
        )
        stub = pb_grpc.DistillServiceStub(channel)
        bare_times: dict[tuple[str, bool], float] = {}
        for gradients, measured in ((False, measure), (True, measure_gradients)):
            for name in sizes:
                text, bare_times[name, gradients] = measured(client, stub, name, repeats)
                rows.append(text)
                print(rows[-1], file=sys.stderr)
            for name in shm_sizes:
                if (name, gradients) not in bare_times:  # a size part 1 did not run: its bare call alone
                    bare_times[name, gradients] = measured(client, stub, name, repeats)[1]
        if shm_sizes:
            shm_client = DistillClient(distill_target, max_message_bytes=LIMIT, transport="shm")
            raw_client = RawClient(raw_address)
            for gradients in (False, True):
                for name in shm_sizes:
                    bare_time = bare_times[name, gradients]
                    shared_rows.append(measure_shared(shm_client, raw_client, name, bare_time, repeats, gradients))
                    print(shared_rows[-1], file=sys.stderr)
            raw_client.close()
            shm_client.close()
        client.close()
        channel.close()
    finally:
        distill.terminate()
        distill.wait()
        assert bare.stdin is not None
        bare.stdin.close()
        bare.wait()
        raw.terminate()
        raw.wait()
    return rows, shared_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument(
        "--shm-sizes", default=None, help="sizes of the shared-memory table (default: --sizes from 1M; none: '')"
    )
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    if args.shm_sizes is None:
        shm_sizes = [name for name in sizes if SIZES[name] >= SIZES["1M"]]
    else:
        shm_sizes = [name for name in args.shm_sizes.split(",") if name]
    print(
        f"Python {platform.python_version()}, numpy {np.__version__}, grpcio {grpc.__version__}, {platform.machine()}"
    )
    print()
    rows, shared_rows = transport(sizes, shm_sizes, args.repeats)
    print("\n".join(rows))
    if shm_sizes:
        print()
        print("\n".join(shared_rows))


if __name__ == "__main__":
    main()
