"""The batch, logit and response losses against torchdistill, on the CPU, in the same run.

Each loss at a realistic size (a batch of 256: features 1024 wide for the
teacher and 256 for the student; 256 x 1000 logits; attention and NST maps
of 128 and 64 channels of 8 x 8), float32 inputs. The service's engine
(``engine.layer_loss`` with the gradient: the checks, the float64 math and
the float32 gradient a call returns) against torchdistill's class of the
same loss, forward and backward in float32 (its usual precision) and in
float64 (the service's); where torchdistill has no class (linear CKA, NST),
a plain PyTorch implementation of the paper's formula. Cases run in
interleaved rounds after a warm-up; the table shows medians and the
service's time as a multiple of torch's float32 time.

    python bench/bench_zoo.py [--rounds 9] [--threads 1]

Prints a Markdown table for docs/benchmarks.md. Needs torch and torchdistill.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

# One OpenBLAS thread, as distill-server runs (set before NumPy loads OpenBLAS), against one torch thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch
from torchdistill.losses import mid_level as td

from distill_client import DistilLoss
from distill_server import engine

B, TEACHER, STUDENT, CLASSES = 256, 1024, 256, 1000
MAPS = ((B, 128, 8, 8), (B, 64, 8, 8))

Torch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def io(tensor: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    return {"x": {"output": tensor}}


def wrap(module: Any) -> Torch:
    """A torchdistill mid-level loss as ``f(teacher, student, labels)``."""
    return lambda t, s, y: module(io(s), io(t), y)


def linear_cka(t: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, z = (a.flatten(1) - a.flatten(1).mean(0) for a in (t, s))
    fro = torch.linalg.matrix_norm
    return 1 - fro(z.T @ x) ** 2 / (fro(x.T @ x) * fro(z.T @ z))


def nst(t: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """RepDistiller's NSTLoss (polynomial kernel of degree 2)."""
    ft, fs = (torch.nn.functional.normalize(a.flatten(2), dim=2) for a in (t, s))

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.transpose(1, 2)).pow(2)

    return (kernel(ft, ft).mean((1, 2)) + kernel(fs, fs).mean((1, 2)) - 2 * kernel(fs, ft).mean((1, 2))).mean()


def kd_times(tau: float, module: Any) -> Torch:
    return lambda t, s, y: tau * tau * module(io(s), io(t))


def cases() -> list[tuple[str, DistilLoss, str, Torch, str]]:
    """(name, loss, input kind, torch's loss, what torch runs)."""
    kernel = {"type": "gaussian", "gamma": 0.4, "max_p": 2}
    maps = ({"path": "x", "io": "output"},) * 2
    return [
        ("similarity-preserving (l1)", DistilLoss.similarity_preserving(normalization="l1"), "features",
         wrap(td.SPKDLoss("x", "x", reduction="batchmean")), "SPKDLoss"),
        ("linear CKA", DistilLoss.linear_cka(), "features", linear_cka, "PyTorch, the paper's formula"),
        ("PKT (code)", DistilLoss.pkt(mode="code"), "features",
         wrap(td.PKTLoss("x", "output", "x", "output")), "PKTLoss"),
        ("correlation congruence (code)", DistilLoss.correlation_congruence(mode="code"), "features",
         wrap(td.CCKDLoss("x", "x", kernel, reduction="batchmean")), "CCKDLoss"),
        ("RKD", DistilLoss.rkd(), "features", wrap(td.RKDLoss("x", "x", 1.0, 2.0, reduction="mean")), "RKDLoss"),
        ("attention transfer (code)", DistilLoss.attention_transfer(mode="code"), "maps",
         wrap(td.ATLoss({"x": {"teacher": maps[0], "student": maps[1], "weight": 1}}, mode="code")), "ATLoss"),
        ("NST", DistilLoss.nst(), "maps", nst, "PyTorch, RepDistiller's NSTLoss"),
        ("KD (tau 4)", DistilLoss.kd(4.0), "logits",
         kd_times(4.0, td.KDLoss("x", "output", "x", "output", temperature=4.0, alpha=0.5)), "KDLoss x tau^2"),
        ("DIST", DistilLoss.dist(), "logits", wrap(td.DISTLoss("x", "output", "x", "output")), "DISTLoss"),
        ("logit-standardized KD (tau 2)", DistilLoss.logit_standardized_kd(2.0), "logits",
         kd_times(2.0, td.LogitStdKDLoss("x", "output", "x", "output", temperature=2.0, alpha=0.5)),
         "LogitStdKDLoss x tau^2"),
        ("response (KL tau 4, alpha 0.1)", DistilLoss.response(DistilLoss.kl_divergence(4.0), 0.1, 0.9), "logits",
         wrap(td.KDLoss("x", "output", "x", "output", temperature=4.0, alpha=0.1)), "KDLoss with targets"),
    ]  # fmt: skip


def inputs(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if kind == "features":
        teacher, student = rng.normal(size=(B, TEACHER)), rng.normal(size=(B, STUDENT))
    elif kind == "maps":
        teacher, student = rng.normal(size=MAPS[0]), rng.normal(size=MAPS[1])
    else:
        teacher = 3 * rng.normal(size=(B, CLASSES))
        student = teacher + rng.normal(size=(B, CLASSES))
    return teacher.astype(np.float32), student.astype(np.float32), rng.integers(0, CLASSES, size=B)


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (the engine uses one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for name, loss, kind, reference, what in cases():
        teacher, student, labels = inputs(kind, rng)
        layers = [engine.Layer(1.0, loss)]
        label_map = labels if loss.kind.name == "RESPONSE" else None

        def service(t: np.ndarray = teacher, s: np.ndarray = student, y: Any = label_map, ls: Any = layers) -> None:
            engine.layer_loss(ls, 0, t, s, gradient=True, labels=y)

        def in_torch(
            dtype: torch.dtype, ref: Torch = reference, t: Any = teacher, s: Any = student, y: Any = labels
        ) -> None:
            tt, ss = torch.from_numpy(t).to(dtype), torch.from_numpy(s).to(dtype).requires_grad_(True)
            ref(tt, ss, torch.from_numpy(y)).backward()

        runs = {
            "service": service,
            "torch32": lambda f=in_torch: f(torch.float32),
            "torch64": lambda f=in_torch: f(torch.float64),
        }
        for run in runs.values():
            run()  # warm-up
        times: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, run in runs.items():
                times[key].append(timed(run))
        median = {key: statistics.median(values) * 1e3 for key, values in times.items()}
        rows.append((name, kind, what, median))
    print("| loss | inputs | service ms | torch float32 ms | torch float64 ms | service / torch32 | torch runs |")
    print("|---|---|---|---|---|---|---|")
    for name, kind, what, median in rows:
        ratio = median["service"] / median["torch32"]
        print(
            f"| {name} | {kind} | {median['service']:.2f} | {median['torch32']:.2f} | {median['torch64']:.2f} "
            f"| {ratio:.2f}x | {what} |"
        )


if __name__ == "__main__":
    main()
