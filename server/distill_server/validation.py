"""Request messages -> checked layers and arrays, or an error naming the field.

Only what the wire can get wrong is checked here (dtypes, byte lengths,
shapes, loss parameters, indices); the reference's own checks (counts,
empty inputs, lengths, in its order) belong to the engine. A tensor in CUDA
memory is checked as far as that needs no GPU (:mod:`distill_server.cuda_ipc`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from distill.v1 import distill_pb2 as pb
from distill_core import tensors
from distill_core.errors import InvalidArgument, LimitExceeded
from distill_core.losses import DistilLoss, LossKind
from distill_core.wire import TensorView
from distill_server.config import Limits
from distill_server.cuda_ipc import Reference, tensor_reference
from distill_server.engine import Layer

__all__ = [
    "MAX_NAME_CHARS",
    "Counted",
    "Input",
    "elements",
    "labels",
    "layer_index",
    "layer_labels",
    "layers",
    "tensor",
    "tensor_list",
]

MAX_NAME_CHARS = 256
"""Longest layer name: names are echoed in every answer and error."""

Input = npt.NDArray[Any] | Reference
"""A decoded tensor: an array on the request's bytes, or a range of CUDA memory."""


class Counted(Protocol):
    """Anything with an element count: an array, a :class:`Reference`."""

    @property
    def size(self) -> int: ...


def elements(arrays: Sequence[Counted], limits: Limits) -> int:
    """The request's element count, if within ``--max-elements``.

    Raises:
        LimitExceeded: more elements than ``--max-elements``.
    """
    count = sum(int(array.size) for array in arrays)
    if count > limits.max_elements:
        raise LimitExceeded(
            f"the request holds {count} tensor elements; this server takes at most "
            f"{limits.max_elements} (--max-elements)",
            limit=limits.max_elements,
            got=count,
        )
    return count


def layers(messages: Sequence[pb.Layer], limits: Limits) -> list[Layer]:
    """The layers of a request.

    Raises:
        LimitExceeded: more layers than ``--max-layers``.
        InvalidArgument: a non-finite weight, a loss without a kind, or loss
            parameters out of range (field ``layers[i]...``).
    """
    if len(messages) > limits.max_layers:
        raise LimitExceeded(
            f"{len(messages)} layers sent; this server takes at most {limits.max_layers} (--max-layers)",
            field="layers",
            limit=limits.max_layers,
            got=len(messages),
        )
    checked = []
    for i, message in enumerate(messages):
        where = f"layers[{i}]"
        if not math.isfinite(message.weight):
            raise InvalidArgument(
                f"{where}.weight is {message.weight}; expected a finite value",
                field=f"{where}.weight",
                layer=i,
            )
        try:
            loss = DistilLoss.from_proto(message.loss)
        except InvalidArgument as exc:
            field = f"{where}.loss" + (f".{exc.field}" if exc.field else "")
            raise InvalidArgument(f"{field}: {exc.message}", field=field, layer=i) from exc
        if len(message.name) > MAX_NAME_CHARS:
            raise InvalidArgument(
                f"{where}.name has {len(message.name)} characters; expected at most {MAX_NAME_CHARS}",
                field=f"{where}.name",
                layer=i,
            )
        checked.append(Layer(message.weight, loss, message.name))
    return checked


def _decode(view: TensorView, field: str) -> Input:
    return tensor_reference(view, field) if view.cuda_ipc is not None else tensors.decode(view, field)


def tensor(views: Sequence[TensorView], field: str) -> Input:
    """A singular Tensor field, decoded (a view on the request bytes, or a
    checked reference to CUDA memory).

    Raises:
        InvalidArgument: the field is not set, or the tensor is malformed.
    """
    if not views:
        raise InvalidArgument(f"{field} is not set", field=field)
    return _decode(views[0], field)


def tensor_list(views: Sequence[TensorView], field: str) -> list[Input]:
    """A repeated Tensor field, decoded (views on the request bytes, or
    checked references to CUDA memory)."""
    return [_decode(view, f"{field}[{i}]") for i, view in enumerate(views)]


def layer_index(index: int) -> int:
    """A non-negative layer index (the upper bound is the engine's check)."""
    if index < 0:
        raise InvalidArgument(f"layer_index is {index}; expected >= 0", field="layer_index")
    return index


def labels(messages: Mapping[int, pb.Labels], layers: Sequence[Layer]) -> dict[int, np.ndarray]:
    """Each layer's class labels (int64 arrays), by layer index: only layers
    whose loss takes labels may have them (whether each such layer has them,
    and their values, are the engine's checks).

    Raises:
        InvalidArgument: labels for a layer index out of range, or for a layer
            whose loss takes none (field ``labels[i]``).
    """
    decoded = {}
    for index, message in sorted(messages.items()):
        where = f"labels[{index}]"
        if index >= len(layers):
            raise InvalidArgument(f"{where}: there are {len(layers)} layer(s)", field=where, layer=index)
        decoded[index] = layer_labels(message, layers, index, where)
    return decoded


def layer_labels(message: pb.Labels, layers: Sequence[Layer], index: int, field: str = "labels") -> np.ndarray:
    """One layer's class labels as an int64 array (a layer index out of range
    is the engine's error).

    Raises:
        InvalidArgument: the layer's loss takes no labels.
    """
    if index < len(layers) and layers[index].loss.kind is not LossKind.RESPONSE:
        raise InvalidArgument(
            f"{field}: layer {index}'s loss, {layers[index].loss!r}, takes no labels", field=field, layer=index
        )
    return np.array(message.classes, dtype=np.int64)
