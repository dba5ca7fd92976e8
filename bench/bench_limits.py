"""The batch losses at their size limits: how long each runs between the
checks that stop abandoned work, and what taking its products in blocks costs.

Each loss at its largest batch (float32 inputs: 2048 samples of 8192
features for the teacher and 4096 for the student; RKD's 256 samples; the
largest attention maps and logits), with the gradient, through
``engine.layer_loss`` under an interruption check that records the time
since the previous one (the server's check, which raises once a call is
abandoned, costs the same). In the same run and interleaved, the Gram
losses with their products in one block (``relational.MIN_SLICE`` beyond the
batch): the baseline the blocks are measured against.

    python bench/bench_limits.py [--rounds 3]

Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

# One OpenBLAS thread, as distill-server runs (set before NumPy loads OpenBLAS).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from distill_client import DistilLoss
from distill_server import engine, interruption, relational
from distill_server.engine import Layer

FEATURES = ((2048, 8192), (2048, 4096))
CASES: list[tuple[str, DistilLoss, tuple[tuple[int, ...], tuple[int, ...]], bool]] = [
    ("similarity-preserving", DistilLoss.similarity_preserving(), FEATURES, True),
    ("linear CKA", DistilLoss.linear_cka(), FEATURES, True),
    ("PKT", DistilLoss.pkt(), FEATURES, True),
    ("correlation congruence", DistilLoss.correlation_congruence(), FEATURES, True),
    ("RKD", DistilLoss.rkd(), ((256, 65536), (256, 16384)), True),
    ("attention transfer", DistilLoss.attention_transfer(), ((64, 256, 32, 32), (64, 128, 32, 32)), False),
    ("DIST", DistilLoss.dist(), ((1 << 16, 64), (1 << 16, 64)), False),
]


def run(loss: DistilLoss, teacher: np.ndarray, student: np.ndarray) -> tuple[float, float, int]:
    """``(seconds, longest stretch between two checks or the ends, checks)`` of one call with the gradient."""
    marks = [time.perf_counter()]
    with interruption.interruptible(lambda: marks.append(time.perf_counter())):
        engine.layer_loss([Layer(1.0, loss)], 0, teacher, student, gradient=True)
    marks.append(time.perf_counter())
    stretch = max(b - a for a, b in itertools.pairwise(marks))
    return marks[-1] - marks[0], stretch, len(marks) - 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    blocked = relational.MIN_SLICE
    print("| loss | inputs | call s | longest stretch s | checks | one-block products s | blocks / one |")
    print("|---|---|---|---|---|---|---|")
    for name, loss, (ts, ss), gram in CASES:
        teacher, student = (rng.standard_normal(shape, dtype=np.float32) for shape in (ts, ss))
        times: dict[str, list[float]] = {"blocks": [], "stretch": [], "one": []}
        checks = 0
        for round_ in range(args.rounds):
            # Alternate which goes first: the first of a pair pays for the memory the previous call returned.
            for one_block in (False, True) if round_ % 2 else (True, False):
                if one_block and not gram:
                    continue
                relational.MIN_SLICE = 1 << 30 if one_block else blocked  # one block: one BLAS call a product
                seconds, stretch, count = run(loss, teacher, student)
                if one_block:
                    times["one"].append(seconds)
                else:
                    times["blocks"].append(seconds)
                    times["stretch"].append(stretch)
                    checks = count
        relational.MIN_SLICE = blocked
        call, stretch = statistics.median(times["blocks"]), statistics.median(times["stretch"])
        one = f"{statistics.median(times['one']):.2f}" if gram else "—"
        ratio = f"{call / statistics.median(times['one']):.2f}x" if gram else "—"
        shapes = f"{list(ts)} / {list(ss)}"
        print(f"| {name} | {shapes} | {call:.2f} | {stretch:.2f} | {checks} | {one} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
