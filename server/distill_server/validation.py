"""Request messages -> checked layers and arrays, or an error naming the field.

Only what the wire can get wrong is checked here (dtypes, byte lengths,
shapes, loss parameters, indices); the reference's own checks (counts,
empty inputs, lengths, in its order) belong to the engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from distill.v1 import distill_pb2 as pb
from distill_client import tensors
from distill_client.errors import InvalidArgument, LimitExceeded
from distill_client.losses import DistilLoss
from distill_client.wire import TensorView
from distill_server.admission import READ_COPIES
from distill_server.engine import Layer

__all__ = ["MAX_NAME_CHARS", "Limits", "layer_index", "layers", "tensor", "tensor_list"]

MAX_NAME_CHARS = 256
"""Longest layer name: names are echoed in every answer and error."""

_MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What calls may ask of the server (the ``--max-*`` and timeout flags).

    ``max_inflight_bytes`` bounds the bytes of unary calls in flight (being
    received, computed or answered); None means ``max(2 GiB, 12 x
    max_message_bytes)``, room to receive ten largest messages at once and
    copy one (see :mod:`distill_server.admission`).
    """

    max_message_bytes: int = 256 * _MIB
    max_layers: int = 1024
    max_elements: int = 1 << 28
    max_concurrent_calls: int = 64
    max_concurrent_streams: int = 16
    max_streams_per_connection: int = 100
    max_inflight_bytes: int | None = None
    receive_timeout: float = 30.0
    stream_idle_timeout: float = 300.0

    @property
    def inflight_bytes(self) -> int:
        """``max_inflight_bytes`` with its default resolved."""
        if self.max_inflight_bytes is not None:
            return self.max_inflight_bytes
        return max(2048 * _MIB, 4 * READ_COPIES * self.max_message_bytes)

    def check(self) -> None:
        """Raises ValueError when the limits cannot serve a largest message."""
        needed = READ_COPIES * self.max_message_bytes
        if self.inflight_bytes < needed:
            raise ValueError(
                f"--max-inflight-mb {self.inflight_bytes // _MIB} cannot receive a largest message: gRPC holds "
                f"{READ_COPIES} copies of it while it hands it over, so at least {needed // _MIB}"
            )
        for name in ("receive_timeout", "stream_idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected > 0")

    def check_elements(self, arrays: Sequence[npt.NDArray[Any]]) -> int:
        """The request's element count, if within ``max_elements``.

        Raises:
            LimitExceeded: more elements than ``--max-elements``.
        """
        elements = sum(int(array.size) for array in arrays)
        if elements > self.max_elements:
            raise LimitExceeded(
                f"the request holds {elements} tensor elements; this server takes at most "
                f"{self.max_elements} (--max-elements)",
                limit=self.max_elements,
                got=elements,
            )
        return elements


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


def tensor(views: Sequence[TensorView], field: str) -> npt.NDArray[Any]:
    """A singular Tensor field, decoded (a view on the request bytes).

    Raises:
        InvalidArgument: the field is not set, or the tensor is malformed.
    """
    if not views:
        raise InvalidArgument(f"{field} is not set", field=field)
    return tensors.decode(views[0], field)


def tensor_list(views: Sequence[TensorView], field: str) -> list[npt.NDArray[Any]]:
    """A repeated Tensor field, decoded (views on the request bytes)."""
    return [tensors.decode(view, f"{field}[{i}]") for i, view in enumerate(views)]


def layer_index(index: int) -> int:
    """A non-negative layer index (the upper bound is the engine's check)."""
    if index < 0:
        raise InvalidArgument(f"layer_index is {index}; expected >= 0", field="layer_index")
    return index
