"""A layer's loss: its kind and parameters (``DistilLoss``) and its result (``LayerLoss``)."""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from distill.v1 import distill_pb2 as pb
from distill_core import tensors
from distill_core.errors import InvalidArgument

__all__ = [
    "ELEMENTWISE",
    "MAX_EXPONENT",
    "MAX_ORDER",
    "OPTIONS",
    "DistilLoss",
    "LayerLoss",
    "LossKind",
    "Option",
    "Reduction",
    "kind_of",
    "option_problem",
]


class LossKind(enum.Enum):
    """The loss kinds; values are the proto's ``LossKind`` numbers."""

    MSE = pb.LOSS_KIND_MSE
    COSINE = pb.LOSS_KIND_COSINE
    KL_DIVERGENCE = pb.LOSS_KIND_KL_DIVERGENCE
    COMBINED = pb.LOSS_KIND_COMBINED_KL_MSE
    SIMILARITY_PRESERVING = pb.LOSS_KIND_SIMILARITY_PRESERVING
    LINEAR_CKA = pb.LOSS_KIND_LINEAR_CKA
    PKT = pb.LOSS_KIND_PKT
    ATTENTION_TRANSFER = pb.LOSS_KIND_ATTENTION_TRANSFER
    CORRELATION_CONGRUENCE = pb.LOSS_KIND_CORRELATION_CONGRUENCE
    NST = pb.LOSS_KIND_NST
    RKD = pb.LOSS_KIND_RKD
    KD = pb.LOSS_KIND_KD
    DIST = pb.LOSS_KIND_DIST
    LOGIT_STANDARDIZED_KD = pb.LOSS_KIND_LOGIT_STANDARDIZED_KD
    RESPONSE = pb.LOSS_KIND_RESPONSE


class Reduction(enum.Enum):
    """How a layer's tensors become one value; values are the proto's numbers.

    ``FLATTEN`` (the reference's behaviour): each tensor is one flat vector.
    ``PER_ROW`` (torchdistill, TextBrewer): cosine and KL over the last axis,
    averaged over the rows; teacher and student must agree in shape. MSE is
    the same in both. The batch losses (:attr:`DistilLoss.batched`) take the
    first axis as the batch and use ``FLATTEN`` only.
    """

    FLATTEN = pb.REDUCTION_FLATTEN
    PER_ROW = pb.REDUCTION_PER_ROW


# LossKind <-> the name of its field in the Loss.kind oneof.
_ONEOF = {
    LossKind.MSE: "mse",
    LossKind.COSINE: "cosine",
    LossKind.KL_DIVERGENCE: "kl_divergence",
    LossKind.COMBINED: "combined_kl_mse",
    LossKind.SIMILARITY_PRESERVING: "similarity_preserving",
    LossKind.LINEAR_CKA: "linear_cka",
    LossKind.PKT: "pkt",
    LossKind.ATTENTION_TRANSFER: "attention_transfer",
    LossKind.CORRELATION_CONGRUENCE: "correlation_congruence",
    LossKind.NST: "nst",
    LossKind.RKD: "rkd",
    LossKind.KD: "kd",
    LossKind.DIST: "dist",
    LossKind.LOGIT_STANDARDIZED_KD: "logit_standardized_kd",
    LossKind.RESPONSE: "response",
}
_KINDS = {name: kind for kind, name in _ONEOF.items()}
ELEMENTWISE = (LossKind.MSE, LossKind.COSINE, LossKind.KL_DIVERGENCE, LossKind.COMBINED)
"""The losses that compare teacher and student element by element, computed
in blocks: their cost is in proportion to their bytes. (The others hold
whole tensors, and the batch losses' cost grows faster than their inputs.)"""
_PER_SAMPLE = ELEMENTWISE
"""The losses a response distillation's soft term may be: each sample's row compared element-wise."""


def kind_of(message: pb.Loss) -> LossKind | None:
    """The kind a Loss message names, without checking its parameters (None: no kind)."""
    name = message.WhichOneof("kind")
    return None if name is None else _KINDS[name]


