"""Train a small student network only through a remote feature-distillation loss.

A fixed teacher MLP maps synthetic inputs through two hidden layers to
logits. A student with half the width learns to reproduce the teacher's
second hidden layer (MSE, through a linear adapter as in FitNets) and its
logits (per-row KL at temperature 2): the only training signal is the loss
and gradients that DistillService returns.

    distill-server &                 # or: make serve
    python examples/train_student.py --target 127.0.0.1:50051 --steps 300

Prints the loss as it falls and, at the end, how far the student's features
are from the teacher's before and after training. ``--json`` prints those
numbers as one JSON line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch
from torch import nn

from distill_client import DistilLoss, Reduction
from distill_client.torch import RemoteDistillLoss

INPUTS, TEACHER_WIDTH, STUDENT_WIDTH, CLASSES = 32, 128, 64, 10


class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Sequential(
            nn.Linear(INPUTS, TEACHER_WIDTH), nn.Tanh(), nn.Linear(TEACHER_WIDTH, TEACHER_WIDTH), nn.Tanh()
        )
        self.head = nn.Linear(TEACHER_WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.hidden(x)
        return features, self.head(features)


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Sequential(
            nn.Linear(INPUTS, STUDENT_WIDTH), nn.Tanh(), nn.Linear(STUDENT_WIDTH, STUDENT_WIDTH), nn.Tanh()
        )
        self.adapter = nn.Linear(STUDENT_WIDTH, TEACHER_WIDTH)  # maps features to the teacher's width
        self.head = nn.Linear(STUDENT_WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.hidden(x)
        return self.adapter(features), self.head(features)


def feature_gap(teacher: Teacher, student: Student, x: torch.Tensor) -> float:
    """Mean squared distance between the teacher's and the student's features."""
    with torch.no_grad():
        return float(((teacher(x)[0] - student(x)[0]) ** 2).mean())


def train(
    target: str, steps: int, batch: int = 64, stream: bool = True, seed: int = 0, log_every: int = 50
) -> dict[str, float]:
    torch.manual_seed(seed)
    teacher, student = Teacher().eval(), Student()
    data = torch.randn(4096, INPUTS)
    held_out = torch.randn(1024, INPUTS)
    layers = [(1.0, DistilLoss.mse()), (0.5, DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW))]
    remote_loss = RemoteDistillLoss(layers, target=target, stream=stream, names=["hidden", "logits"], timeout=60)
    optimiser = torch.optim.Adam(student.parameters(), lr=3e-3)
    gap_before = feature_gap(teacher, student, held_out)
    losses = []
    try:
        for step in range(steps):
            x = data[torch.randint(0, len(data), (batch,))]
            with torch.no_grad():
                teacher_feats = teacher(x)
            loss = remote_loss(list(teacher_feats), list(student(x)))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            if log_every and step % log_every == 0:
                print(f"step {step:4d}  loss {losses[-1]:.5f}")
    finally:
        remote_loss.close()
    window = max(1, steps // 10)
    return {
        "first_loss": sum(losses[:window]) / window,
        "last_loss": sum(losses[-window:]) / window,
        "feature_gap_before": gap_before,
        "feature_gap_after": feature_gap(teacher, student, held_out),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="host:port of DistillService (default $DISTILL_TARGET)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--unary", action="store_true", help="one ComputeTotalLoss call per step instead of a stream")
    parser.add_argument("--json", action="store_true", help="print the final numbers as JSON")
    args = parser.parse_args(argv)
    result = train(args.target, args.steps, args.batch, stream=not args.unary, log_every=0 if args.json else 50)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"loss {result['first_loss']:.5f} -> {result['last_loss']:.5f}; feature gap "
            f"{result['feature_gap_before']:.5f} -> {result['feature_gap_after']:.5f}"
        )


if __name__ == "__main__":
    main()
