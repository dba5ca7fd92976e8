"""The Hugging Face bridge and its example, against a real server: one Trainer
step is the step a local computation of the same loss would take."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from distill_client import (
    DimensionMismatch,
    DistillClient,
    DistilLoss,
    InvalidArgument,
    LayerIndexOutOfRange,
    Reduction,
    ShapeMismatch,
)
from tests.servers import InProcessServer
from tests.torch_reference import torch_loss

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
hf = pytest.importorskip("distill_client.hf")
bridge = pytest.importorskip("distill_client.torch")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer.py"
# Two hidden-state pairs (teacher: 4 states, student: 3), then the logits.
LAYER_MAP = [(3, 2), (1, 1)]
LAYERS = [
    (0.5, DistilLoss.mse()),
    (2.0, DistilLoss.cosine(reduction=Reduction.PER_ROW)),
    (0.7, DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW)),
]
LR = 1.0  # SGD: a step moves each parameter by its gradient


def bert(layers: int, hidden: int = 32, dropout: float = 0.0, seed: int = 0) -> Any:
    """A tiny BERT classifier in float64, built from its config."""
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).double()


def dataset(rows: int, labels: bool = True) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (rows, 6), generator=gen)
    mask = torch.ones(rows, 6, dtype=torch.long)
    mask[::2, 4:] = 0  # some padding
    targets = torch.randint(0, 3, (rows,), generator=gen)
    return [
        {"input_ids": ids[i], "attention_mask": mask[i], **({"labels": targets[i]} if labels else {})}
        for i in range(rows)
    ]


def arguments(path: Path, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "output_dir": str(path),
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "optim": "sgd",
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,  # no clipping: the update is the gradient
        "per_device_train_batch_size": 4,
        "max_steps": 1,
        "logging_steps": 1,
        **overrides,
    }
    return transformers.TrainingArguments(**settings)


def trainer(
    client: DistillClient, tmp_path: Path, student: Any, teacher: Any, data: list[dict[str, Any]], **options: Any
) -> Any:
    settings: dict[str, Any] = {"layer_map": LAYER_MAP, "distill_logits": True, "args": arguments(tmp_path)}
    settings.update(options)
    remote = bridge.RemoteDistillLoss(settings.pop("layers", LAYERS), client=client)
    built = hf.DistillationTrainer(student, teacher=teacher, distill_loss=remote, train_dataset=data, **settings)
    built.remove_callback(transformers.PrinterCallback)  # it prints every log to stdout
    return built


def local_loss(teacher: Any, student: Any, batch: list[dict[str, Any]], task_loss_weight: float = 1.0) -> Any:
    """The same loss computed here: the student's cross-entropy plus the layers' torch formulas."""
    inputs = {key: torch.stack([row[key] for row in batch]) for key in batch[0]}
    labels = inputs.pop("labels", None)
    with torch.no_grad():
        t = teacher.eval()(**inputs, output_hidden_states=True)
    s = student(**inputs, labels=labels, output_hidden_states=True)
    pairs = [(t.hidden_states[i], s.hidden_states[j]) for i, j in LAYER_MAP] + [(t.logits, s.logits)]
    distill = sum(w * torch_loss(loss, tf, sf) for (w, loss), (tf, sf) in zip(LAYERS, pairs, strict=True))
    return (task_loss_weight * s.loss if labels is not None else 0) + distill


def expected_update(teacher: Any, student: Any, batches: list[list[dict[str, Any]]], weight: float = 1.0) -> Any:
    """The student after one SGD step on the mean of the batches' local losses."""
    moved = copy.deepcopy(student)
    (sum(local_loss(teacher, moved, batch, weight) for batch in batches) / len(batches)).backward()
    with torch.no_grad():
        for p in moved.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    return moved


def assert_same_parameters(actual: Any, expected: Any) -> None:
    for (name, a), (_, e) in zip(actual.named_parameters(), expected.named_parameters(), strict=True):
        # float64 throughout and the server computes in float64: only rounding differs.
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12, msg=name)