_CONSTRUCTORS = {**_ONEOF, LossKind.COMBINED: "combined"}
_REDUCTIONS = {pb.REDUCTION_UNSPECIFIED: Reduction.FLATTEN, **{r.value: r for r in Reduction}}

MAX_ORDER = 8
"""The highest Taylor order (correlation congruence) or kernel degree (NST):
each order is a pass over ``batch x batch`` (or ``channels x channels``)
values, and the papers use 2."""

MAX_EXPONENT = 16
"""The highest attention-transfer exponent ``p`` (the paper uses 1, 2 and 4):
``|f|^p`` stays finite in float64 up to ``|f|`` of 1e9 at 16."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _non_negative(value: Any) -> bool:
    return _number(value) and value >= 0


def _order(value: Any) -> bool:
    return _number(value) and float(value).is_integer() and 1 <= value <= MAX_ORDER


def _exponent(value: Any) -> bool:
    return _number(value) and 1 <= value <= MAX_EXPONENT


_WORDS: dict[Callable[[Any], bool], str] = {
    _positive: "a finite number > 0",
    _non_negative: "a finite number >= 0",
    _order: f"a whole number from 1 to {MAX_ORDER}",
    _exponent: f"a number from 1 to {MAX_EXPONENT}",
}


def _plain(value: Any) -> Any:
    """An option as the contract holds it: names in lower case, numbers (NumPy's
    too) as Python ints or floats; anything else as it is, for the check to refuse."""
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


Option = tuple[Any, "dict[str, int] | Callable[[Any], bool]"]
"""A batch loss option's default, and its values (name -> the proto's enum
number) or the test a number passes."""

_GRAM: dict[str, int] = {"l2": pb.GRAM_NORMALIZATION_L2, "l1": pb.GRAM_NORMALIZATION_L1}
_FORMULATIONS: dict[str, int] = {"paper": pb.FORMULATION_PAPER, "code": pb.FORMULATION_CODE}
_KERNELS: dict[str, int] = {"gaussian": pb.CORRELATION_KERNEL_GAUSSIAN, "bilinear": pb.CORRELATION_KERNEL_BILINEAR}
OPTIONS: dict[LossKind, dict[str, Option]] = {
    LossKind.SIMILARITY_PRESERVING: {"normalization": ("l2", _GRAM)},
    LossKind.LINEAR_CKA: {},
    LossKind.PKT: {"eps": (1e-7, _positive), "mode": ("paper", _FORMULATIONS)},
    LossKind.ATTENTION_TRANSFER: {"p": (2.0, _exponent), "mode": ("paper", _FORMULATIONS)},
    LossKind.CORRELATION_CONGRUENCE: {
        "kernel": ("gaussian", _KERNELS),
        "gamma": (0.4, _positive),
        "max_p": (2, _order),
        "mode": ("paper", _FORMULATIONS),
    },
    LossKind.NST: {"degree": (2, _order), "c": (0.0, _non_negative)},
    LossKind.RKD: {"distance_weight": (1.0, _non_negative), "angle_weight": (2.0, _non_negative)},
    LossKind.KD: {"temperature": (1.0, _positive)},
    LossKind.DIST: {"beta": (1.0, _non_negative), "gamma": (1.0, _non_negative), "temperature": (1.0, _positive)},
    LossKind.LOGIT_STANDARDIZED_KD: {"temperature": (2.0, _positive)},
}
"""The batch losses and their options: the contract's, checked by clients and servers alike."""


