"""``RemoteResponseDistiller``: the reference ``ResponseDistiller`` API, computed remotely."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from distill_client._closing import Closing
from distill_client.client import DistillClient
from distill_core import tensors
from distill_core.errors import DimensionMismatch, EmptyInput
from distill_core.losses import DistilLoss, LayerLoss

__all__ = ["RemoteResponseDistiller"]

BALANCED_TEMPERATURE = 4.0
"""The temperature of :meth:`RemoteResponseDistiller.balanced`, as the reference's."""


class RemoteResponseDistiller(Closing):
    """Response distillation with the loss computed by a DistillService.

    ``hard_label_weight * CE(label, student) + soft_label_weight *
    soft_loss(teacher, student)`` of one sample's logits, or its mean over a
    batch, as the reference ``ResponseDistiller`` (note its argument order:
    the student's logits first). Hinton et al.'s ``alpha * CE + (1 - alpha)
    * tau^2 * KL`` is ``RemoteResponseDistiller(DistilLoss.kl_divergence(tau),
    alpha, 1 - alpha)``. The gradient with respect to the student's logits,
    streams and the PyTorch bridge work through :meth:`DistilLoss.response`
    (this distiller's :attr:`loss`) with ``labels``.

    Args:
        soft_loss: The loss of teacher and student logits, per sample: mse,
            cosine, kl_divergence or combined.
        hard_label_weight: Factor of the cross-entropy with the label.
        soft_label_weight: Factor of the soft loss.
        client: A :class:`DistillClient` to use (not closed by :meth:`close`).
        target: Where to connect when no client is given.
        **client_options: Passed to :class:`DistillClient` when it is created here.
    """

    def __init__(
        self,
        soft_loss: DistilLoss,
        hard_label_weight: float,
        soft_label_weight: float,
        *,
        client: DistillClient | None = None,
        target: str | None = None,
        **client_options: Any,
    ) -> None:
        if client is not None and (target is not None or client_options):
            raise ValueError("pass either a client or a target and client options, not both")
        self.loss = DistilLoss.response(soft_loss, hard_label_weight, soft_label_weight)
        self._owns_client = client is None
        self.client = client if client is not None else DistillClient(target, **client_options)

    @classmethod
    def new(
        cls, soft_loss: DistilLoss, hard_label_weight: float, soft_label_weight: float, **kwargs: Any
    ) -> RemoteResponseDistiller:
        """The reference's constructor (the same as calling the class)."""
        return cls(soft_loss, hard_label_weight, soft_label_weight, **kwargs)

    @classmethod
    def pure_kl(cls, temperature: float, **kwargs: Any) -> RemoteResponseDistiller:
        """Soft targets only: ``tau^2 * KL(teacher || student)`` at ``temperature``."""
        return cls(DistilLoss.kl_divergence(temperature), 0.0, 1.0, **kwargs)

    @classmethod
    def balanced(cls, **kwargs: Any) -> RemoteResponseDistiller:
        """Half cross-entropy, half KL at temperature 4, as the reference's."""
        return cls(DistilLoss.kl_divergence(BALANCED_TEMPERATURE), 0.5, 0.5, **kwargs)

    def compute_loss(self, student_logits: Any, teacher_logits: Any, hard_label: int) -> float:
        """The loss of one sample's logits (one value per class) and its label.

        Raises:
            EmptyInput: no logits.
            DimensionMismatch: ``hard_label`` is not below the number of
                classes (expected the classes, got ``hard_label + 1``).
            TeacherStudentMismatch, NonFiniteInput, ...: see :mod:`distill_core.errors`.
        """
        student, teacher = tensors.to_array(student_logits), tensors.to_array(teacher_logits)
        return self._remote(teacher.reshape(-1), student.reshape(-1), [hard_label]).loss

    def compute_batch_loss(
        self, student_batch: Any, teacher_batch: Any, hard_labels: Sequence[int], n_classes: int
    ) -> float:
        """The mean loss over a batch: ``student_batch`` and ``teacher_batch``
        hold ``len(hard_labels)`` rows of ``n_classes`` logits (flat, or
        ``[batch, n_classes]``).

        Raises:
            EmptyInput: no labels (an empty batch).
            DimensionMismatch: a batch that is not ``len(hard_labels) *
                n_classes`` values (expected that, got its size), or a label
                not below ``n_classes``.
        """
        labels = np.asarray(tensors.to_labels(hard_labels, "hard_labels").classes, dtype=np.int64)
        if labels.size == 0:
            raise EmptyInput("ResponseDistiller::compute_batch_loss: the batch is empty", field="hard_labels")
        expected = labels.size * n_classes
        batches = {}
        for field, values in (("student_batch", student_batch), ("teacher_batch", teacher_batch)):
            array = tensors.to_array(values)
            if array.size != expected:
                raise DimensionMismatch(
                    f"{field} holds {array.size} values; expected {labels.size} labels x {n_classes} classes",
                    field=field,
                    expected=expected,
                    got=array.size,
                )
            batches[field] = array.reshape(labels.size, n_classes)
        return self._remote(batches["teacher_batch"], batches["student_batch"], labels).loss

    def _remote(self, teacher: Any, student: Any, labels: Any) -> LayerLoss:
        return self.client.compute_layer_loss([(1.0, self.loss)], 0, teacher, student, labels=labels)

    def close(self) -> None:
        """Close the client if this distiller created it."""
        if self._owns_client:
            self.client.close()

    def __repr__(self) -> str:
        loss = self.loss
        weights = f"{loss.hard_label_weight!r}, {loss.soft_label_weight!r}"
        return f"RemoteResponseDistiller({loss.soft_loss!r}, {weights}, target={self.client.target!r})"
