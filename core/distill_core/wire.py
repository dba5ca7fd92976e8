"""Requests that carry tensors, framed without copying the tensor bytes.

Protobuf's Python runtime copies a ``bytes`` field when a message is built,
again when it is serialized, when it is parsed and on every read. For
feature maps of tens of MB those copies are most of a call's time, so the
client and the server frame the tensor fields themselves and let the
protobuf runtime handle everything else:

- building (requests on the client, responses with gradients on the
  server): the message without its tensors is serialized by protobuf; each
  tensor is appended as its own length-delimited field (a Tensor holding
  dtype and shape, serialized by protobuf, then the raw ``data`` field
  pointing at the array's memory). Appending a field to a serialized message
  is how protobuf defines merging, so the result is an ordinary message that
  any client or server parses.
- splitting: the top-level fields of a received request are walked; the
  tensor fields become :class:`TensorView` objects whose ``data`` is a
  ``memoryview`` of the request bytes, and the remaining bytes are parsed by
  protobuf. Field order, packed or unpacked shapes, repeated occurrences of
  a singular field (merged) and unknown fields follow protobuf's rules.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from distill.v1 import distill_pb2 as pb
from distill_core.errors import InvalidArgument, LimitExceeded
from distill_core.tensors import MAX_RANK, to_wire

__all__ = ["MAX_LABEL_BYTES", "Framed", "TensorView", "build", "frame", "split"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_DATA_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number

_Message = TypeVar("_Message", bound=Message)

_TENSOR_FIELDS = 2 * MAX_RANK + 8
"""Most fields one Tensor occurrence may hold (an unpacked shape is one per dimension)."""
_SCALAR_FIELDS = 64
"""Most top-level fields of a request besides its layers and tensors."""

MAX_LABEL_BYTES = 4 << 20
"""Most bytes of class labels (``labels``) a request may hold: enough for the
2^21 rows of a response loss's largest logits (2^22 elements, 2 classes) at
up to 2 bytes a label. Protobuf unpacks each label into 8 bytes and the
server copies them into an array, so a label of 1 byte on the wire costs
16: this keeps what labels make the server hold to 64 MiB a request."""

Chunk = bytes | memoryview


@dataclass(frozen=True)
class TensorView:
    """A Tensor message whose ``data`` is a view on the request bytes (or, with
    ``shared_memory`` set, on the bytes read from that range; with
    ``cuda_ipc`` set, the elements are in CUDA memory and ``data`` is empty
    unless the sender set both)."""

    dtype: int
    shape: Sequence[int]
    data: memoryview
    shared_memory: pb.SharedMemoryRef | None = None
    cuda_ipc: pb.CudaIpcRef | None = None


_ONE_BYTE = [bytes([value]) for value in range(0x80)]


def _varint(value: int) -> bytes:
    if value < 0x80:  # every tag, and the sizes of small messages
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, chunks: Sequence[Chunk]) -> list[Chunk]:
    size = sum(len(chunk) if isinstance(chunk, bytes) else chunk.nbytes for chunk in chunks)
    return [_varint(number << 3 | _LEN), _varint(size), *chunks]


@dataclass(frozen=True)
class Framed:
    """A serialized message as chunks: the arrays' memory is not copied yet."""

    chunks: list[Chunk]


SMALL_TENSOR_BYTES = 1 << 14
"""Tensors of at most this many bytes are framed by protobuf, their bytes
copied: cheaper than framing them in Python (the same bytes either way)."""


def _tensor_body(value: Any) -> list[Chunk]:
    if isinstance(value, pb.Tensor):  # already a message: a shared-memory or CUDA IPC reference
        return [value.SerializeToString()]
    code, array = to_wire(value)
    if array.nbytes <= SMALL_TENSOR_BYTES:
        return [pb.Tensor(dtype=code, shape=array.shape, data=array.tobytes()).SerializeToString()]
    header = pb.Tensor(dtype=code, shape=array.shape).SerializeToString()
    return [header, *_len_field(_DATA_FIELD, [array.reshape(-1).view(np.uint8).data])]


def frame(message: Message, **fields: Any) -> Framed:
    """``message`` serialized, with message fields appended without copies.

    Each keyword names a message-typed field of ``message``: a Tensor field
    takes arrays (or Tensor messages, which carry no bytes of their own: a
    shared-memory or CUDA IPC reference), any other message field takes :class:`Framed`
    messages; a repeated field takes a sequence of them, a singular field one.
    """
    chunks: list[Chunk] = [message.SerializeToString()]
    by_name = message.DESCRIPTOR.fields_by_name
    for name, value in fields.items():
        field = by_name[name]
        for item in value if field.is_repeated else [value]:
            body = item.chunks if isinstance(item, Framed) else _tensor_body(item)
            chunks += _len_field(field.number, body)
    return Framed(chunks)


def build(message: Message, **fields: Any) -> bytes:
    """:func:`frame`, joined: the arrays' bytes are copied once, into the result."""
    return b"".join(frame(message, **fields).chunks)


def _malformed(what: str) -> InvalidArgument:
    return InvalidArgument(f"malformed request: {what}")


