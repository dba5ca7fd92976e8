"""Hugging Face bridge: a ``transformers.Trainer`` that distills through the service
(``pip install 'distill-service[hf]'``).

``DistillationTrainer`` trains a student with the usual ``Trainer`` loop; its
training loss is ``task_loss_weight * outputs.loss + distill_loss(teacher
features, student features)``, the second term computed remotely by a
:class:`~distill_client.torch.RemoteDistillLoss`. The features are hidden
states picked by index (``output_hidden_states=True``) and, optionally, the
logits. The teacher is frozen, kept in eval mode and run under
``torch.no_grad`` on the student's device. The two terms are logged, as they
add up to ``loss``, as ``task_loss`` and ``distill_loss`` in
``trainer.state.log_history`` (and so in every reporting integration).
Evaluation measures the student alone: ``evaluate()`` and ``predict()`` call
neither the teacher nor the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

try:
    # The Trainer needs accelerate: say so here, not at the first TrainingArguments.
    import accelerate  # type: ignore[import-untyped]  # noqa: F401
    import transformers
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_pt_utils import nested_gather
    from transformers.trainer_utils import TrainOutput
except ImportError as exc:  # without the hf extra
    raise ImportError(
        f'distill_client.hf needs the "hf" extra: pip install "distill-service[hf]" ({exc.name} is not installed)',
        name=exc.name,
    ) from exc

from distill_client.torch import RemoteDistillLoss
from distill_core.errors import DimensionMismatch, InvalidArgument, LayerIndexOutOfRange, ShapeMismatch

__all__ = ["DistillationTrainer"]

if not hasattr(Trainer, "loss_is_scaled_for_ga"):  # an older Trainer scales by its own rule: steps off by k
    raise ImportError(
        "distill_client.hf needs a transformers whose Trainer has loss_is_scaled_for_ga (5.24 has it), "
        f"not {transformers.__version__}: pip install 'distill-service[hf]'"
    )


def _hidden_state_count(model: nn.Module) -> int | None:
    """How many hidden states the model returns (embeddings + one per layer), when its config says."""
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return layers + 1 if isinstance(layers, int) else None


def _check_index(pair: int, side: str, index: int, count: int) -> None:
    if not -count <= index < count:
        raise LayerIndexOutOfRange(
            f"layer_map[{pair}]: {side} hidden-state index {index} is out of range: the {side} has {count} hidden "
            f"states (the embeddings, then one per layer), so an index lies in {-count}..{count - 1}",
            field=f"layer_map[{pair}]",
            layer=pair,
            expected=count,
            got=index + 1,
        )


def _output(outputs: Any, key: str, side: str) -> Any:
    value = outputs.get(key) if isinstance(outputs, Mapping) else getattr(outputs, key, None)
    if value is None:
        raise InvalidArgument(
            f"the {side}'s outputs have no {key}: it must return a ModelOutput (return_dict) with {key}", field=key
        )
    return value


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss adds the remote distillation loss to the student's own.

    ``distill_loss``'s layers are, in order, one per ``layer_map`` pair, then
    one for the logits when ``distill_logits``. The element-wise losses (MSE,
    cosine, KL) need a pair of equal shapes (same hidden size, same number of
    labels): the first step raises :class:`~distill_client.ShapeMismatch`
    naming the pair otherwise. The batch losses (``DistilLoss.batched``:
    linear CKA, similarity-preserving, PKT) compare the samples of a batch
    with each other, so a narrower student can learn from a wider teacher
    directly. Padding positions count like any other.

    Gradient accumulation: the distillation term is a mean over one
    micro-batch, so by default the task loss is taken as one too (the model
    gets no ``num_items_in_batch``) and the Trainer averages their sum over
    the accumulation steps: ``gradient_accumulation_steps=k`` gives the update
    of one batch ``k`` times as large. Set ``loss_is_scaled_for_ga = True``
    (on the class or the instance) for a model whose loss honours
    ``num_items_in_batch`` (causal LMs) to keep its token-exact accumulation;
    the distillation term is then divided by the accumulation steps here.

    Example::

        with RemoteDistillLoss([(1.0, DistilLoss.mse())], target="127.0.0.1:50051") as remote:
            trainer = DistillationTrainer(
                student, args, teacher=teacher, distill_loss=remote, layer_map=[(4, 2)], train_dataset=data
            )
            trainer.train()

    Args:
        model: The student; it is what trains.
        args: The ``TrainingArguments``.
        teacher: The teacher. Its parameters stop requiring gradients, it is
            put in eval mode and moved to the student's device (unless it has
            a ``device_map``). It gets the student's inputs less the labels.
        distill_loss: The remote loss (not closed here: close it, or use it
            as a context manager, when training is done).
        layer_map: ``(teacher index, student index)`` pairs into the models'
            ``hidden_states``: 0 is the embeddings, ``i`` the output of layer
            ``i``, and negative indices count from the last.
        distill_logits: Also distill the logits, as ``distill_loss``'s last layer.
        task_loss_weight: The weight of the student's own loss; with 0 the
            batches need no labels (distillation alone).
        **trainer_kwargs: ``Trainer``'s other arguments (``train_dataset``,
            ``data_collator``, ``callbacks``, ...).

    Raises:
        LayerIndexOutOfRange: A ``layer_map`` index outside a model's hidden
            states (here, from the models' configs, or at a step).
        DimensionMismatch: ``distill_loss`` has another number of layers than
            the feature pairs (``expected``: its layers, ``got``: the pairs).
        InvalidArgument: Nothing to distill, or a non-finite ``task_loss_weight``.
    """

    loss_is_scaled_for_ga: bool | None = False
    """The loss is a per-micro-batch mean that ``Trainer`` divides by the accumulation steps (see above)."""

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        *,
        teacher: nn.Module,
        distill_loss: RemoteDistillLoss,
        layer_map: Sequence[tuple[int, int]] = (),
        distill_logits: bool = False,
        task_loss_weight: float = 1.0,
        **trainer_kwargs: Any,
    ) -> None:
        layer_map = [(int(t), int(s)) for t, s in layer_map]
        pairs = len(layer_map) + int(distill_logits)
        if pairs == 0:
            raise InvalidArgument("nothing to distill: give layer_map pairs, or distill_logits=True", field="layer_map")
        if len(distill_loss.layers) != pairs:
            raise DimensionMismatch(
                f"distill_loss has {len(distill_loss.layers)} layers but there are {pairs} feature pairs "
                f"({len(layer_map)} in layer_map{', then the logits' if distill_logits else ''}): "
                "give one (weight, DistilLoss) per pair, in that order",
                field="distill_loss.layers",
                expected=len(distill_loss.layers),
                got=pairs,
            )
        if not math.isfinite(task_loss_weight):
            raise InvalidArgument(
                f"task_loss_weight is {task_loss_weight}; expected a finite value", field="task_loss_weight"
            )
        for side, module, position in (("teacher", teacher, 0), ("student", model, 1)):
            count = _hidden_state_count(module)
            if count is not None:
                for pair, indices in enumerate(layer_map):
                    _check_index(pair, side, indices[position], count)

        super().__init__(model, args, **trainer_kwargs)
        self.teacher = teacher.requires_grad_(False).eval()
        if self.place_model_on_device and getattr(teacher, "hf_device_map", None) is None:
            self.teacher.to(self.args.device)
        self.distill_loss = distill_loss
        self.layer_map = layer_map
        self.distill_logits = distill_logits
        self.task_loss_weight = float(task_loss_weight)
        # What the two terms added to the Trainer's running loss since the last log, and the step they started at.
        self._component_sums: dict[str, torch.Tensor] = {}
        self._components_since = 0

    def train(self, *args: Any, **kwargs: Any) -> TrainOutput:
        """``Trainer.train``; the logged terms start afresh, as ``loss`` does."""
        self._component_sums = {}
        return super().train(*args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """In training, ``task_loss_weight * outputs.loss + distill_loss(...)``; else the student's own loss."""
        if not model.training:  # evaluate() and predict(): the student alone
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        scaled = self._loss_is_scaled(num_items_in_batch)
        extra = {"output_hidden_states": True} if self.layer_map else {}
        labelled = any(inputs.get(name) is not None for name in self.label_names)
        if self.task_loss_weight == 0 and not labelled:
            outputs = model(**inputs, **extra)
            task = torch.zeros((), device=self.args.device)
        else:
            # The Trainer's own loss (label smoothing, compute_loss_func), with the hidden states.
            forwarded = num_items_in_batch if scaled else None
            task, outputs = cast(
                "tuple[torch.Tensor, Any]",
                super().compute_loss(model, {**inputs, **extra}, return_outputs=True, num_items_in_batch=forwarded),
            )
            task = self.task_loss_weight * task

        if self.teacher.training:  # something switched it back
            self.teacher.eval()
        teacher_inputs = {key: value for key, value in inputs.items() if key not in self.label_names}
        with torch.no_grad():
            teacher_outputs = self.teacher(**teacher_inputs, **extra)
        teachers, students = self._features(teacher_outputs, outputs)
        distill = self.distill_loss(teachers, students)
        if scaled:  # the Trainer will not divide: do it for this per-micro-batch mean
            distill = distill / self.current_gradient_accumulation_steps
        self._accumulate({"task_loss": task, "distill_loss": distill}, scaled)
        loss = task + distill
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``task_loss`` and ``distill_loss`` to a training log: their means over the same steps as ``loss``."""
        if "loss" in logs and self._component_sums:
            steps = max(1, self.state.global_step - self._components_since)
            for name, total in self._component_sums.items():
                gathered = nested_gather(total, self.args.parallel_mode)  # type: ignore[no-untyped-call]
                logs[name] = gathered.mean().item() / steps  # as the Trainer computes loss
            self._component_sums = {}
        super().log(logs, start_time)

    def _loss_is_scaled(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        """Whether the Trainer takes this step's loss as already scaled for accumulation (its own rule)."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def _features(self, teacher_outputs: Any, student_outputs: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The feature pairs, in ``distill_loss``'s layer order, their shapes checked."""
        pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        if self.layer_map:
            teacher_states = _output(teacher_outputs, "hidden_states", "teacher")
            student_states = _output(student_outputs, "hidden_states", "student")
            for pair, (t, s) in enumerate(self.layer_map):
                _check_index(pair, "teacher", t, len(teacher_states))
                _check_index(pair, "student", s, len(student_states))
                what = f"layer_map[{pair}] (teacher hidden state {t}, student hidden state {s})"
                pairs.append((what, teacher_states[t], student_states[s]))
        if self.distill_logits:
            pairs.append(
                ("logits", _output(teacher_outputs, "logits", "teacher"), _output(student_outputs, "logits", "student"))
            )
        for layer, (what, teacher, student) in enumerate(pairs):
            _, loss = self.distill_loss.layers[layer]
            # A batch loss compares samples with samples (the server checks what it needs); the others, elements.
            if teacher.shape != student.shape and not loss.batched:
                raise ShapeMismatch(
                    f"{what}: the teacher's shape is {tuple(teacher.shape)} and the student's {tuple(student.shape)}; "
                    f"{loss.kind.name} compares features elementwise, so they need equal shapes (map layers of the "
                    "same width, give the student the teacher's hidden size, or use a batch loss such as "
                    "DistilLoss.linear_cka())",
                    field="layer_map" if layer < len(self.layer_map) else "distill_logits",
                    layer=layer,
                )
        return [teacher for _, teacher, _ in pairs], [student for _, _, student in pairs]

    def _accumulate(self, terms: dict[str, torch.Tensor], scaled: bool) -> None:
        """Add each term as ``training_step`` adds the loss to the running total that ``loss`` is logged from."""
        if not self._component_sums:
            self._components_since = self.state.global_step
        for name, term in terms.items():
            value = term.detach().mean()
            if not scaled:
                value = value / self.current_gradient_accumulation_steps
            if name not in self._component_sums:
                self._component_sums[name] = torch.zeros((), device=value.device)
            self._component_sums[name] += value