def test_one_step_is_the_local_step(client: DistillClient, tmp_path: Path) -> None:
    teacher, student, data = bert(3, dropout=0.1, seed=1), bert(2), dataset(4)  # teacher dropout: eval must matter
    expected = expected_update(teacher, student, [data])
    before = copy.deepcopy(student)
    calls: list[dict[str, Any]] = []
    teacher.train()  # the trainer puts it in eval mode
    teacher.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    trainer(client, tmp_path, student, teacher, data).train()
    assert_same_parameters(student, expected)
    assert [sorted(kwargs) for kwargs in calls] == [["attention_mask", "input_ids", "output_hidden_states"]]
    assert not all(torch.equal(a, b) for a, b in zip(student.parameters(), before.parameters(), strict=True))


@pytest.mark.parametrize(
    ("weight", "scaled", "labels"),
    [
        # The default: the Trainer divides the sum by the accumulation steps. (A plain Trainer takes BERT's loss
        # as normalised by num_items_in_batch, which it ignores, and doubles the step here.)
        pytest.param(1.0, False, True, id="mean"),
        pytest.param(0.0, True, True, id="scaled"),  # loss_is_scaled_for_ga: the distillation term is divided here
        pytest.param(0.0, False, False, id="unlabelled"),  # distillation alone needs no labels
    ],
)
def test_gradient_accumulation_gives_the_step_of_the_whole_batch(
    client: DistillClient, tmp_path: Path, weight: float, scaled: bool, labels: bool
) -> None:
    teacher, student, data = bert(3, dropout=0.1, seed=1), bert(2), dataset(8, labels=labels)
    # Two micro-batches of 4, in whatever order the sampler draws: every term is a mean over equal micro-batches.
    expected = expected_update(teacher, student, [data[:4], data[4:]], weight)
    teacher.train()  # the trainer puts it in eval mode
    teacher_before = copy.deepcopy(teacher.state_dict())
    built = trainer(
        client,
        tmp_path,
        student,
        teacher,
        data,
        task_loss_weight=weight,
        args=arguments(tmp_path, gradient_accumulation_steps=2),
    )
    if scaled:
        built.loss_is_scaled_for_ga = True  # else the class's default
    modes: list[bool] = []

    class Watch(transformers.TrainerCallback):
        def on_substep_end(self, *args: Any, **kwargs: Any) -> None:
            modes.append(teacher.training)

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            modes.append(teacher.training)

    built.add_callback(Watch())
    built.train()
    assert built.state.global_step == 1 and modes == [False, False]
    assert_same_parameters(student, expected)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


def test_the_terms_are_logged_as_they_add_up_to_the_loss(client: DistillClient, tmp_path: Path) -> None:
    # Steps of 2 micro-batches, a log every 2 steps: 4 micro-batches per log, and the 3rd step's are left over.
    args = arguments(tmp_path, gradient_accumulation_steps=2, max_steps=3, logging_steps=2, learning_rate=0.05)
    built = trainer(client, tmp_path, bert(2), bert(3, seed=1), dataset(16), args=args)
    remote_totals: list[float] = []

    class Record(transformers.TrainerCallback):  # the remote loss of each micro-batch, as the server computed it
        def on_substep_end(self, *args: Any, **kwargs: Any) -> None:
            remote_totals.append(built.distill_loss.last.total)

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            remote_totals.append(built.distill_loss.last.total)

    built.add_callback(Record())
    for run in range(2):  # a second train() logs its own terms only, as it does its loss
        built.train()
        logs = [entry for entry in built.state.log_history if "loss" in entry]
        assert [entry["step"] for entry in logs] == [2]
        entry, window = logs[0], remote_totals[6 * run : 6 * run + 4]
        # The mean over 2 steps x 2 micro-batches, as the Trainer's loss is.
        assert entry["distill_loss"] == pytest.approx(sum(window) / 4, rel=1e-6)
        assert entry["task_loss"] > 0
        assert entry["task_loss"] + entry["distill_loss"] == pytest.approx(entry["loss"], rel=1e-6)
    assert len(remote_totals) == 12


def test_evaluation_measures_the_student_alone(client: DistillClient, tmp_path: Path) -> None:
    teacher, student, data = bert(3, seed=1), bert(2), dataset(4)
    built = trainer(client, tmp_path, student, teacher, data, eval_dataset=data)
    metrics = built.evaluate()
    inputs = {key: torch.stack([row[key] for row in data]) for key in data[0]}
    with torch.no_grad():
        assert metrics["eval_loss"] == pytest.approx(student(**inputs).loss.item(), rel=1e-6)
    assert built.distill_loss.last is None  # the server was not called


