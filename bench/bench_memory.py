"""Server memory under concurrent large calls, with and without a tight budget.

Twelve client threads send ``ComputeTotalLoss`` calls of 2 x 28 MiB at once,
for several rounds, to a server started with ``--max-inflight-mb`` of the
given size and to one whose budget is too large to bind (the baseline);
the server's resident and peak memory (``VmRSS``, ``VmHWM``) are read after
each round.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from distill_client import DistillClient, DistilLoss

_READY = re.compile(r"ready on \S+:(\d+)")


def _status_mib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    raise KeyError(key)


def run(budget_mb: int, rounds: int, threads: int) -> list[tuple[int, int]]:
    """(RSS, peak RSS) in MiB after each round."""
    command = [sys.executable, "-m", "distill_server", "--device", "cpu", "--port", "0"]
    command += ["--max-message-mb", "64", "--max-inflight-mb", str(budget_mb), "--receive-timeout", "300"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    port = next(match.group(1) for line in server.stderr if (match := _READY.search(line)))
    x = np.random.default_rng(0).standard_normal(7 << 20).astype(np.float32)
    layers = [(1.0, DistilLoss.mse())]
    readings = []
    try:
        with DistillClient(f"127.0.0.1:{port}", timeout=300) as client, ThreadPoolExecutor(threads) as pool:
            for _ in range(rounds):
                list(pool.map(lambda _: client.compute_total_loss(layers, [x], [x * 0]), range(threads)))
                readings.append((_status_mib(server.pid, "VmRSS"), _status_mib(server.pid, "VmHWM")))
    finally:
        server.terminate()
        server.wait()
    return readings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-mb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=12)
    args = parser.parse_args()
    print("| server | RSS after each round (MiB) | peak RSS (MiB) |")
    print("|---|---|---|")
    for name, budget in ((f"--max-inflight-mb {args.budget_mb}", args.budget_mb), ("no binding budget", 1 << 20)):
        readings = run(budget, args.rounds, args.threads)
        print(f"| {name} | {', '.join(str(rss) for rss, _ in readings)} | {readings[-1][1]} |", flush=True)


if __name__ == "__main__":
    main()
