"""The CUDA engine against the device's own ceilings, measured in the same run.

Part 1, the kernels: each loss at 2 x ``--mb`` MB of float32 (and float16,
float64) on the device, as the fused sums kernels alone (CUDA events) and as
the whole engine call (host clock, synchronised), against a device-to-device
copy of the same bytes (bytes read + written per second: the HBM ceiling) and
CuPy's own one-pass sum; CuPy's textbook expression of each loss alongside.
Part 2, the host: 2 x ``--host-mb`` MB moved to the device pageable
(``cupy.asarray``), through the server's pinned staging buffers, and from
pinned memory (the PCIe ceiling), then the engine call from host arrays, on
one and several threads. Part 3, the service: ``ComputeTotalLoss`` over
loopback gRPC on a ``--device cuda`` and a ``--device cpu`` server.

    python bench/bench_gpu.py [--mb 256] [--host-mb 64] [--json results.json]

Prints Markdown tables (medians) for docs/benchmarks.md; ``--json`` writes
every number. Needs a CUDA device and CuPy.
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import cupy
import numpy as np
from bench_loopback import median_seconds, start_distill_server
from cupyx.profiler import benchmark

from distill_client import DistillClient, DistilLoss, Reduction
from distill_server import engine, kernels
from distill_server.backend import select
from distill_server.engine import _Terms

MB = 1 << 20
RESULTS: dict[str, Any] = {}
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def gpu_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    """Median device time of ``fn`` (CUDA events), after warm-up."""
    result = benchmark(fn, n_repeat=repeats, n_warmup=3)
    return float(np.median(result.gpu_times)) * 1e3


def wall_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    """Median host time of ``fn``, which synchronises, after warm-up."""
    return median_seconds(fn, repeats) * 1e3


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def section(name: str, fn: Callable[[], None]) -> None:
    """Run one part; a failure is recorded and the others still run."""
    try:
        fn()
    except Exception:
        RESULTS.setdefault("errors", {})[name] = traceback.format_exc()
        say(f"\n**{name} failed:**\n```\n{traceback.format_exc()}```")


def device_info() -> None:
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    RESULTS["device"] = {
        "name": name,
        "multiprocessors": props["multiProcessorCount"],
        "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
        "cupy": cupy.__version__,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "driver": cupy.cuda.runtime.driverGetVersion(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    say(f"Device: {RESULTS['device']}")


PAIR_CACHE: dict[tuple[Any, int], tuple[Any, Any]] = {}


def pair(dtype: Any, nbytes: int) -> tuple[Any, Any]:
    """Teacher/student device arrays of ``nbytes`` each (random, never zeros)."""
    key = (np.dtype(dtype), nbytes)
    if key not in PAIR_CACHE:
        PAIR_CACHE.clear()
        n = nbytes // np.dtype(dtype).itemsize
        rng = cupy.random.default_rng(0)
        t = rng.standard_normal(n, dtype=cupy.float32).astype(dtype)
        s = (t + rng.standard_normal(n, dtype=cupy.float32)).astype(dtype)
        PAIR_CACHE[key] = (t, s)
    return PAIR_CACHE[key]


def ceilings(mb: int) -> None:
    nbytes = 2 * mb * MB
    src, dst = cupy.ones(nbytes // 4, cupy.float32), cupy.empty(nbytes // 4, cupy.float32)

    def copy() -> None:
        cupy.cuda.runtime.memcpyAsync(
            dst.data.ptr,
            src.data.ptr,
            nbytes,
            cupy.cuda.runtime.memcpyDeviceToDevice,
            cupy.cuda.get_current_stream().ptr,
        )

    copy_ms = gpu_ms(copy)
    sum_ms = gpu_ms(lambda: src.sum())
    RESULTS["copy"] = {"bytes": nbytes, "ms": copy_ms, "read_write_gbps": gbps(2 * nbytes, copy_ms)}
    RESULTS["sum"] = {"bytes": nbytes, "ms": sum_ms, "read_gbps": gbps(nbytes, sum_ms)}
    say(f"\nCeilings over {nbytes // MB} MB: device-to-device copy {gbps(2 * nbytes, copy_ms):.0f} GB/s read+write")
    say(f"({copy_ms:.3f} ms); CuPy one-pass float32 sum {gbps(nbytes, sum_ms):.0f} GB/s read ({sum_ms:.3f} ms).")


LOSSES = [
    ("MSE", DistilLoss.mse(), lambda t, s: ((s - t) ** 2).mean()),
    ("cosine", DistilLoss.cosine(), lambda t, s: 1 - t.dot(s) / (cupy.linalg.norm(t) * cupy.linalg.norm(s))),
    ("KL tau 2", DistilLoss.kl_divergence(2.0), None),
    ("KL+MSE", DistilLoss.combined(0.5, 0.5, 2.0), None),
    ("cosine per row (d=4096)", DistilLoss.cosine(reduction=Reduction.PER_ROW), None),
    ("KL per row (d=4096, tau 2)", DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW), None),
]


def textbook_kl(t: Any, s: Any, tau: float = 2.0) -> Any:
    a, b = t / tau, s / tau
    log_p = a - (a.max() + cupy.log(cupy.exp(a - a.max()).sum()))
    log_q = b - (b.max() + cupy.log(cupy.exp(b - b.max()).sum()))
    return tau * tau * (cupy.exp(log_p) * (log_p - log_q)).sum()


def kernel_only(loss: DistilLoss, t: Any, s: Any, gradient: bool = False) -> Callable[[], object]:
    terms = _Terms.of(loss)
    program = kernels.Sums(bool(terms.mse), bool(terms.cosine), bool(terms.kl), gradient)
    return lambda: kernels.row_sums(program, t, s, terms.tau)


def losses(mb: int) -> None:
    copy = RESULTS["copy"]["read_write_gbps"]
    say(f"\n### Losses at 2 x {mb} MB on the device\n")
    say("Input GB/s = both inputs' bytes over the time; % = of the device-to-device copy's read+write rate.\n")
    say("| loss | dtype | sums kernels | % copy | engine call | % copy | with gradient | textbook CuPy |")
    say("|---|---|---|---|---|---|---|---|")
    rows = []
    for (label, loss, textbook), dtype in [(x, np.float32) for x in LOSSES] + [
        (LOSSES[0], np.float16),
        (LOSSES[2], np.float16),
        (LOSSES[0], np.float64),
        (LOSSES[2], np.float64),
    ]:
        t, s = pair(dtype, mb * MB)
        width = 4096 if loss.reduction is Reduction.PER_ROW else t.size
        t, s = t.reshape(-1, width), s.reshape(-1, width)  # the engine's (rows, width) view
        nbytes = 2 * t.nbytes
        k_ms = gpu_ms(kernel_only(loss, t, s))
        e_ms = wall_ms(lambda loss=loss, t=t, s=s: engine.loss_value(loss, t, s))
        g_ms = wall_ms(lambda loss=loss, t=t, s=s: engine.evaluate(loss, t, s, 1.0), repeats=10)
        if textbook is None and loss.kind.name == "KL_DIVERGENCE" and loss.reduction is Reduction.FLATTEN:
            textbook = textbook_kl
        flat_t, flat_s = t.ravel(), s.ravel()
        tb = f"{gbps(nbytes, gpu_ms(lambda t=flat_t, s=flat_s, f=textbook: f(t, s))):.0f} GB/s" if textbook else "-"
        record = {
            "loss": label,
            "dtype": np.dtype(dtype).name,
            "input_bytes": nbytes,
            "kernel_ms": k_ms,
            "kernel_gbps": gbps(nbytes, k_ms),
            "engine_ms": e_ms,
            "engine_gbps": gbps(nbytes, e_ms),
            "gradient_ms": g_ms,
            "gradient_gbps": gbps(nbytes, g_ms),
            "textbook": tb,
        }
        rows.append(record)
        say(
            f"| {label} | {record['dtype']} | {k_ms:.3f} ms, {record['kernel_gbps']:.0f} GB/s "
            f"| {100 * record['kernel_gbps'] / copy:.0f}% | {e_ms:.3f} ms, {record['engine_gbps']:.0f} GB/s "
            f"| {100 * record['engine_gbps'] / copy:.0f}% | {g_ms:.3f} ms | {tb} |"
        )
    RESULTS["losses"] = rows


def sweep(mb: int) -> None:
    say("\n### Blocks per multiprocessor (float32, flat, sums kernels)\n")
    say("| blocks/SM | MSE GB/s | KL GB/s |")
    say("|---|---|---|")
    t, s = pair(np.float32, mb * MB)
    t, s = t.reshape(1, -1), s.reshape(1, -1)
    chosen, table = kernels.BLOCKS_PER_SM, {}
    try:
        for blocks in (2, 4, 8, 16, 32):
            kernels.BLOCKS_PER_SM = blocks
            mse = gbps(2 * t.nbytes, gpu_ms(kernel_only(DistilLoss.mse(), t, s)))
            kl = gbps(2 * t.nbytes, gpu_ms(kernel_only(DistilLoss.kl_divergence(2.0), t, s)))
            table[blocks] = {"mse_gbps": mse, "kl_gbps": kl}
            say(f"| {blocks} | {mse:.0f} | {kl:.0f} |")
    finally:
        kernels.BLOCKS_PER_SM = chosen
    RESULTS["blocks_per_sm"] = table


def host(mb: int) -> None:
    backend = select("cuda")
    n = mb * MB // 4
    rng = np.random.default_rng(0)
    t = rng.standard_normal(n, dtype=np.float32)
    s = (t + rng.standard_normal(n, dtype=np.float32)).astype(np.float32)
    nbytes = 2 * t.nbytes
    pinned = [cupy.cuda.alloc_pinned_memory(t.nbytes) for _ in range(2)]
    staged = [np.frombuffer(p, np.float32, n) for p in pinned]
    staged[0][:], staged[1][:] = t, s
    dev = [cupy.empty(n, cupy.float32) for _ in range(2)]
    stream = cupy.cuda.Stream(non_blocking=True)

    def from_pinned() -> None:
        for d, h in zip(dev, staged, strict=True):
            cupy.cuda.runtime.memcpyAsync(
                d.data.ptr, h.ctypes.data, h.nbytes, cupy.cuda.runtime.memcpyHostToDevice, stream.ptr
            )
        stream.synchronize()

    def pageable() -> None:
        cupy.asarray(t), cupy.asarray(s)
        cupy.cuda.get_current_stream().synchronize()

    def staging() -> None:
        with backend.activate():
            backend.to_device(t), backend.to_device(s)

    loss = DistilLoss.mse()

    def end_to_end() -> float:
        with backend.activate():
            return engine.loss_value(loss, backend.to_device(t), backend.to_device(s))

    def with_gradient() -> Any:
        with backend.activate():
            _, grad = engine.evaluate(loss, backend.to_device(t), backend.to_device(s), 1.0)
            return backend.to_host(grad)

    numbers = {
        "pinned_dma_ms": wall_ms(from_pinned, 10),
        "pageable_ms": wall_ms(pageable, 10),
        "staged_ms": wall_ms(staging, 10),
        "engine_from_host_ms": wall_ms(end_to_end, 10),
        "engine_from_host_gradient_ms": wall_ms(with_gradient, 10),
        "cpu_engine_ms": wall_ms(lambda: engine.loss_value(loss, t, s), 5),
    }
    for threads in (2, 4):
        barrier = threading.Barrier(threads)
        calls = 10

        def work(barrier: threading.Barrier = barrier, calls: int = calls) -> None:
            barrier.wait()
            for _ in range(calls):
                end_to_end()

        pool = [threading.Thread(target=work) for _ in range(threads)]
        start = time.perf_counter()
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        numbers[f"engine_from_host_{threads}_threads_calls_per_s"] = threads * calls / (time.perf_counter() - start)
    RESULTS["host"] = {"bytes": nbytes, **numbers}
    one = 1e3 / numbers["engine_from_host_ms"]
    say(f"\n### Host to device, 2 x {mb} MB float32\n")
    say("| what | time | GB/s | x pinned DMA |")
    say("|---|---|---|---|")
    for key, label in [
        ("pinned_dma_ms", "DMA from pinned memory (the PCIe ceiling)"),
        ("pageable_ms", "cupy.asarray from pageable memory"),
        ("staged_ms", "server staging (pinned chunks, reused)"),
        ("engine_from_host_ms", "engine call from host arrays (staging + MSE)"),
        ("engine_from_host_gradient_ms", "... with the gradient brought back"),
        ("cpu_engine_ms", "the CPU engine's MSE on the same arrays"),
    ]:
        ms = numbers[key]
        say(f"| {label} | {ms:.2f} ms | {gbps(nbytes, ms):.1f} | {ms / numbers['pinned_dma_ms']:.2f}x |")
    say(
        f"\nEngine calls from host arrays: {one:.1f}/s on one thread, "
        f"{numbers['engine_from_host_2_threads_calls_per_s']:.1f}/s on two, "
        f"{numbers['engine_from_host_4_threads_calls_per_s']:.1f}/s on four (each thread its own stream)."
    )


def by_ipc(target: str, t: np.ndarray, s: np.ndarray, layers: list[Any]) -> dict[str, float]:
    """The same call with CuPy arrays sent as CUDA IPC handles, and the engine alone on them."""
    teacher, student = cupy.asarray(t), cupy.asarray(s)
    with DistillClient(target, timeout=120, transport="cuda_ipc") as client:
        loss = wall_ms(lambda: client.compute_total_loss(layers, [teacher], [student]))
        gradient = wall_ms(lambda: client.compute_total_loss(layers, [teacher], [student], gradients=True))
    alone = wall_ms(lambda: engine.loss_value(DistilLoss.mse(), teacher, student))
    return {"cuda_ipc_ms": loss, "cuda_ipc_gradient_ms": gradient, "cuda_engine_ms": alone}


def service(mb: int) -> None:
    n = mb * MB // 4
    rng = np.random.default_rng(0)
    t = rng.standard_normal(n, dtype=np.float32)
    s = (t + rng.standard_normal(n, dtype=np.float32)).astype(np.float32)
    layers = [(1.0, DistilLoss.mse())]
    numbers: dict[str, float] = {}
    for device in ("cuda", "cpu"):
        proc, target = start_distill_server(device)
        try:
            with DistillClient(target, timeout=120, transport="grpc") as client:
                assert client.server_info().device.startswith(device)
                numbers[f"{device}_ms"] = wall_ms(lambda c=client: c.compute_total_loss(layers, [t], [s]), 10)
                numbers[f"{device}_gradient_ms"] = wall_ms(
                    lambda c=client: c.compute_total_loss(layers, [t], [s], gradients=True), 5
                )
            if device == "cuda":
                numbers |= by_ipc(target, t, s, layers)
        finally:
            proc.terminate()
            proc.wait(30)
    RESULTS["service"] = {"bytes": 2 * t.nbytes, **numbers}
    say(f"\n### ComputeTotalLoss over loopback gRPC, MSE, 2 x {mb} MB float32\n")
    say("| server | loss | with gradient |")
    say("|---|---|---|")
    for device in ("cuda", "cpu"):
        say(f"| --device {device} | {numbers[f'{device}_ms']:.1f} ms | {numbers[f'{device}_gradient_ms']:.1f} ms |")
    say(
        f"| --device cuda, CuPy arrays by CUDA IPC | {numbers['cuda_ipc_ms']:.2f} ms "
        f"| {numbers['cuda_ipc_gradient_ms']:.2f} ms (into the client's buffer) |"
    )
    say(f"| (the engine alone on the same device arrays) | {numbers['cuda_engine_ms']:.2f} ms | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="MB per input tensor on the device")
    parser.add_argument("--host-mb", type=int, default=64, help="MB per input tensor from the host")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--skip-service", action="store_true", help="leave out the gRPC part")
    args = parser.parse_args()
    section("device", device_info)
    section("ceilings", lambda: ceilings(args.mb))
    section("losses", lambda: losses(args.mb))
    section("sweep", lambda: sweep(args.mb))
    section("host", lambda: host(args.host_mb))
    if not args.skip_service:
        section("service", lambda: service(args.host_mb))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"date": time.strftime("%Y-%m-%d"), **RESULTS, "text": "\n".join(LINES)}, handle, indent=1)


if __name__ == "__main__":
    main()
