"""A layer's loss: its kind and parameters (``DistilLoss``) and its result (``LayerLoss``)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from distill.v1 import distill_pb2 as pb
from distill_client.errors import InvalidArgument

__all__ = ["DistilLoss", "LayerLoss", "LossKind"]


class LossKind(enum.Enum):
    """The loss kinds; values are the proto's ``LossKind`` numbers."""

    MSE = pb.LOSS_KIND_MSE
    COSINE = pb.LOSS_KIND_COSINE
    KL_DIVERGENCE = pb.LOSS_KIND_KL_DIVERGENCE
    COMBINED = pb.LOSS_KIND_COMBINED_KL_MSE


# LossKind <-> the name of its field in the Loss.kind oneof.
_ONEOF = {
    LossKind.MSE: "mse",
    LossKind.COSINE: "cosine",
    LossKind.KL_DIVERGENCE: "kl_divergence",
    LossKind.COMBINED: "combined_kl_mse",
}
_KINDS = {name: kind for kind, name in _ONEOF.items()}


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
    def mse(cls) -> DistilLoss:
        """Mean squared error: ``sum((t - s)^2) / n``."""
        return cls(LossKind.MSE)

    @classmethod
    def cosine(cls) -> DistilLoss:
        """Cosine distance: ``1 - cos(t, s)``; two zero vectors give 1."""
        return cls(LossKind.COSINE)

    @classmethod
    def kl_divergence(cls, temperature: float) -> DistilLoss:
        """``tau^2 * KL(softmax(t / tau) || softmax(s / tau))``."""
        return cls(LossKind.KL_DIVERGENCE, temperature=float(temperature))

    @classmethod
    def combined(cls, kl_weight: float, mse_weight: float, temperature: float) -> DistilLoss:
        """``kl_weight * kl_divergence(temperature) + mse_weight * mse``."""
        return cls(
            LossKind.COMBINED,
            temperature=float(temperature),
            kl_weight=float(kl_weight),
            mse_weight=float(mse_weight),
        )

    def __repr__(self) -> str:
        if self.kind is LossKind.KL_DIVERGENCE:
            return f"DistilLoss.kl_divergence({self.temperature!r})"
        if self.kind is LossKind.COMBINED:
            return f"DistilLoss.combined({self.kl_weight!r}, {self.mse_weight!r}, {self.temperature!r})"
        return f"DistilLoss.{_ONEOF[self.kind]}()"

    def to_proto(self) -> pb.Loss:
        """The Loss message of this loss."""
        if self.kind is LossKind.MSE:
            return pb.Loss(mse=pb.Loss.Mse())
        if self.kind is LossKind.COSINE:
            return pb.Loss(cosine=pb.Loss.Cosine())
        if self.kind is LossKind.KL_DIVERGENCE:
            return pb.Loss(kl_divergence=pb.Loss.KlDivergence(temperature=self.temperature))
        return pb.Loss(
            combined_kl_mse=pb.Loss.CombinedKlMse(
                kl_weight=self.kl_weight, mse_weight=self.mse_weight, temperature=self.temperature
            )
        )

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
        if kind is LossKind.KL_DIVERGENCE:
            return cls(kind, temperature=message.kl_divergence.temperature)
        if kind is LossKind.COMBINED:
            params = message.combined_kl_mse
            return cls(
                kind,
                temperature=params.temperature,
                kl_weight=params.kl_weight,
                mse_weight=params.mse_weight,
            )
        return cls(kind)


@dataclass(frozen=True)
class LayerLoss:
    """One layer's result: its loss before and after weighting."""

    index: int
    name: str
    loss: float
    weighted_loss: float

    def to_proto(self) -> pb.LayerLoss:
        """The LayerLoss message of this result."""
        return pb.LayerLoss(layer_index=self.index, name=self.name, loss=self.loss, weighted_loss=self.weighted_loss)

    @classmethod
    def from_proto(cls, message: pb.LayerLoss) -> LayerLoss:
        """The result a LayerLoss message holds."""
        return cls(message.layer_index, message.name, message.loss, message.weighted_loss)
