"""Throughput of small calls with one server process and with several
sharing a port (``distill-server --processes N``, SO_REUSEPORT).

    python bench/bench_processes.py [--processes 2] [--clients 4] [--seconds 5]

Client processes (one channel, so one connection, each) call
``ComputeTotalLoss`` with two 1 KB float32 tensors as fast as they can; the
kernel spreads their connections over the server processes. Prints a
Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import time

import numpy as np

from distill_client import DistillClient, DistilLoss


def start(processes: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill_server", "--port", "0", "--device", "cpu", "--processes", str(processes)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    ready = 0
    target = ""
    for line in proc.stderr:
        match = re.search(r"ready on (\S+)", line)
        if match:
            ready, target = ready + 1, match.group(1)
            if ready == processes:
                return proc, target
    raise RuntimeError("distill-server did not start")


def client(target: str, seconds: float, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    layers = [(1.0, DistilLoss.mse())]
    t = np.ones(256, np.float32)
    with DistillClient(target, timeout=30) as c:
        c.compute_total_loss(layers, [t], [t])
        calls, deadline = 0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            c.compute_total_loss(layers, [t], [t])
            calls += 1
    results.put(calls)


def throughput(processes: int, clients: int, seconds: float) -> float:
    server, target = start(processes)
    try:
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        workers = [context.Process(target=client, args=(target, seconds, results)) for _ in range(clients)]
        for worker in workers:
            worker.start()
        total = sum(results.get(timeout=seconds + 60) for _ in workers)
        for worker in workers:
            worker.join()
        return total / seconds
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    print(f"Python {platform.python_version()}, {os.cpu_count()} cores, {args.clients} client processes")
    print()
    one = throughput(1, args.clients, args.seconds)
    many = throughput(args.processes, args.clients, args.seconds)
    print("| server | calls/s (2 x 1 KB) | gain |")
    print("|---|---|---|")
    print(f"| 1 process | {one:.0f} | 1.00x |")
    print(f"| {args.processes} processes, one port | {many:.0f} | {many / one:.2f}x |")


if __name__ == "__main__":
    main()
