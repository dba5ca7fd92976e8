"""Train a small student network only through a remote feature-distillation loss.

A fixed teacher MLP maps synthetic inputs through two hidden layers to
logits. A student with half the width learns to reproduce the teacher's
second hidden layer (MSE, through a linear adapter as in FitNets) and its
logits (per-row KL at temperature 2): the only training signal is the loss
and gradients that DistillService returns. With ``--relational`` a student a
quarter of the width has no adapter: it learns the teacher's hidden layer
through a batch loss (similarity-preserving distillation compares how the
samples of a batch relate, whatever the widths), and the summary reports the
linear CKA of the two feature sets, which rises towards 1 as it learns.

    distill-server &                 # or: make serve
    python examples/train_student.py --target 127.0.0.1:50051 --steps 300 --plot loss.png
    python examples/train_student.py --target 127.0.0.1:50051 --relational

Shows a progress bar with the loss, the rate and the time left (tqdm) and,
at the end, how far the student's features are from the teacher's before and
after training; ``--plot FILE`` saves the loss curve as a PNG (matplotlib).
``--json`` writes one JSON line per step as it goes (``step``, ``loss``),
then the summary. ``pip install '.[examples]'`` brings tqdm and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

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
    def __init__(self, width: int = STUDENT_WIDTH, adapter: bool = True) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(INPUTS, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        # FitNets: a linear map of the features to the teacher's width, for losses that compare elements.
        self.adapter = nn.Linear(width, TEACHER_WIDTH) if adapter else nn.Identity()
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.hidden(x)
        return self.adapter(features), self.head(features)


def feature_gap(teacher: Teacher, student: Student, x: torch.Tensor) -> float:
    """Mean squared distance between the teacher's and the student's features."""
    with torch.no_grad():
        return float(((teacher(x)[0] - student(x)[0]) ** 2).mean())


def feature_cka(teacher: Teacher, student: Student, x: torch.Tensor) -> float:
    """Linear CKA of the teacher's and the student's features (any widths): 1
    when they relate the samples alike, up to a rotation and a scale."""
    with torch.no_grad():
        t, s = (features - features.mean(0) for features in (teacher(x)[0], student(x)[0]))
        return float((s.T @ t).norm() ** 2 / ((t.T @ t).norm() * (s.T @ s).norm()))


def train(
    target: str,
    steps: int,
    batch: int = 64,
    stream: bool = True,
    seed: int = 0,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
    relational: bool = False,
) -> tuple[dict[str, float], list[float]]:
    """Train the student; ``on_step(step, loss)`` after every step. Returns the
    summary and every step's loss. ``relational``: a quarter-width student
    with no adapter, taught the hidden layer by a batch loss."""
    torch.manual_seed(seed)
    teacher = Teacher().eval()
    student = Student(STUDENT_WIDTH // 2, adapter=False) if relational else Student()
    data = torch.randn(4096, INPUTS)
    held_out = torch.randn(1024, INPUTS)
    hidden = (100.0, DistilLoss.similarity_preserving()) if relational else (1.0, DistilLoss.mse())
    layers = [hidden, (0.5, DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW))]
    remote_loss = RemoteDistillLoss(layers, target=target, stream=stream, names=["hidden", "logits"], timeout=60)
    optimiser = torch.optim.Adam(student.parameters(), lr=3e-3)
    gap = feature_cka if relational else feature_gap
    gap_before = gap(teacher, student, held_out)
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
            on_step(step, losses[-1])
    finally:
        remote_loss.close()
    window = max(1, steps // 10)
    summary = {
        "first_loss": sum(losses[:window]) / window,
        "last_loss": sum(losses[-window:]) / window,
    }
    measure = "feature_cka" if relational else "feature_gap"
    summary |= {f"{measure}_before": gap_before, f"{measure}_after": gap(teacher, student, held_out)}
    return summary, losses


def plot(losses: list[float], path: str) -> None:
    """The loss curve as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 3.5))
    axes.plot(losses)
    axes.set(xlabel="step", ylabel="remote loss", yscale="log", title="Student trained through DistillService")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="host:port of DistillService (default $DISTILL_TARGET)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--unary", action="store_true", help="one ComputeTotalLoss call per step instead of a stream")
    parser.add_argument("--json", action="store_true", help="one JSON line per step as it goes, then the summary")
    parser.add_argument("--plot", metavar="FILE", help="save the loss curve as a PNG")
    parser.add_argument(
        "--relational", action="store_true", help="a quarter-width student, no adapter, a batch loss on the features"
    )
    args = parser.parse_args(argv)
    try:
        from tqdm import tqdm
    except ImportError:
        parser.exit(2, "train_student.py: needs tqdm (pip install '.[examples]')\n")
    options = {"stream": not args.unary, "relational": args.relational}
    if args.json:

        def on_step(step: int, loss: float) -> None:
            print(json.dumps({"step": step, "loss": loss}), flush=True)

        summary, losses = train(args.target, args.steps, args.batch, on_step=on_step, **options)
        print(json.dumps(summary), flush=True)
    else:
        with tqdm(total=args.steps, unit="step", file=sys.stderr) as bar:

            def on_step(step: int, loss: float) -> None:
                bar.set_postfix(loss=f"{loss:.5f}", refresh=False)
                bar.update()

            summary, losses = train(args.target, args.steps, args.batch, on_step=on_step, **options)
        measure = "feature_cka" if args.relational else "feature_gap"
        print(
            f"loss {summary['first_loss']:.5f} -> {summary['last_loss']:.5f}; {measure.replace('_', ' ')} "
            f"{summary[measure + '_before']:.5f} -> {summary[measure + '_after']:.5f}"
        )
    if args.plot:
        plot(losses, args.plot)


if __name__ == "__main__":
    main()
