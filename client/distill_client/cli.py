"""``distill-client``: a DistillService from the command line.

- ``info``: what the server offers (``GetServerInfo``), as JSON.
- ``check``: one small computation whose answer is known; exit status 0 when
  the server gives it, 1 when it does not.
- ``bench``: calls per second and latency percentiles of ``ComputeTotalLoss``
  for each payload size and number of concurrent callers (threads sharing
  the client), in the manner of Triton's ``perf_analyzer``; a table on
  stdout, printed as each measurement ends, and, with ``--csv``, one row per
  measurement; ``--plot`` draws them (matplotlib). A progress bar on stderr
  (on a terminal, or with ``--progress``) shows the measurement under way,
  its calls so far and the time left.

The target comes from ``--target``, else ``$DISTILL_TARGET``, else
``localhost:50051``; the token from ``--token`` or ``$DISTILL_AUTH_TOKEN``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from distill_client.client import DistillClient
from distill_core.errors import DistillError
from distill_core.losses import DistilLoss

__all__ = ["BenchRow", "bench", "check", "main", "parse_size", "plot"]

CHECK_TEACHER = [1.0, 2.0, 3.0, 4.0]
CHECK_STUDENT = [1.0, 2.0, 3.0, 6.0]
CHECK_EXPECTED = 1.0
"""The MSE of the check's vectors: (6 - 4)^2 / 4."""