def _read_varint(buffer: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while pos < len(buffer) and shift < 64:
        byte = buffer[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise _malformed("truncated or overlong varint")


def _fields(
    buffer: memoryview, start: int, stop: int, most: int | None = None
) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield ``(number, wire_type, field_start, value_start, value_stop)`` of
    each field; more than ``most`` fields make the message malformed."""
    pos = start
    count = 0
    while pos < stop:
        count += 1
        if most is not None and count > most:
            raise _malformed(f"more than {most} fields where this service expects at most that many")
        tag, value_start = _read_varint(buffer, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == _VARINT:
            _, value_stop = _read_varint(buffer, value_start)
        elif wire_type == _I64:
            value_stop = value_start + 8
        elif wire_type == _I32:
            value_stop = value_start + 4
        elif wire_type == _LEN:
            size, value_start = _read_varint(buffer, value_start)
            value_stop = value_start + size
        else:
            raise _malformed(f"field {number} has wire type {wire_type}, which this service does not accept")
        if number == 0 or value_stop > stop:
            raise _malformed(f"field {number} overruns the message")
        yield number, wire_type, pos, value_start, value_stop
        pos = value_stop


def _tensor(buffer: memoryview, spans: list[tuple[int, int]]) -> TensorView:
    """A Tensor from the bodies of one or more occurrences (merged, as protobuf does)."""
    header: list[Chunk] = []
    data = buffer[0:0]
    for start, stop in spans:
        for number, wire_type, field_start, value_start, value_stop in _fields(buffer, start, stop, _TENSOR_FIELDS):
            if number == _DATA_FIELD and wire_type == _LEN:
                data = buffer[value_start:value_stop]  # last one wins
            else:
                header.append(buffer[field_start:value_stop])
    try:
        message = pb.Tensor.FromString(b"".join(header))
    except DecodeError as exc:
        raise _malformed(str(exc)) from exc
    shared = message.shared_memory if message.HasField("shared_memory") else None
    cuda = message.cuda_ipc if message.HasField("cuda_ipc") else None
    return TensorView(message.dtype, tuple(message.shape), data, shared, cuda)


_LAYOUTS: dict[Any, tuple[dict[int, Any], int]] = {}


def _layout(message_type: type[Message]) -> tuple[dict[int, Any], int]:
    """A request type's Tensor fields by number, and its labels field's number
    (0, which no field has, if none): read once per type, not per call."""
    layout = _LAYOUTS.get(message_type)
    if layout is None:
        descriptor = message_type.DESCRIPTOR
        tensors = {field.number: field for field in descriptor.fields if field.message_type is pb.Tensor.DESCRIPTOR}
        labels = descriptor.fields_by_name.get("labels")
        layout = _LAYOUTS[message_type] = (tensors, labels.number if labels is not None else 0)
    return layout


def split(
    message_type: type[_Message], payload: bytes, max_tensors: int
) -> tuple[_Message, dict[str, list[TensorView]]]:
    """Parse a serialized request, its Tensor fields as views on ``payload``.

    Returns the message without its Tensor fields and, for each Tensor field
    name, its tensors in order (one or none for a singular field). The
    counts are checked while walking, before anything is built per tensor:
    a request costs what its limits admit, whatever its bytes say.

    Raises:
        LimitExceeded: a Tensor field repeated more than ``max_tensors``
            times (``--max-layers``), or labels beyond :data:`MAX_LABEL_BYTES`.
        InvalidArgument: the bytes are not a valid message of this type, or
            hold more top-level fields than ``max_tensors`` layers can need.
    """
    buffer = memoryview(payload)
    by_number, labels = _layout(message_type)
    rest: list[Chunk] = []
    spans: dict[str, list[list[tuple[int, int]]]] = {field.name: [] for field in by_number.values()}
    most = 6 * max_tensors + _SCALAR_FIELDS  # layers, teachers, students, two kinds of gradient outputs, labels
    label_bytes = 0
    for number, wire_type, field_start, value_start, value_stop in _fields(buffer, 0, len(buffer), most):
        field = by_number.get(number)
        if number == labels:
            label_bytes += value_stop - value_start
            if label_bytes > MAX_LABEL_BYTES:
                raise LimitExceeded(
                    f"the request's labels take more than {MAX_LABEL_BYTES} bytes; send fewer samples per call",
                    field="labels",
                    limit=MAX_LABEL_BYTES,
                    got=label_bytes,
                )
        if field is None or wire_type != _LEN:
            rest.append(buffer[field_start:value_stop])
        elif field.is_repeated or not spans[field.name]:
            if len(spans[field.name]) == max_tensors:
                raise LimitExceeded(
                    f"more than {max_tensors} tensors in {field.name}; this server takes at most {max_tensors} "
                    "layers (--max-layers)",
                    field=field.name,
                    limit=max_tensors,
                    got=max_tensors + 1,
                )
            spans[field.name].append([(value_start, value_stop)])
        else:
            spans[field.name][0].append((value_start, value_stop))
    try:
        message = message_type.FromString(b"".join(rest))
    except DecodeError as exc:
        raise _malformed(str(exc)) from exc
    views = {name: [_tensor(buffer, parts) for parts in occurrences] for name, occurrences in spans.items()}
    return message, views
