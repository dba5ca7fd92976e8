"""Distill a small BERT classifier from a deeper one with the Hugging Face Trainer.

The teacher (4 layers) first learns a synthetic task (is the first token of
the sequence below 50?) with the plain ``Trainer``. The student (2 layers,
same width: today's losses need equal shapes) then trains with
``DistillationTrainer``: its own cross-entropy plus the remote loss, computed
by DistillService, of its hidden states against the teacher's (MSE: student
layer 1 against teacher layer 2, student layer 2 against teacher layer 4)
and of its logits (per-row KL at temperature 2). Both models are built from
configs: nothing is downloaded.

    distill-server &                 # or: make serve
    python examples/hf_trainer.py --target 127.0.0.1:50051 --steps 200

Prints the loss and its two terms at every log, then the first and last of
them and both models' accuracy on held-out data; ``--json`` writes one JSON
line per log (``step``, ``loss``, ``task_loss``, ``distill_loss``), then the
summary. ``pip install '.[hf]'`` brings transformers and accelerate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from distill_client import DistilLoss, Reduction
from distill_client.hf import DistillationTrainer
from distill_client.torch import RemoteDistillLoss

VOCAB, LENGTH = 100, 16


def bert(layers: int) -> BertForSequenceClassification:
    config = BertConfig(  # two labels: the default
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
    )
    return BertForSequenceClassification(config)


def synthetic(rows: int, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Random token sequences; the label says whether the first token is below 50."""
    ids = torch.randint(1, VOCAB, (rows, LENGTH), generator=generator)
    labels = (ids[:, 0] < VOCAB // 2).long()
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(rows)]


def accuracy(model: BertForSequenceClassification, data: list[dict[str, torch.Tensor]]) -> float:
    model.train(False)  # eval mode
    with torch.no_grad():
        logits = model(input_ids=torch.stack([row["input_ids"] for row in data])).logits
    return float((logits.argmax(-1) == torch.stack([row["labels"] for row in data])).float().mean())


def arguments(output_dir: str, steps: int, log_every: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        logging_steps=log_every,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )


class Report(TrainerCallback):
    """One line per training log: the loss and its two terms."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.lines: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not logs or "distill_loss" not in logs:
            return
        line = {"step": state.global_step, **{key: logs[key] for key in ("loss", "task_loss", "distill_loss")}}
        self.lines.append(line)
        if self.as_json:
            print(json.dumps(line), flush=True)
        else:
            print(
                f"step {line['step']:4d}  loss {line['loss']:.4f} = task {line['task_loss']:.4f}"
                f" + distill {line['distill_loss']:.4f}",
                flush=True,
            )


def train(
    target: str | None, steps: int, teacher_steps: int, log_every: int, stream: bool, report: Report
) -> dict[str, float]:
    """Train the teacher, then distill the student from it; returns the summary."""
    generator = torch.Generator().manual_seed(0)
    data, held_out = synthetic(4096, generator), synthetic(512, generator)
    torch.manual_seed(0)
    teacher, student = bert(4), bert(2)
    layers = [
        (1.0, DistilLoss.mse()),
        (1.0, DistilLoss.mse()),
        (0.5, DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW)),
    ]
    with tempfile.TemporaryDirectory() as output_dir:
        teaching = Trainer(teacher, arguments(output_dir, teacher_steps, teacher_steps), train_dataset=data)
        teaching.remove_callback(PrinterCallback)
        teaching.train()
        with RemoteDistillLoss(layers, target=target, stream=stream, names=["layer1", "layer2", "logits"]) as remote:
            trainer = DistillationTrainer(
                student,
                arguments(output_dir, steps, log_every),
                teacher=teacher,
                distill_loss=remote,
                layer_map=[(2, 1), (4, 2)],  # (teacher hidden state, student hidden state); 0 is the embeddings
                distill_logits=True,
                train_dataset=data,
                callbacks=[report],
            )
            trainer.remove_callback(PrinterCallback)  # the report prints instead
            trainer.train()
    first, last = report.lines[0], report.lines[-1]
    return {
        "first_loss": first["loss"],
        "last_loss": last["loss"],
        "first_distill_loss": first["distill_loss"],
        "last_distill_loss": last["distill_loss"],
        "teacher_accuracy": accuracy(teacher, held_out),
        "student_accuracy": accuracy(student, held_out),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="host:port of DistillService (default $DISTILL_TARGET)")
    parser.add_argument("--steps", type=int, default=200, help="the student's training steps")
    parser.add_argument("--teacher-steps", type=int, default=200, help="the teacher's training steps, before")
    parser.add_argument("--log-every", type=int, default=10, help="steps between two logs")
    parser.add_argument("--unary", action="store_true", help="one ComputeTotalLoss call per step instead of a stream")
    parser.add_argument("--json", action="store_true", help="one JSON line per log, then the summary")
    args = parser.parse_args(argv)
    report = Report(as_json=args.json)
    summary = train(args.target, args.steps, args.teacher_steps, args.log_every, not args.unary, report)
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print(
            f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; distill loss "
            f"{summary['first_distill_loss']:.4f} -> {summary['last_distill_loss']:.4f}; accuracy: teacher "
            f"{summary['teacher_accuracy']:.3f}, student {summary['student_accuracy']:.3f}"
        )


if __name__ == "__main__":
    main()