def parse_size(text: str) -> int:
    """``1K``, ``64M``, ``512`` (bytes, binary units) as a byte count."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    value = int(float(number) * scale)
    if value < 4:
        raise argparse.ArgumentTypeError(f"{text!r} is under one float32 (4 bytes)")
    return value


def check(client: DistillClient) -> tuple[bool, str]:
    """Whether the server computes a known MSE, and what it said."""
    result = client.compute_total_loss([(1.0, DistilLoss.mse())], [CHECK_TEACHER], [CHECK_STUDENT])
    ok = abs(result.total - CHECK_EXPECTED) <= 1e-12
    return ok, f"MSE of {CHECK_TEACHER} and {CHECK_STUDENT}: {result.total!r} (expected {CHECK_EXPECTED!r})"


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """One measurement: a payload (bytes per tensor) at a concurrency."""

    payload_bytes: int
    concurrency: int
    calls: int
    errors: int
    calls_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float


def bench(
    client: DistillClient,
    payload_bytes: int,
    concurrency: int,
    seconds: float,
    on_progress: Callable[[float, int], None] | None = None,
) -> BenchRow:
    """``concurrency`` threads calling ``ComputeTotalLoss`` (one MSE layer,
    two float32 tensors of ``payload_bytes``) for ``seconds`` after a short
    warm-up; ``on_progress(seconds_elapsed, calls)`` about ten times a second."""
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=max(1, payload_bytes // 4)).astype(np.float32)
    student = teacher + np.float32(1)
    layers = [(1.0, DistilLoss.mse())]
    client.compute_total_loss(layers, [teacher], [student])  # warm-up: the connection, the server's first call
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start = time.perf_counter()
    end = start + seconds

    def work(index: int) -> None:
        while (now := time.perf_counter()) < end:
            try:
                client.compute_total_loss(layers, [teacher], [student])
            except DistillError:
                errors[index] += 1
                continue
            latencies[index].append(time.perf_counter() - now)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.1)
            if on_progress is not None:
                on_progress(min(time.perf_counter() - start, seconds), sum(map(len, latencies)))
    elapsed = time.perf_counter() - start
    times = np.array([t for per_thread in latencies for t in per_thread]) * 1e3
    p50, p90, p99 = np.percentile(times, [50, 90, 99]) if times.size else (np.nan, np.nan, np.nan)
    rate = times.size / elapsed
    return BenchRow(payload_bytes, concurrency, int(times.size), sum(errors), rate, float(p50), float(p90), float(p99))


_BAR = "{desc}{percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}{postfix}]"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill-client", description="A DistillService from the command line: info, check, bench."
    )
    parser.add_argument("--target", help="host:port of the server [env DISTILL_TARGET; default localhost:50051]")
    parser.add_argument("--token", help="bearer token [env DISTILL_AUTH_TOKEN]")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a call may take [default 60]")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="what the server offers, as JSON")
    commands.add_parser("check", help="a known computation: exit 0 if the server gets it right")
    bench_parser = commands.add_parser("bench", help="calls/s and latency percentiles, perf_analyzer style")
    bench_parser.add_argument("--sizes", default="1K,1M", help="bytes per tensor, comma-separated [default 1K,1M]")
    bench_parser.add_argument(
        "--concurrency", default="1,2,4,8", help="concurrent callers, comma-separated [default 1,2,4,8]"
    )
    bench_parser.add_argument("--seconds", type=float, default=5.0, help="per measurement [default 5]")
    bench_parser.add_argument("--csv", help="also write the rows to this CSV file")
    bench_parser.add_argument(
        "--plot", help="also draw calls/s and p99 against concurrency, per size, as a PNG (needs matplotlib)"
    )
    bench_parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="a progress bar on stderr [default: when stderr is a terminal]",
    )
    return parser


def plot(rows: Sequence[BenchRow], path: str) -> None:
    """Calls/s and p99 latency against concurrency, one line per payload size, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot

    figure, (rate, tail) = pyplot.subplots(1, 2, figsize=(10, 3.8))
    for size in sorted({row.payload_bytes for row in rows}):
        mine = [row for row in rows if row.payload_bytes == size]
        levels = [row.concurrency for row in mine]
        rate.plot(levels, [row.calls_per_second for row in mine], marker="o", label=f"{size} B")
        tail.plot(levels, [row.p99_ms for row in mine], marker="o", label=f"{size} B")
    rate.set(xlabel="concurrent callers", ylabel="calls/s", title="Throughput")
    tail.set(xlabel="concurrent callers", ylabel="p99 latency (ms)", yscale="log", title="Latency")
    rate.legend(title="per tensor")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``distill-client``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with DistillClient(args.target, token=args.token, timeout=args.timeout, transport="grpc") as client:
            if args.command == "info":
                print(json.dumps(dataclasses.asdict(client.server_info()), default=str, indent=1))
                return 0
            if args.command == "check":
                ok, said = check(client)
                print(("ok: " if ok else "WRONG: ") + said)
                return 0 if ok else 1
            try:
                sizes = [parse_size(size) for size in args.sizes.split(",")]
                levels = [int(level) for level in args.concurrency.split(",")]
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"bench: {exc}")
            if any(level < 1 for level in levels):
                parser.error("bench: --concurrency levels must be >= 1")
            if args.plot and importlib.util.find_spec("matplotlib") is None:
                parser.error("bench: --plot needs matplotlib (pip install matplotlib)")
            rows = []
            print("| bytes per tensor | concurrency | calls/s | p50 ms | p90 ms | p99 ms | errors |", flush=True)
            print("|---|---|---|---|---|---|---|", flush=True)
            total = len(sizes) * len(levels) * args.seconds
            disable = None if args.progress is None else not args.progress  # None: a terminal only
            with tqdm(total=total, unit="s", file=sys.stderr, disable=disable, bar_format=_BAR) as bar:
                for done, (size, level) in enumerate((size, level) for size in sizes for level in levels):
                    bar.set_description(f"{size} B x {level}")

                    def progress(elapsed: float, calls: int, base: float = done * args.seconds) -> None:
                        bar.n = base + elapsed
                        bar.set_postfix(calls=calls, refresh=False)
                        bar.refresh()

                    row = bench(client, size, level, args.seconds, on_progress=progress)
                    rows.append(row)
                    bar.write(
                        f"| {row.payload_bytes} | {row.concurrency} | {row.calls_per_second:.1f} | {row.p50_ms:.3f} "
                        f"| {row.p90_ms:.3f} | {row.p99_ms:.3f} | {row.errors} |",
                        file=sys.stdout,
                    )
                    sys.stdout.flush()
            if args.plot:
                plot(rows, args.plot)
            if args.csv:
                with open(args.csv, "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=[f.name for f in dataclasses.fields(BenchRow)])
                    writer.writeheader()
                    writer.writerows(dataclasses.asdict(row) for row in rows)
            return 0
    except DistillError as error:
        print(f"distill-client: {type(error).__name__} ({error.code.name}): {error.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
