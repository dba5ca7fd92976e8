"""torchdistill integration: the remote loss as a mid-level loss of a YAML config.

Importing this module registers :class:`DistillServiceLoss` in torchdistill's
mid-level loss registry (``pip install torchdistill``), so a config that
imports it, through its top-level ``dependencies`` list, can name it as the
criterion of a ``WeightedSumLoss`` sub-term. Its ``feature_pairs`` take the
shape of torchdistill's own multi-layer losses (``ATLoss``, ``VIDLoss``,
``AltActTransferLoss``): one named pair per layer, each with the ``path`` and
``io`` of its teacher and student tensors in the io dicts and a ``weight``
(default 1), plus the service's ``loss``::

    dependencies:
      - name: 'distill_client.torchdistill'
    ...
    criterion:
      key: 'WeightedSumLoss'
      kwargs:
        sub_terms:
          remote:
            criterion:
              key: 'DistillServiceLoss'
              kwargs:
                target: 'localhost:50051'
                stream: false
                client: {timeout: 30, transport: 'grpc'}   # DistillClient options
                feature_pairs:
                  layer3:
                    teacher: {path: 'layer3', io: 'output'}
                    student: {path: 'layer3', io: 'output'}
                    loss: 'mse'
                    weight: 1.0
                  logits:
                    teacher: {path: 'fc', io: 'output'}
                    student: {path: 'fc', io: 'output'}
                    loss: {kind: 'kl_divergence', temperature: 4.0, reduction: 'per_row'}
                    weight: 0.5
            weight: 1.0

A ``loss`` is ``'mse'`` or ``'cosine'``, or a mapping with ``kind`` (``mse``,
``cosine``, ``kl_divergence``, ``combined``), the kind's parameters
(``temperature``; ``kl_weight`` and ``mse_weight`` for ``combined``) and
``reduction`` (``flatten``, the default, or ``per_row``; names in any case).
The batch losses, which need no adapter between widths, are named the same
way with their options (``{kind: rkd, angle_weight: 2.0}``), or alone
(``'similarity_preserving'``, ``'linear_cka'``, ``'pkt'``, ...); so are the
logit losses (``{kind: kd, temperature: 4.0}``, ``dist``,
``logit_standardized_kd``) and response distillation (``{kind: response,
hard_label_weight: 0.1, soft_label_weight: 0.9, soft_loss: {kind:
kl_divergence, temperature: 4.0}}``), whose labels are torchdistill's
``targets``: a config's ``KDLoss`` with ``alpha`` and targets, entirely remote.
Per-row losses reduce over the last axis; a pair's ``dim`` (torch's
``dim``) names another axis, moved last before the tensors are sent.

**torchdistill's KDLoss.** With ``p = softmax(z_t / tau)`` and
``q = softmax(z_s / tau)`` over the class axis, KDLoss's soft term (what it
returns without targets, or with ``alpha`` 0 or None; in torchdistill 1.1.5
``alpha=None`` also needs a ``beta``, its ``__init__`` computing ``1 - alpha``) is
``S = KLDivLoss(reduction='batchmean')(log q, p) = (1/N) sum_rows KL(p_r || q_r)``,
with no ``tau^2``. The service's ``DistilLoss.kl_divergence(tau,
reduction=Reduction.PER_ROW)`` is ``R = tau^2 * mean_rows KL(p_r || q_r)``:

- logits ``(N, C)``: ``N`` rows, so ``R = tau^2 * S``;
- logits ``(N, C, H, W)``: KDLoss's softmax is over dim 1, so the pair needs
  ``dim: 1`` (the service then reduces ``permute(0, 2, 3, 1)``, ``N*H*W``
  rows of ``C``), and ``S`` sums ``N*H*W`` row terms over ``N``:
  ``R = tau^2 * S / (H*W)`` (``H*W`` is the positions per sample;
  ``(N, C, d1, ..., dk)`` gives ``d1*...*dk``);
- with ``alpha`` and targets KDLoss is ``alpha * CE + beta * tau^2 * S``
  (``beta = 1 - alpha`` by default): the CE term stays local (a
  ``CrossEntropyLoss`` sub-term of weight ``alpha``) and
  ``beta * tau^2 * S = beta * (H*W) * R``, a remote sub-term of weight
  ``beta`` (times ``H*W`` for 4-D logits).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from distill_client.client import DistillClient, TotalLoss
from distill_client.torch import RemoteDistillLoss
from distill_core.errors import InvalidArgument
from distill_core.losses import OPTIONS, DistilLoss, LossKind, Reduction

try:
    from torchdistill.losses.registry import register_mid_level_loss
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("distill_client.torchdistill needs torchdistill: pip install torchdistill") from exc

__all__ = ["DistillServiceLoss", "FeaturePair", "loss_from_config"]

# The kinds a config names, and the keys its loss mapping may hold: what the kind's constructor takes.
_LOSS_KEYS = {
    LossKind.MSE: ("kind", "reduction"),
    LossKind.COSINE: ("kind", "reduction"),
    LossKind.KL_DIVERGENCE: ("kind", "reduction", "temperature"),
    LossKind.COMBINED: ("kind", "kl_weight", "mse_weight", "reduction", "temperature"),
}
_LOSS_KEYS.update({kind: ("kind", *options) for kind, options in OPTIONS.items()})  # the batch losses' options
_LOSS_KEYS[LossKind.RESPONSE] = ("hard_label_weight", "kind", "soft_label_weight", "soft_loss")
_KINDS = {kind.name.lower(): kind for kind in _LOSS_KEYS}
_REDUCTIONS = {reduction.name.lower(): reduction for reduction in Reduction}
_PAIR_KEYS = ("dim", "loss", "student", "teacher", "weight")
_SIDE_KEYS = ("io", "path")


@dataclass(frozen=True)
class _Where:
    """Where a config value sits: its field path and layer, for errors."""

    field: str
    layer: int | None = None

    def at(self, key: str) -> _Where:
        return _Where(f"{self.field}.{key}", self.layer)

    def error(self, problem: str) -> InvalidArgument:
        layer = "" if self.layer is None else f" (layer {self.layer})"
        return InvalidArgument(f"{self.field}{layer} {problem}", field=self.field, layer=self.layer)


def _shown(value: Any) -> str:
    return f"{value!r} (type {type(value).__name__})"


def _choice(value: Any, choices: Mapping[str, Any], where: _Where) -> Any:
    if isinstance(value, str) and value.lower() in choices:
        return choices[value.lower()]
    expected = ", ".join(repr(name) for name in choices)
    raise where.error(f"is {_shown(value)}; expected one of {expected} (any case)")


def _number(value: Any, where: _Where, *, positive: bool = False) -> float:
    expected = "a finite number > 0" if positive else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        # PyYAML reads 1e-3 (no dot) as a string.
        hint = " (YAML reads 1e-3 as a string: write 1.0e-3)" if isinstance(value, str) else ""
        raise where.error(f"is {_shown(value)}; expected {expected}{hint}")
    number = float(value)
    if not math.isfinite(number) or (positive and number <= 0):
        raise where.error(f"is {number!r}; expected {expected}")
    return number


def _mapping(value: Any, where: _Where, allowed: tuple[str, ...], what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise where.error(f"is {_shown(value)}; expected a mapping with keys {', '.join(allowed)}")
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        raise where.error(f"has key {unknown[0]!r}, which {what} does not take; expected keys: {', '.join(allowed)}")
    return value


def _required(config: Mapping[str, Any], key: str, where: _Where, expected: str) -> Any:
    if key not in config:
        raise where.at(key).error(f"is missing; expected {expected}")
    return config[key]


def loss_from_config(spec: Any, *, field: str = "loss", layer: int | None = None) -> DistilLoss:
    """The :class:`DistilLoss` of a config's loss spec.

    ``spec`` is ``'mse'`` or ``'cosine'`` (or a batch loss's name), a mapping
    such as ``{kind: kl_divergence, temperature: 4.0, reduction: per_row}``
    (``combined`` takes ``kl_weight``, ``mse_weight`` and ``temperature``; a
    batch loss its options, :data:`distill_core.losses.OPTIONS`), or a
    ``DistilLoss`` as it is.

    Raises:
        InvalidArgument: an unknown kind or reduction, a missing, unexpected
            or out-of-range parameter; ``field`` and ``layer`` say where,
            the message says what was expected and what was found.
    """
    where = _Where(field, layer)
    if isinstance(spec, DistilLoss):
        return spec
    if isinstance(spec, str):
        kind = _choice(spec, _KINDS, where)
        if kind not in (LossKind.MSE, LossKind.COSINE) and kind not in OPTIONS:
            params = ", ".join(f"{key}: ..." for key in _LOSS_KEYS[kind] if key not in ("kind", "reduction"))
            raise where.error(f"is {spec!r}, which takes parameters: write {{kind: {spec}, {params}}}")
        return DistilLoss(kind)
    if not isinstance(spec, Mapping):
        raise where.error(f"is {_shown(spec)}; expected 'mse', 'cosine' or a mapping with a kind")
    kind = _choice(_required(spec, "kind", where, f"one of {', '.join(_KINDS)}"), _KINDS, where.at("kind"))
    _mapping(spec, where, _LOSS_KEYS[kind], kind.name.lower())
    if kind is LossKind.RESPONSE:  # labels: torchdistill's targets
        soft = loss_from_config(
            _required(spec, "soft_loss", where, "a loss"), field=where.at("soft_loss").field, layer=layer
        )
        hard_weight, soft_weight = (
            _number(_required(spec, key, where, "a finite number"), where.at(key))
            for key in ("hard_label_weight", "soft_label_weight")
        )
        try:
            return DistilLoss.response(soft, hard_weight, soft_weight)
        except InvalidArgument as error:
            raise where.at("soft_loss").error(f"is invalid: {error.message}") from None
    if kind in OPTIONS:  # a batch loss: its options as the contract checks them
        options = tuple((key, value) for key, value in spec.items() if key != "kind")
        try:
            return DistilLoss(kind, options=options)
        except InvalidArgument as error:
            option = (error.field or "").rpartition(".")[2]
            raise (where.at(option) if option in spec else where).error(f"is invalid: {error.message}") from None
    reduction = _choice(spec.get("reduction", "flatten"), _REDUCTIONS, where.at("reduction"))
    if kind in (LossKind.MSE, LossKind.COSINE):
        return DistilLoss(kind, reduction=reduction)
    temperature = _number(
        _required(spec, "temperature", where, "a finite number > 0"), where.at("temperature"), positive=True
    )
    if kind is LossKind.KL_DIVERGENCE:
        return DistilLoss.kl_divergence(temperature, reduction=reduction)
    kl_weight, mse_weight = (
        _number(_required(spec, key, where, "a finite number"), where.at(key)) for key in ("kl_weight", "mse_weight")
    )
    return DistilLoss.combined(kl_weight, mse_weight, temperature, reduction=reduction)


@dataclass(frozen=True)
class FeaturePair:
    """One layer: where its tensors lie in the io dicts, its weight and loss.

    ``dim``: the axis per-row losses reduce over, moved last before sending
    (the service reduces over the last axis); None leaves the tensors as
    they are.
    """

    name: str
    teacher_path: str
    teacher_io: str
    student_path: str
    student_io: str
    weight: float
    loss: DistilLoss
    dim: int | None = None

    @classmethod
    def from_config(cls, name: str, config: Any, layer: int) -> FeaturePair:
        """The pair a ``feature_pairs`` entry describes (errors as :func:`loss_from_config`)."""
        where = _Where(f"feature_pairs.{name}", layer)
        config = _mapping(config, where, _PAIR_KEYS, "a feature pair")
        sides = {}
        for side in ("teacher", "student"):
            at = where.at(side)
            entry = _mapping(_required(config, side, where, "a mapping with keys io, path"), at, _SIDE_KEYS, side)
            path = _required(entry, "path", at, "a module path (a string)")
            io = entry.get("io", "output")
            for key, value in (("path", path), ("io", io)):
                if not isinstance(value, str):
                    raise at.at(key).error(f"is {_shown(value)}; expected a string")
            sides[side] = (path, io)
        dim = config.get("dim")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise where.at("dim").error(f"is {_shown(dim)}; expected an integer axis")
        return cls(
            name=name,
            teacher_path=sides["teacher"][0],
            teacher_io=sides["teacher"][1],
            student_path=sides["student"][0],
            student_io=sides["student"][1],
            weight=_number(config.get("weight", 1.0), where.at("weight")),
            loss=loss_from_config(
                _required(config, "loss", where, "a loss"), field=where.at("loss").field, layer=layer
            ),
            dim=dim,
        )

    def describe(self) -> str:
        """``weight * loss`` of ``student[path][io]`` against ``teacher[path][io]``, on one line."""
        dim = "" if self.dim is None else f", dim={self.dim}"
        return (
            f"{self.name}: {self.weight!r} * {self.loss!r} on student[{self.student_path!r}][{self.student_io!r}]"
            f" vs teacher[{self.teacher_path!r}][{self.teacher_io!r}]{dim}"
        )


@register_mid_level_loss
class DistillServiceLoss(torch.nn.Module):
    """The weighted sum of a DistillService's losses over feature pairs, as a torchdistill mid-level loss.

    ``forward(student_io_dict, teacher_io_dict, ...)`` takes each pair's
    tensors from the io dicts torchdistill's forward hooks fill
    (``{module_path: {'input'|'output': tensor}}``) and returns
    :class:`~distill_client.torch.RemoteDistillLoss`'s scalar: ``backward()``
    trains the student with the server's gradients; teachers are detached.
    A context manager: ``with`` closes its stream and any client it made.

    Args:
        feature_pairs: Pair name -> ``{teacher: {path, io}, student: {path,
            io}, loss, weight, dim}`` (``io`` defaults to ``'output'``,
            ``weight`` to 1); the names go to the server as layer names,
            so its errors name them.
        target: The server; default ``$DISTILL_TARGET``, else
            ``localhost:50051``.
        stream: Send the steps over one ``StreamLosses`` stream.
        client: A :class:`DistillClient` to use (not closed by
            :meth:`close`; no ``target`` then), or the options of the one
            made here (``timeout``, ``transport``, ``token``, ...).

    Raises:
        InvalidArgument: a malformed config (see :func:`loss_from_config`),
            before any connection is made.
    """

    def __init__(
        self,
        feature_pairs: Mapping[str, Any],
        *,
        target: str | None = None,
        stream: bool = False,
        client: DistillClient | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(feature_pairs, Mapping) or not feature_pairs:
            raise _Where("feature_pairs").error(
                f"is {_shown(feature_pairs)}; expected a non-empty mapping of pair names to pairs"
            )
        self.pairs = tuple(
            FeaturePair.from_config(str(name), config, index)
            for index, (name, config) in enumerate(feature_pairs.items())
        )
        if not isinstance(stream, bool):
            raise _Where("stream").error(f"is {_shown(stream)}; expected true or false")
        if target is not None and not isinstance(target, str):
            raise _Where("target").error(f"is {_shown(target)}; expected a string such as 'localhost:50051'")
        layers = [(pair.weight, pair.loss) for pair in self.pairs]
        names = [pair.name for pair in self.pairs]
        if isinstance(client, DistillClient):
            if target is not None:
                raise _Where("target").error("is given with a client; give one or the other")
            self.remote = RemoteDistillLoss(layers, client=client, stream=stream, names=names)
        else:
            if client is not None and not isinstance(client, Mapping):
                raise _Where("client").error(
                    f"is {_shown(client)}; expected a DistillClient or a mapping of its options"
                )
            options = dict(client or {})
            if "target" in options:
                raise _Where("client.target").error("is set; give the target as the loss's own target")
            self.remote = RemoteDistillLoss(layers, target=target, stream=stream, names=names, **options)
        self.stream = stream

    @property
    def last(self) -> TotalLoss | None:
        """The last step's full result (each layer's loss), or None."""
        return self.remote.last

    def _feature(self, io_dict: Mapping[str, Any], side: str, index: int, pair: FeaturePair) -> torch.Tensor:
        path, io = (pair.teacher_path, pair.teacher_io) if side == "teacher" else (pair.student_path, pair.student_io)
        where = _Where(f"feature_pairs.{pair.name}.{side}", index)
        if path not in io_dict:
            raise where.at("path").error(
                f"is {path!r}, which the {side}'s io dict lacks: it holds {sorted(map(str, io_dict))} "
                f"(torchdistill's forward_hook config of the {side} chooses the module paths)"
            )
        entry = io_dict[path]
        if not isinstance(entry, Mapping) or io not in entry:
            held = sorted(map(str, entry)) if isinstance(entry, Mapping) else _shown(entry)
            raise where.at("io").error(f"is {io!r}, which {side}_io_dict[{path!r}] lacks: it holds {held}")
        tensor = entry[io]
        if not isinstance(tensor, torch.Tensor):
            raise where.error(f"names {side}_io_dict[{path!r}][{io!r}], a {type(tensor).__name__}; expected a tensor")
        if pair.dim is not None:
            if not -tensor.dim() <= pair.dim < tensor.dim():
                raise _Where(f"feature_pairs.{pair.name}.dim", index).error(
                    f"is {pair.dim}; the {side}'s tensor has {tensor.dim()} axes (shape {tuple(tensor.shape)})"
                )
            tensor = tensor.movedim(pair.dim, -1)
        return tensor

    def forward(
        self,
        student_io_dict: Mapping[str, Any],
        teacher_io_dict: Mapping[str, Any],
        targets: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The remote weighted sum over the pairs; torchdistill's ``targets``
        are the class labels of the pairs with a ``response`` loss."""
        teachers = [self._feature(teacher_io_dict, "teacher", i, pair) for i, pair in enumerate(self.pairs)]
        students = [self._feature(student_io_dict, "student", i, pair) for i, pair in enumerate(self.pairs)]
        responses = [i for i, pair in enumerate(self.pairs) if pair.loss.kind is LossKind.RESPONSE]
        if responses and targets is None:
            pair = self.pairs[responses[0]]
            raise _Where(f"feature_pairs.{pair.name}.loss", responses[0]).error(
                "is a response loss, which needs the batch's class labels: torchdistill passed no targets"
            )
        loss: torch.Tensor = self.remote(teachers, students, labels=dict.fromkeys(responses, targets))
        return loss

    def extra_repr(self) -> str:
        pairs = "; ".join(pair.describe() for pair in self.pairs)
        return f"target={self.remote.client.target!r}, stream={self.stream}, feature_pairs=[{pairs}]"

    def __str__(self) -> str:
        # One line, for torchdistill's WeightedSumLoss description ('Loss = w * criterion + ...').
        return f"{type(self).__name__}({self.extra_repr()})"

    def close(self) -> None:
        """End the stream, and close the client if this loss created it."""
        self.remote.close()

    def __enter__(self) -> DistillServiceLoss:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
