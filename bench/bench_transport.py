"""DistillService against gRPC's own transport of the same bytes.

The floor is bench/floor_server.py: ``ComputeTotalLoss`` taken as raw bytes
(no protobuf, no computation) by a grpcio server, synchronous and asyncio.
DistillService computes the MSE of the same request. Measured in this run:

- 2 x 64 MiB: the median call, with gRPC's default arguments and with a
  tuned set on both sides of the floor (the largest HTTP/2 frame, larger TCP
  reads, no BDP probing);
- 2 x 1 KiB: the median call from one thread, and calls per second from 8
  client threads, against the floor and against bench/bare_server.py (which
  also parses the protobuf and computes); and the same computation as one
  step of an open ``StreamLosses`` stream (each thread its own stream).

    python bench/bench_transport.py [--repeats N]
"""

from __future__ import annotations

import argparse
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
from bench_loopback import median_seconds, start_bare_server, start_distill_server

from distill.v1 import distill_pb2 as pb
from distill_client import DistilLoss
from distill_core import wire

PATH = "/distill.v1.DistillService/ComputeTotalLoss"
LIMIT = 1 << 30
TUNED = [
    "grpc.http2.max_frame_size=16777215",
    "grpc.experimental.tcp_read_chunk_size=4194304",
    "grpc.experimental.tcp_max_read_chunk_size=16777216",
    "grpc.http2.bdp_probe=0",
]


def start_floor(kind: str, arguments: list[str]) -> tuple[subprocess.Popen[str], str]:
    script = str(Path(__file__).with_name("floor_server.py"))
    proc = subprocess.Popen([sys.executable, script, kind, *arguments], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, f"127.0.0.1:{int(proc.stdout.readline())}"


def request(n: int) -> bytes:
    rng = np.random.default_rng(0)
    t = rng.normal(size=n).astype(np.float32)
    message = pb.ComputeTotalLossRequest(layers=[pb.Layer(weight=1.0, loss=DistilLoss.mse().to_proto())])
    return bytes(wire.build(message, teachers=[t], students=[t + 1]))


def caller(target: str, arguments: list[str]) -> Callable[[bytes], bytes]:
    options = [("grpc.max_send_message_length", LIMIT), ("grpc.max_receive_message_length", LIMIT)]
    options += [(name, int(value)) for name, _, value in (a.partition("=") for a in arguments)]
    call: Callable[[bytes], bytes] = grpc.insecure_channel(target, options=options).unary_unary(PATH)
    return call


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return median_seconds(fn, repeats) * 1e3


def stepper(target: str) -> Callable[[], bytes]:
    """One 2 x 1 KiB MSE step on a ``StreamLosses`` stream opened (and configured) here."""
    config = pb.StreamLossesRequest()
    config.config.layers.add(weight=1.0, loss=DistilLoss.mse().to_proto())
    t = np.random.default_rng(0).normal(size=256).astype(np.float32)
    step = bytes(wire.build(pb.StreamLossesRequest(step_id=1), teachers=[t], students=[t + 1]))
    requests: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    requests.put(config.SerializeToString())
    method = grpc.insecure_channel(target).stream_stream("/distill.v1.DistillService/StreamLosses")
    answers: Iterator[bytes] = method(iter(requests.get, b""))

    def call() -> bytes:
        requests.put(step)
        return next(answers)

    answer = pb.StreamLossesResponse.FromString(call())
    if answer.HasField("error") or answer.total_loss <= 0:  # timed below: it must be the computation
        raise RuntimeError(f"the stream's step failed: {answer}")
    return call


def calls_per_second(make: Callable[[], Callable[[], object]], threads: int = 8, seconds: float = 3.0) -> float:
    """Calls a second from ``threads`` threads, each calling its own ``make()``."""
    calls = [make() for _ in range(threads)]
    done = [0] * threads
    end = time.perf_counter() + seconds

    def work(index: int) -> None:
        while time.perf_counter() < end:
            calls[index]()
            done[index] += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(done) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    large, small = request(16 << 20), request(256)
    started: list[subprocess.Popen[str]] = []
    try:
        targets: dict[str, tuple[str, list[str]]] = {}
        for kind in ("sync", "aio"):
            for label, arguments in (("default", []), ("tuned", TUNED)):
                proc, target = start_floor(kind, arguments)
                started.append(proc)
                targets[f"gRPC floor, {kind} server, {label} arguments"] = (target, arguments)
        proc, target = start_distill_server()
        started.append(proc)
        targets["DistillService (asyncio), default arguments"] = (target, [])
        bare, bare_target = start_bare_server()
        started.append(bare)

        print("| 2 x 64 MiB ComputeTotalLoss | median call | x the sync floor (default) |")
        print("|---|---|---|")
        results = {}
        for _ in range(2):  # interleaved: a slow spell lands on every row
            for name, (target, arguments) in targets.items():
                call = caller(target, arguments)
                ms = median_ms(lambda call=call: call(large), max(3, args.repeats // 2))
                results[name] = min(results.get(name, ms), ms)
        floor = results["gRPC floor, sync server, default arguments"]
        for name, ms in results.items():
            print(f"| {name} | {ms:.0f} ms | {ms / floor:.2f}x |")

        print("\n| 2 x 1 KiB ComputeTotalLoss | p50, one thread | calls/s, 8 threads |")
        print("|---|---|---|")
        small_targets = {
            "gRPC floor, sync server": targets["gRPC floor, sync server, default arguments"][0],
            "gRPC floor, asyncio server": targets["gRPC floor, aio server, default arguments"][0],
            "bare grpcio server (protobuf, NumPy)": bare_target,
            "DistillService": target,
        }
        for name, address in small_targets.items():
            call = caller(address, [])
            p50 = median_ms(lambda call=call: call(small), 200 * args.repeats)
            rate = calls_per_second(lambda call=call: lambda: call(small))
            print(f"| {name} | {p50:.3f} ms | {rate:.0f} |")
        step = stepper(target)
        p50 = median_ms(step, 200 * args.repeats)
        rate = calls_per_second(lambda: stepper(target))
        print(f"| DistillService, one StreamLosses step | {p50:.3f} ms | {rate:.0f} |")
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
