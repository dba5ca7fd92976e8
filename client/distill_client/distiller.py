"""``RemoteFeatureDistiller``: the reference ``FeatureDistiller`` API, computed remotely."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distill_client._closing import Closing
from distill_client.client import DistillClient, LayerSpec
from distill_client.stream import StreamSession
from distill_core.losses import DistilLoss

__all__ = ["RemoteFeatureDistiller"]

_WEIGHT_SUM_FLOOR = 1e-12


class RemoteFeatureDistiller(Closing):
    """Feature distillation with the losses computed by a DistillService.

    ``L = sum_l w_l * loss_l(teacher_l, student_l)``, one ``(weight, loss)``
    pair per layer, as the reference ``FeatureDistiller``. The layer list
    lives here and travels with each call, so any server replica can answer.

    Args:
        layers: ``(weight, DistilLoss)`` pairs.
        client: A :class:`DistillClient` to use (not closed by :meth:`close`).
        target: Where to connect when no client is given; default
            ``$DISTILL_TARGET``, else ``localhost:50051``.
        **client_options: Passed to :class:`DistillClient` when it is created
            here (``timeout``, ``max_message_bytes``, ``credentials``, ...);
            ``transport="shm"`` (or ``"grpc"``, default ``"auto"``) chooses
            how tensors travel: through shared memory with a server on this
            host, or as bytes (see :class:`DistillClient`).
    """

    def __init__(
        self,
        layers: Sequence[LayerSpec],
        *,
        client: DistillClient | None = None,
        target: str | None = None,
        **client_options: Any,
    ) -> None:
        if client is not None and (target is not None or client_options):
            raise ValueError("pass either a client or a target and client options, not both")
        self.layers: list[LayerSpec] = [(float(weight), loss) for weight, loss in layers]
        self._owns_client = client is None
        self.client = client if client is not None else DistillClient(target, **client_options)

    @classmethod
    def uniform_mse(cls, n_layers: int, **kwargs: Any) -> RemoteFeatureDistiller:
        """``n_layers`` layers of MSE, each weighted ``1 / n_layers``."""
        if n_layers < 0:
            raise ValueError(f"n_layers is {n_layers}; expected >= 0")
        return cls([(1.0 / n_layers if n_layers else 1.0, DistilLoss.mse())] * n_layers, **kwargs)

    @classmethod
    def with_weights(cls, weights: Sequence[float], loss: DistilLoss, **kwargs: Any) -> RemoteFeatureDistiller:
        """One layer per weight, all sharing ``loss``."""
        return cls([(weight, loss) for weight in weights], **kwargs)

    def n_layers(self) -> int:
        """The number of layers."""
        return len(self.layers)

    def normalise_weights(self) -> None:
        """Divide every weight by ``max(sum(|w|), 1e-12)`` (locally, in place).

        With negative weights the signed sum need not be 1, as in the reference.
        Where ``sum(|w|)`` overflows (weights near the float64 maximum), the
        weights are first divided by the largest ``|w|``, so ``[1e308, -1e308]``
        becomes ``[0.5, -0.5]`` rather than zeros.
        """
        magnitudes = [abs(weight) for weight, _ in self.layers]
        total = sum(magnitudes)
        if total == float("inf") and max(magnitudes) != float("inf"):
            # Finite weights whose sum overflows: sum(|w| / max |w|) lies in [1, n].
            top = max(magnitudes)
            self.layers = [(weight / top, loss) for weight, loss in self.layers]
            total = sum(abs(weight) for weight, _ in self.layers)
        total = max(total, _WEIGHT_SUM_FLOOR)
        self.layers = [(weight / total, loss) for weight, loss in self.layers]

    def compute_layer_loss(self, layer_index: int, teacher: Any, student: Any) -> float:
        """``weight_i * loss_i(teacher, student)`` for layer ``layer_index``.

        Raises:
            LayerIndexOutOfRange: (a DimensionMismatch) for an index >= n_layers.
            EmptyInput, TeacherStudentMismatch, NonFiniteInput, ...: see
                :mod:`distill_core.errors`.
        """
        return self.client.compute_layer_loss(self.layers, layer_index, teacher, student).weighted_loss

    def compute_total_loss(self, teacher_feats: Sequence[Any], student_feats: Sequence[Any]) -> float:
        """The sum over layers of ``compute_layer_loss(l, teacher_l, student_l)``.

        Raises:
            DimensionMismatch: a feature count differs from n_layers.
            EmptyInput, TeacherStudentMismatch, ...: the first failing layer's.
        """
        return self.client.compute_total_loss(self.layers, teacher_feats, student_feats).total

    def stream(self, *, gradients: bool = False) -> StreamSession:
        """A ``StreamLosses`` session with these layers, for a training loop:
        ``session.step(teacher_feats, student_feats)`` per step."""
        return self.client.stream(self.layers, gradients=gradients)

    def close(self) -> None:
        """Close the client if this distiller created it."""
        if self._owns_client:
            self.client.close()

    def __repr__(self) -> str:
        return f"RemoteFeatureDistiller({self.layers!r}, target={self.client.target!r})"