def option_problem(kind: LossKind, params: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(option, what is wrong)`` with a batch loss's options, or None when they are valid."""
    known = OPTIONS[kind]
    for name in params:
        if name not in known:
            return name, f"{_ONEOF[kind]} has no option {name!r}; its options: {', '.join(known) or 'none'}"
    for name, value in params.items():
        allowed = known[name][1]
        if isinstance(allowed, dict):
            if not isinstance(value, str) or value not in allowed:
                return name, f"{name} is {value!r}; expected one of {', '.join(map(repr, allowed))}"
        elif not allowed(value):
            return name, f"{name} is {value!r}; expected {_WORDS[allowed]}"
    factors = {LossKind.RKD: ("distance_weight", "angle_weight"), LossKind.DIST: ("beta", "gamma")}.get(kind)
    if factors is not None:
        given = {name: default for name, (default, _) in known.items()} | dict(params)
        if not any(given[name] for name in factors):
            return factors[1], f"{factors[0]} and {factors[1]} are both 0; expected at least one > 0"
    return None


@dataclass(frozen=True)
class DistilLoss:
    """How one layer compares teacher and student features (immutable).

    Build one with a constructor: :meth:`mse`, :meth:`cosine`,
    :meth:`kl_divergence`, :meth:`combined` (element-wise: teacher and
    student of one size), or the batch losses :meth:`similarity_preserving`,
    :meth:`linear_cka`, :meth:`pkt` and :meth:`attention_transfer` (samples
    compared with samples: the widths may differ). Parameters are checked at
    once, as the server checks them.
    """

    kind: LossKind
    temperature: float = 1.0
    kl_weight: float = 0.0
    mse_weight: float = 0.0
    reduction: Reduction = Reduction.FLATTEN
    options: tuple[tuple[str, Any], ...] = ()
    """A batch loss's options as ``(name, value)`` pairs (see :attr:`params`)."""
    hard_label_weight: float = 0.0
    """:meth:`response`: the factor of the cross-entropy with the labels."""
    soft_label_weight: float = 0.0
    """:meth:`response`: the factor of the soft loss."""
    soft_loss: DistilLoss | None = None
    """:meth:`response`: the loss of teacher and student logits, per sample."""

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
        if self.batched:
            self._check_options(prefix)
            object.__setattr__(self, "options", tuple(self.params.items()))  # every option, defaults too
        if self.kind is LossKind.RESPONSE:
            self._check_response(prefix)

    def _check_response(self, prefix: str) -> None:
        for name in ("hard_label_weight", "soft_label_weight"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidArgument(
                    f"{name} is {getattr(self, name)}; expected a finite value", field=f"{prefix}.{name}"
                )
        if self.soft_loss is None or self.soft_loss.kind not in _PER_SAMPLE:
            got = "none" if self.soft_loss is None else repr(self.soft_loss)
            raise InvalidArgument(
                f"the soft loss is {got}; expected one of {', '.join(_ONEOF[kind] for kind in _PER_SAMPLE)}",
                field=f"{prefix}.soft_loss",
            )

    def _check_options(self, prefix: str) -> None:
        if self.reduction is not Reduction.FLATTEN:
            raise InvalidArgument(
                f"reduction is {self.reduction.name}; {prefix} takes the first axis as the batch: "
                "expected REDUCTION_FLATTEN (or unset)",
                field="reduction",
            )
        object.__setattr__(self, "options", tuple((name, _plain(value)) for name, value in self.options))
        problem = option_problem(self.kind, dict(self.options))
        if problem is not None:
            option, what = problem
            raise InvalidArgument(what, field=f"{prefix}.{option}")

    @property
    def batched(self) -> bool:
        """Whether the loss takes the first axis as the batch, on whole
        tensors: the batch losses, which compare samples with samples (so
        the teacher's and the student's widths may differ), and the logit
        losses (:meth:`kd`, :meth:`dist`, :meth:`logit_standardized_kd`)."""
        return self.kind in OPTIONS

    @property
    def params(self) -> dict[str, Any]:
        """A batch loss's options, defaults filled in."""
        return {name: default for name, (default, _) in OPTIONS.get(self.kind, {}).items()} | dict(self.options)

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

    @classmethod
    def similarity_preserving(cls, *, normalization: str = "l2") -> DistilLoss:
        """Similarity-preserving KD (Tung and Mori, 2019): the batch Gram
        matrices ``X X^T``, rows normalized (``"l2"``, the paper; ``"l1"``,
        torchdistill's ``SPKDLoss``), ``||G_t - G_s||_F^2 / batch^2``."""
        return cls(LossKind.SIMILARITY_PRESERVING, options=(("normalization", normalization),))

    @classmethod
    def linear_cka(cls) -> DistilLoss:
        """``1 - CKA(X_t, X_s)``: linear centred kernel alignment of the batches (Kornblith et al., 2019)."""
        return cls(LossKind.LINEAR_CKA)

    @classmethod
    def pkt(cls, *, eps: float = 1e-7, mode: str = "paper") -> DistilLoss:
        """Probabilistic knowledge transfer (Passalis and Tefas, 2018): KL of
        the batch's cosine-kernel conditional probabilities (``mode="code"``:
        torchdistill's ``PKTLoss``)."""
        return cls(LossKind.PKT, options=(("eps", eps), ("mode", mode)))

    @classmethod
    def attention_transfer(cls, *, p: float = 2.0, mode: str = "paper") -> DistilLoss:
        """Attention transfer (Zagoruyko and Komodakis, 2017): the normalized
        maps ``sum_c |x_c|^p`` compared (``mode="code"``: torchdistill's
        ``ATLoss`` default); channel counts may differ."""
        return cls(LossKind.ATTENTION_TRANSFER, options=(("p", p), ("mode", mode)))

    @classmethod
    def correlation_congruence(
        cls, *, kernel: str = "gaussian", gamma: float = 0.4, max_p: int = 2, mode: str = "paper"
    ) -> DistilLoss:
        """Correlation congruence (Peng et al., 2019): the batch's kernel
        matrices compared (``mode="code"``: torchdistill's ``CCKDLoss``)."""
        options = (("kernel", kernel), ("gamma", gamma), ("max_p", max_p), ("mode", mode))
        return cls(LossKind.CORRELATION_CONGRUENCE, options=options)

    @classmethod
    def nst(cls, *, degree: int = 2, c: float = 0.0) -> DistilLoss:
        """Neural selectivity transfer (Huang and Wang, 2017): squared MMD of
        the channel maps with the kernel ``(x . y + c)^degree``."""
        return cls(LossKind.NST, options=(("degree", degree), ("c", c)))

    @classmethod
    def rkd(cls, *, distance_weight: float = 1.0, angle_weight: float = 2.0) -> DistilLoss:
        """Relational KD (Park et al., 2019): the batch's normalized distances
        and triplet angles compared (smooth L1)."""
        return cls(LossKind.RKD, options=(("distance_weight", distance_weight), ("angle_weight", angle_weight)))

    @classmethod
    def kd(cls, temperature: float) -> DistilLoss:
        """KD of logits ``[batch, classes, ...]`` (Hinton et al., 2015) as
        torchdistill's ``KDLoss`` computes its soft term, times ``tau^2``:
        softmax over axis 1, KL summed over the other positions, divided by
        the batch size."""
        return cls(LossKind.KD, options=(("temperature", temperature),))

    @classmethod
    def dist(cls, *, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0) -> DistilLoss:
        """DIST (Huang et al., 2022): ``tau^2`` times one minus the Pearson
        correlations of the class probabilities, per sample (``beta``) and
        per class (``gamma``), of logits ``[batch, classes]``."""
        return cls(LossKind.DIST, options=(("beta", beta), ("gamma", gamma), ("temperature", temperature)))

    @classmethod
    def logit_standardized_kd(cls, temperature: float = 2.0) -> DistilLoss:
        """Logit-standardized KD (Sun et al., 2024): :meth:`kd` of each
        sample's logits z-scored over the classes."""
        return cls(LossKind.LOGIT_STANDARDIZED_KD, options=(("temperature", temperature),))

    @classmethod
    def response(
        cls, soft_loss: DistilLoss, hard_label_weight: float = 0.5, soft_label_weight: float = 0.5
    ) -> DistilLoss:
        """Response distillation (the reference's ``ResponseDistiller``) of
        logits ``[batch, classes]`` with each sample's class label:
        ``hard_label_weight * CE(labels, s) + soft_label_weight * soft_loss(t, s)``,
        both per sample and averaged over the samples. Hinton et al.'s
        ``alpha * CE + (1 - alpha) * tau^2 * KL`` is
        ``response(DistilLoss.kl_divergence(tau), alpha, 1 - alpha)``."""
        return cls(
            LossKind.RESPONSE,
            hard_label_weight=float(hard_label_weight),
            soft_label_weight=float(soft_label_weight),
            soft_loss=soft_loss,
        )

    def __repr__(self) -> str:
        if self.kind is LossKind.KL_DIVERGENCE:
            args = [repr(self.temperature)]
        elif self.kind is LossKind.COMBINED:
            args = [repr(self.kl_weight), repr(self.mse_weight), repr(self.temperature)]
        elif self.kind is LossKind.RESPONSE:
            args = [repr(self.soft_loss), repr(self.hard_label_weight), repr(self.soft_label_weight)]
        else:
            args = [f"{name}={value!r}" for name, value in self.options]
        if self.reduction is not Reduction.FLATTEN:
            args.append(f"reduction=Reduction.{self.reduction.name}")
        return f"DistilLoss.{_CONSTRUCTORS[self.kind]}({', '.join(args)})"

    def to_proto(self) -> pb.Loss:
        """The Loss message of this loss."""
        message = pb.Loss(reduction=self.reduction.value)
        if self.kind is LossKind.KL_DIVERGENCE:
            message.kl_divergence.temperature = self.temperature
        elif self.kind is LossKind.COMBINED:
            params = message.combined_kl_mse
            params.kl_weight, params.mse_weight, params.temperature = self.kl_weight, self.mse_weight, self.temperature
        elif self.kind is LossKind.RESPONSE:
            assert self.soft_loss is not None  # checked when made
            part = message.response
            part.hard_label_weight, part.soft_label_weight = self.hard_label_weight, self.soft_label_weight
            part.soft_loss.CopyFrom(self.soft_loss.to_proto())
        else:
            part = getattr(message, _ONEOF[self.kind])
            part.SetInParent()
            for name, value in self.options:
                allowed = OPTIONS[self.kind][name][1]
                if isinstance(allowed, dict):
                    value = allowed[value]
                setattr(part, name, int(value) if allowed is _order else value)
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
            raise InvalidArgument(f"the loss has no kind; set one of {', '.join(_KINDS)}")
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
        if kind is LossKind.RESPONSE:
            return cls._response_from_proto(message.response, reduction)
        part = getattr(message, name)
        options = []
        for option, (default, allowed) in OPTIONS.get(kind, {}).items():
            if not isinstance(allowed, dict):  # a number: proto3 optional, so unset is not 0
                options.append((option, getattr(part, option) if part.HasField(option) else default))
                continue
            number = getattr(part, option)
            names = {value: text for text, value in allowed.items()}
            if number != 0 and number not in names:
                raise InvalidArgument(
                    f"{option} is {number}; expected one of {sorted(names)} (or unset)", field=f"{name}.{option}"
                )
            options.append((option, names.get(number, default)))
        return cls(kind, reduction=reduction, options=tuple(options))

    @classmethod
    def _response_from_proto(cls, part: pb.Loss.Response, reduction: Reduction) -> DistilLoss:
        soft = None
        if part.HasField("soft_loss"):
            try:
                soft = cls.from_proto(part.soft_loss)
            except InvalidArgument as error:
                inner = f".{error.field}" if error.field else ""
                raise InvalidArgument(f"the soft loss: {error.message}", field=f"response.soft_loss{inner}") from None
        return cls(
            LossKind.RESPONSE,
            reduction=reduction,
            hard_label_weight=part.hard_label_weight,
            soft_label_weight=part.soft_label_weight,
            soft_loss=soft,
        )


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
