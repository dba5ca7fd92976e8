"""A layer's loss: its kind and parameters (``DistilLoss``) and its result (``LayerLoss``)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from distill.v1 import distill_pb2 as pb
from distill_core import tensors
from distill_core.errors import InvalidArgument

__all__ = ["DistilLoss", "LayerLoss", "LossKind", "Reduction"]


class LossKind(enum.Enum):
    """The loss kinds; values are the proto's ``LossKind`` numbers."""

    MSE = pb.LOSS_KIND_MSE
    COSINE = pb.LOSS_KIND_COSINE
    KL_DIVERGENCE = pb.LOSS_KIND_KL_DIVERGENCE
    COMBINED = pb.LOSS_KIND_COMBINED_KL_MSE


class Reduction(enum.Enum):
    """How a layer's tensors become one value; values are the proto's numbers.

    ``FLATTEN`` (the reference's behaviour): each tensor is one flat vector.
    ``PER_ROW`` (torchdistill, TextBrewer): cosine and KL over the last axis,
    averaged over the rows; teacher and student must agree in shape. MSE is
    the same in both.
    """

    FLATTEN = pb.REDUCTION_FLATTEN
    PER_ROW = pb.REDUCTION_PER_ROW


# LossKind <-> the name of its field in the Loss.kind oneof.
_ONEOF = {
    LossKind.MSE: "mse",
    LossKind.COSINE: "cosine",
    LossKind.KL_DIVERGENCE: "kl_divergence",
    LossKind.COMBINED: "combined_kl_mse",
}
_KINDS = {name: kind for kind, name in _ONEOF.items()}
_CONSTRUCTORS = {**_ONEOF, LossKind.COMBINED: "combined"}
_REDUCTIONS = {pb.REDUCTION_UNSPECIFIED: Reduction.FLATTEN, **{r.value: r for r in Reduction}}


@dataclass(frozen=True)
class DistilLoss:
    """How one layer compares teacher and student features (immutable).

    Build one with :meth:`mse`, :meth:`cosine`, :meth:`kl_divergence` or
    :meth:`combined`; parameters are checked at once, as the server checks
    them (finite weights, a finite temperature > 0).
    """

    kind: LossKind
    temperature: float = 1.0
    kl_weight: float = 0.0
    mse_weight: float = 0.0
    reduction: Reduction = Reduction.FLATTEN

    def __post_init__(self) -> None:
        prefix = _ONEOF[self.kind]
        if self.kind in (LossKind.KL_DIVERGENCE, LossKind.COMBINED):
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise InvalidArgument(
                    f"temperature is {self.temperature}; expected a finite value > 0",
                    field=f"{prefix}.temperature",
                )
        if self.kind is LossKind.COMBINED:
            for name in ("kl_weight", "mse_weight"):
                if not math.isfinite(getattr(self, name)):
                    raise InvalidArgument(
                        f"{name} is {getattr(self, name)}; expected a finite value",
                        field=f"{prefix}.{name}",
                    )

    @classmethod
    def mse(cls, *, reduction: Reduction = Reduction.FLATTEN) -> DistilLoss:
        """Mean squared error: ``sum((t - s)^2) / n``."""
        return cls(LossKind.MSE, reduction=reduction)

    @classmethod
    def cosine(cls, *, reduction: Reduction = Reduction.FLATTEN) -> DistilLoss:
        """Cosine distance: ``1 - cos(t, s)``; two zero vectors give 1."""
        return cls(LossKind.COSINE, reduction=reduction)

    @classmethod
    def kl_divergence(cls, temperature: float, *, reduction: Reduction = Reduction.FLATTEN) -> DistilLoss:
        """``tau^2 * KL(softmax(t / tau) || softmax(s / tau))``."""
        return cls(LossKind.KL_DIVERGENCE, temperature=float(temperature), reduction=reduction)

    @classmethod
    def combined(
        cls, kl_weight: float, mse_weight: float, temperature: float, *, reduction: Reduction = Reduction.FLATTEN
    ) -> DistilLoss:
        """``kl_weight * kl_divergence(temperature) + mse_weight * mse``."""
        return cls(
            LossKind.COMBINED,
            temperature=float(temperature),
            kl_weight=float(kl_weight),
            mse_weight=float(mse_weight),
            reduction=reduction,
        )

    def __repr__(self) -> str:
        if self.kind is LossKind.KL_DIVERGENCE:
            args = [repr(self.temperature)]
        elif self.kind is LossKind.COMBINED:
            args = [repr(self.kl_weight), repr(self.mse_weight), repr(self.temperature)]
        else:
            args = []
        if self.reduction is not Reduction.FLATTEN:
            args.append(f"reduction=Reduction.{self.reduction.name}")
        return f"DistilLoss.{_CONSTRUCTORS[self.kind]}({', '.join(args)})"

    def to_proto(self) -> pb.Loss:
        """The Loss message of this loss."""
        message = pb.Loss(reduction=self.reduction.value)
        if self.kind is LossKind.MSE:
            message.mse.SetInParent()
        elif self.kind is LossKind.COSINE:
            message.cosine.SetInParent()
        elif self.kind is LossKind.KL_DIVERGENCE:
            message.kl_divergence.temperature = self.temperature
        else:
            params = message.combined_kl_mse
            params.kl_weight, params.mse_weight, params.temperature = self.kl_weight, self.mse_weight, self.temperature
        return message

    @classmethod
    def from_proto(cls, message: pb.Loss) -> DistilLoss:
        """The loss a Loss message describes.

        Raises:
            InvalidArgument: no kind set, or parameters out of range; ``field``
                is the path inside the Loss message.
        """
        name = message.WhichOneof("kind")
        if name is None:
            raise InvalidArgument("the loss has no kind; set one of mse, cosine, kl_divergence, combined_kl_mse")
        kind = _KINDS[name]
        if message.reduction not in _REDUCTIONS:
            raise InvalidArgument(
                f"reduction is {message.reduction}; expected REDUCTION_FLATTEN or REDUCTION_PER_ROW",
                field="reduction",
            )
        reduction = _REDUCTIONS[message.reduction]
        if kind is LossKind.KL_DIVERGENCE:
            return cls(kind, temperature=message.kl_divergence.temperature, reduction=reduction)
        if kind is LossKind.COMBINED:
            params = message.combined_kl_mse
            return cls(
                kind,
                temperature=params.temperature,
                kl_weight=params.kl_weight,
                mse_weight=params.mse_weight,
                reduction=reduction,
            )
        return cls(kind, reduction=reduction)


@dataclass(frozen=True)
class LayerLoss:
    """One layer's result: its loss before and after weighting.

    ``gradient`` is the gradient of the total loss with respect to the
    layer's student tensor (its shape and dtype), when it was asked for.
    """

    index: int
    name: str
    loss: float
    weighted_loss: float
    gradient: npt.NDArray[Any] | None = field(default=None, repr=False, compare=False)

    def to_proto(self) -> pb.LayerLoss:
        """The LayerLoss message of this result, without its gradient: the
        server frames gradients itself (:func:`distill_core.wire.frame`)."""
        return pb.LayerLoss(layer_index=self.index, name=self.name, loss=self.loss, weighted_loss=self.weighted_loss)

    @classmethod
    def from_proto(cls, message: pb.LayerLoss) -> LayerLoss:
        """The result a LayerLoss message holds (the gradient as a writable array)."""
        gradient = None
        if message.HasField("student_gradient"):
            gradient = tensors.decode(message.student_gradient, "student_gradient").copy()
        return cls(message.layer_index, message.name, message.loss, message.weighted_loss, gradient)