def test_bad_layer_indices_are_named(client: DistillClient, tmp_path: Path) -> None:
    with pytest.raises(
        LayerIndexOutOfRange, match=r"layer_map\[1\]: teacher hidden-state index 4 is out of range"
    ) as e:
        trainer(client, tmp_path, bert(2), bert(3), dataset(4), layer_map=[(3, 2), (4, 1)])
    assert "the teacher has 4 hidden states" in str(e.value) and "-4..3" in str(e.value)
    assert (e.value.expected, e.value.got, e.value.field) == (4, 5, "layer_map[1]")
    assert isinstance(e.value, InvalidArgument)
    with pytest.raises(LayerIndexOutOfRange, match=r"layer_map\[0\]: student hidden-state index -4 .* -3..2"):
        trainer(client, tmp_path, bert(2), bert(3), dataset(4), layer_map=[(3, -4), (1, 1)])
    with pytest.raises(DimensionMismatch, match="distill_loss has 3 layers but there are 2 feature pairs") as d:
        trainer(client, tmp_path, bert(2), bert(3), dataset(4), distill_logits=False)
    assert (d.value.expected, d.value.got) == (3, 2)
    with pytest.raises(InvalidArgument, match="nothing to distill"):
        trainer(client, tmp_path, bert(2), bert(3), dataset(4), layer_map=[], distill_logits=False, layers=[])


def test_mismatched_shapes_stop_the_first_step(client: DistillClient, tmp_path: Path) -> None:
    student = bert(2, hidden=16)
    before = copy.deepcopy(student.state_dict())
    built = trainer(client, tmp_path, student, bert(3), dataset(4))
    with pytest.raises(ShapeMismatch, match=r"layer_map\[0\] \(teacher hidden state 3, student hidden state 2\)") as e:
        built.train()
    assert "(4, 6, 32)" in str(e.value) and "(4, 6, 16)" in str(e.value)
    assert "MSE compares features elementwise, so they need equal shapes" in str(e.value)
    assert e.value.layer == 0
    assert built.distill_loss.last is None  # nothing was sent
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def linear_cka_loss(t: Any, s: Any) -> Any:
    """``1 - CKA`` of two batches (Kornblith et al., 2019), each sample flattened."""
    x, y = t.reshape(len(t), -1), s.reshape(len(s), -1)
    x, y = x - x.mean(0), y - y.mean(0)
    return 1 - (y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm())


def test_a_batch_loss_distills_a_narrower_student(client: DistillClient, tmp_path: Path) -> None:
    teacher, student, data = bert(3, seed=1), bert(2, hidden=16), dataset(4)
    layers = [(1.5, DistilLoss.linear_cka())]
    moved = copy.deepcopy(student)
    inputs = {key: torch.stack([row[key] for row in data]) for key in data[0]}
    with torch.no_grad():
        t = teacher(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=True)
    s = moved(**inputs, output_hidden_states=True)
    (s.loss + 1.5 * linear_cka_loss(t.hidden_states[3], s.hidden_states[2])).backward()
    with torch.no_grad():
        for p in moved.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    trainer(client, tmp_path, student, teacher, data, layer_map=[(3, 2)], distill_logits=False, layers=layers).train()
    assert_same_parameters(student, moved)


def test_the_example_trains_a_student(server: InProcessServer) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--target", server.target, "--steps", "40", "--teacher-steps", "20", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},  # the models are built from configs: nothing to download
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [line["step"] for line in lines[:-1]] == [10, 20, 30, 40]  # one line per log, then the summary
    assert all(line["task_loss"] + line["distill_loss"] == pytest.approx(line["loss"], rel=1e-5) for line in lines[:-1])
    summary = lines[-1]
    # Measured: the distillation loss falls 2.5x in 40 steps (and 45x in the default 200).
    assert summary["last_distill_loss"] < 0.6 * summary["first_distill_loss"]
    assert summary["last_loss"] < summary["first_loss"]
