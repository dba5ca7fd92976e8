"""Hypothesis strategies for fuzzing the server: requests built from the
generated classes with hostile field values, and byte-level mutations of
their serialized form.

Two kinds of input reach the server's decoders:

- well-formed messages with values the service must refuse or survive
  (unknown enum values, negative / huge / many dimensions, data of the wrong
  length, NaN and infinities, temperatures and weights of every sign and
  size, layer counts past ``--max-layers``, tensors past ``--max-elements``,
  losses with no term, empty stream steps), most of them close enough to
  valid that the computation itself runs;
- their serialized bytes mutated: bit flips, truncation, deleted spans,
  random bytes, inserted fields of every wire type (varints up to 10 bytes,
  lengths that overrun, group markers), duplicated and reordered fields,
  mutations inside nested messages (a Tensor's shape, a Layer's loss).

Everything is drawn through Hypothesis, so a failure replays from its seed
(and, in a long run, shrinks to a small input). ``log_errors`` reads the
server's log for the tests that use these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import strategies as st

from distill.v1 import distill_pb2 as pb
from distill_core import rpc

__all__ = [
    "DTYPES",
    "RPC_METHOD_NAMES",
    "handle_payloads",
    "health_payloads",
    "layer_loss_payloads",
    "log_errors",
    "method_names",
    "mutated",
    "reflection_streams",
    "registration_payloads",
    "server_info_payloads",
    "stream_scripts",
    "total_loss_payloads",
]

DTYPES: dict[int, np.dtype[Any]] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
}
"""Wire dtype -> NumPy dtype (the proto's table, independent of the client's codec)."""

RPC_METHOD_NAMES = tuple(rpc.RPCS)

_INT64 = (-(2**63), 2**63 - 1)
_INT32 = (-(2**31), 2**31 - 1)

# Values at the edges of each dtype and of float64: overflow when squared,
# summed, exponentiated or divided by a small temperature.
_EXTREME_FLOATS = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    5e-324,
    2.2250738585072014e-308,
    1e-300,
    1e-45,
    6e-8,
    65504.0,
    -65504.0,
    3.4028234663852886e38,
    -3.4028234663852886e38,
    1e154,
    1e300,
    -1e300,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    math.inf,
    -math.inf,
    math.nan,
)

# Temperatures and weights: the valid range, its edges and past them.
_EXTREME_SCALARS = (
    *_EXTREME_FLOATS,
    0.5,
    2.0,
    4.0,
    1e-10,
    1e10,
    1e-308,
)

_TAG_NUMBERS = (0, 1, 2, 3, 4, 5, 6, 7, 15, 16, 2047, 2048, 2**28, 2**29 - 1)


def _floats() -> st.SearchStrategy[float]:
    """Any float64: the edges, NaN and infinities included."""
    return st.one_of(st.sampled_from(_EXTREME_SCALARS), st.floats(allow_nan=True, allow_infinity=True))


def _finite_floats() -> st.SearchStrategy[float]:
    return st.one_of(
        st.sampled_from([x for x in _EXTREME_SCALARS if math.isfinite(x)]),
        st.floats(allow_nan=False, allow_infinity=False),
    )


def _temperatures() -> st.SearchStrategy[float]:
    """Valid temperatures (finite, > 0), the tiny and the huge included."""
    return st.one_of(
        st.sampled_from((0.5, 1.0, 2.0, 4.0, 5e-324, 1e-300, 1e-10, 1e-3, 1e10, 1e300, 1.7976931348623157e308)),
        st.floats(min_value=5e-324, max_value=1.7976931348623157e308),
    )


def _int64s() -> st.SearchStrategy[int]:
    special = (0, 1, -1, 2, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, *_INT64)
    return st.one_of(st.sampled_from(special), st.integers(*_INT64))


def _enum(known: int) -> st.SearchStrategy[int]:
    """A proto3 (open) enum value: a known one, or any int32."""
    return st.one_of(st.integers(0, known), st.sampled_from((known + 1, 99, -1, *_INT32)), st.integers(*_INT32))


def _hostile(draw: st.DrawFn, percent: int) -> bool:
    """True about ``percent`` % of the time: take the rarer, nastier branch."""
    return draw(st.integers(0, 99)) < percent


# ------------------------------------------------------------------ tensors


def _encode(values: np.ndarray, dtype: np.dtype[Any]) -> bytes:
    with np.errstate(all="ignore"):  # float64 -> float16 overflows to inf: part of the test
        return values.astype(dtype).tobytes()


@st.composite
def _values(draw: st.DrawFn, count: int, finite: bool) -> np.ndarray:
    """``count`` float64 values: a few drawn one by one (shrinkable), or many
    from a seeded generator at a drawn scale (cheap, up to tens of thousands)."""
    if count <= 16 and draw(st.booleans()):
        elements = _finite_floats() if finite else _floats()
        return np.array(draw(st.lists(elements, min_size=count, max_size=count)), dtype=np.float64)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from((1.0, 1e-300, 1e-30, 1e-3, 30.0, 1e4, 1e20, 1e150, 1e300)))
    values = rng.standard_normal(count) * scale
    if count and not finite and draw(st.integers(0, 4)) == 0:  # a few extreme values in a large array
        for _ in range(draw(st.integers(1, 3))):
            values[draw(st.integers(0, count - 1))] = draw(st.sampled_from(_EXTREME_FLOATS))
    return values


@st.composite
def _small_shape(draw: st.DrawFn, hostile: bool = True) -> list[int]:
    """Up to four dimensions of up to 9; hostile: a zero among them (no elements)."""
    return draw(st.lists(st.integers(0 if hostile else 1, 9), min_size=0, max_size=4))


@st.composite
def _large_shape(draw: st.DrawFn) -> list[int]:
    """One to three dimensions of up to 60 000 elements: two of them may
    pass ``--max-elements`` (100 000 in the fuzz server)."""
    rows = draw(st.integers(1, 300))
    cols = draw(st.integers(1, 200))
    return draw(st.sampled_from(([rows * cols], [rows, cols], [1, rows, cols])))


@st.composite
def _hostile_shape(draw: st.DrawFn) -> list[int]:
    """Negative, huge, overflowing, or more dimensions than NumPy allows."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.lists(_int64s(), min_size=1, max_size=6))
    if kind == 1:  # many dimensions of 1 (or a 0 among them): NumPy stops at 64
        ones = [1] * draw(st.integers(30, 200))
        if draw(st.booleans()):
            ones[draw(st.integers(0, len(ones) - 1))] = 0
        return ones
    if kind == 2:  # a product past int64 with a zero in it
        return [2**62, 2**62, 0]
    if kind == 3:
        return [draw(st.integers(-(2**63), -1)), *draw(_small_shape())]
    return [2**31, 2**31, 2**31, 2**31]


def _element_count(shape: list[int]) -> int | None:
    """product(shape), when every dimension is >= 0 and it fits in int64."""
    if any(d < 0 for d in shape):
        return None
    count = math.prod(shape)
    return count if count < 2**63 else None


@st.composite
def tensors(draw: st.DrawFn, hostile: bool, shape: list[int] | None = None, dtype: int | None = None) -> pb.Tensor:
    """A Tensor. Unless ``hostile``: a known dtype, data of exactly
    product(shape) elements, finite in float64 (float16 and bfloat16 may
    still overflow them to infinity). ``hostile``: any of the faults too."""
    if dtype is None:
        dtype = draw(_enum(4)) if hostile and _hostile(draw, 15) else draw(st.sampled_from(sorted(DTYPES)))
    if shape is None:
        roll = draw(st.integers(0, 99))
        if hostile and roll < 15:
            shape = draw(_hostile_shape())
        else:
            shape = draw(_large_shape()) if roll >= 80 else draw(_small_shape(hostile))
    numpy_dtype = DTYPES.get(dtype)
    count = _element_count(shape)
    if numpy_dtype is None or count is None or count > 70_000:
        return pb.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(max_size=64)))
    data = _encode(draw(_values(count, finite=not hostile)), numpy_dtype)
    if hostile and _hostile(draw, 15):  # too few or too many bytes
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, max(0, len(data) - 1)))] if data else b"\x00"
        else:
            data += draw(st.binary(min_size=1, max_size=9))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def tensor_pairs(draw: st.DrawFn, hostile: bool) -> tuple[pb.Tensor, pb.Tensor]:
    """A teacher and a student: the same shape (so the loss is computed),
    in the same or another dtype; hostile: sometimes the same elements in
    another shape (a SHAPE_MISMATCH for PER_ROW), or anything."""
    teacher = draw(tensors(hostile))
    shape = list(teacher.shape)
    roll = draw(st.integers(0, 9))
    if not hostile or roll < 6:
        same_dtype = draw(st.integers(0, 3)) > 0
        return teacher, draw(tensors(hostile, shape=shape, dtype=teacher.dtype if same_dtype else None))
    count = _element_count(shape)
    if roll < 8 and len(shape) >= 2 and count is not None:
        return teacher, draw(tensors(hostile, shape=[count], dtype=teacher.dtype))
    return teacher, draw(tensors(hostile))


# ------------------------------------------------------------------ layers


@st.composite
def losses(draw: st.DrawFn, hostile: bool) -> pb.Loss:
    """A Loss; unless ``hostile``, one the service accepts (any kind, valid
    parameters from the tiny to the huge)."""
    loss = pb.Loss()
    kinds = ("mse", "cosine", "kl", "combined")
    # The batch losses need shapes of their own (a batch axis; attention transfer's spatial axes): hostile only.
    batch = ("similarity_preserving", "linear_cka", "pkt", "attention_transfer", "kd", "dist", "response")
    kind = draw(st.sampled_from((*kinds, *batch, "none") if hostile else kinds))
    temperature = _floats() if hostile and _hostile(draw, 30) else _temperatures()
    if hostile and _hostile(draw, 30):
        factor = _floats()
    else:
        factor = st.sampled_from((0.5, 1.0, 0.0, 0.3, 2.0)) if draw(st.booleans()) else _finite_floats()
    if kind == "mse":
        loss.mse.SetInParent()
    elif kind == "cosine":
        loss.cosine.SetInParent()
    elif kind == "kl":
        loss.kl_divergence.temperature = draw(temperature)
    elif kind == "combined":
        params = loss.combined_kl_mse
        params.kl_weight, params.mse_weight, params.temperature = draw(st.tuples(factor, factor, temperature))
        if _hostile(draw, 20):  # no term at all: a loss (and gradient) of zero
            params.kl_weight = params.mse_weight = 0.0
    elif kind == "similarity_preserving":
        loss.similarity_preserving.normalization = draw(_enum(2))
    elif kind == "linear_cka":
        loss.linear_cka.SetInParent()
    elif kind == "pkt":
        loss.pkt.eps = draw(st.sampled_from((0.0, 1e-7, 1e-3)) if draw(st.booleans()) else _floats())
    elif kind == "attention_transfer":
        loss.attention_transfer.p = draw(st.sampled_from((0.0, 1.0, 2.0, 3.5)) if draw(st.booleans()) else _floats())
        loss.attention_transfer.mode = draw(_enum(2))
    elif kind == "kd":
        loss.kd.temperature = draw(temperature)
    elif kind == "dist":
        loss.dist.beta, loss.dist.gamma, loss.dist.temperature = draw(st.tuples(factor, factor, temperature))
    elif kind == "response":  # a soft loss of any kind, labels or none: the server must refuse or compute
        loss.response.hard_label_weight, loss.response.soft_label_weight = draw(st.tuples(factor, factor))
        if draw(st.booleans()):
            loss.response.soft_loss.CopyFrom(draw(losses(hostile=False)))
    loss.reduction = draw(_enum(2)) if hostile and _hostile(draw, 20) else draw(st.sampled_from((0, 1, 2)))
    return loss


@st.composite
def layer_messages(draw: st.DrawFn, hostile: bool) -> pb.Layer:
    if draw(st.booleans()):
        weight = draw(st.sampled_from((1.0, 0.5, 2.0)))
    else:
        weight = draw(_floats() if hostile and _hostile(draw, 30) else _finite_floats())
    if hostile and _hostile(draw, 5):  # around the server's limit of 256 characters
        name = draw(st.sampled_from("aé😀")) * draw(st.integers(250, 300))
    else:
        name = draw(st.text(max_size=12))
    return pb.Layer(weight=weight, loss=draw(losses(hostile)), name=name)


@st.composite
def layer_lists(draw: st.DrawFn, hostile: bool, min_size: int = 0) -> list[pb.Layer]:
    """One to four layers; hostile: sometimes past ``--max-layers`` (64 in
    the fuzz server), up to 40 000 copies of one layer (well under 4 MiB)."""
    if hostile and _hostile(draw, 5):
        return [draw(layer_messages(hostile))] * draw(st.integers(65, 40_000))
    return draw(st.lists(layer_messages(hostile), min_size=max(1, min_size), max_size=4))


# ------------------------------------------------------------------ requests


@st.composite
def label_maps(draw: st.DrawFn, layers: int, hostile: bool) -> dict[int, pb.Labels]:
    """Class labels by layer index: none mostly; hostile, any index and any
    int64 labels (the server must refuse what no response layer takes)."""
    if not hostile or not _hostile(draw, 30):
        return {}
    indices = st.integers(0, max(layers, 1) + 2) if draw(st.booleans()) else st.integers(0, 2**32 - 1)
    values = st.lists(st.one_of(st.integers(-2, 12), _int64s()), max_size=20)
    return {index: pb.Labels(classes=draw(values)) for index in draw(st.sets(indices, max_size=3))}


def _hostility() -> st.SearchStrategy[bool]:
    """Whether a request may hold invalid values: one in three do; the
    others are valid but for the numbers (overflow, underflow)."""
    return st.integers(0, 2).map(lambda roll: roll == 0)


@st.composite
def layer_loss_requests(draw: st.DrawFn) -> pb.ComputeLayerLossRequest:
    hostile = draw(_hostility())
    layers = draw(layer_lists(hostile, min_size=1))
    if hostile and _hostile(draw, 20):
        index = draw(_int64s())
    else:
        index = draw(st.integers(0, len(layers) - 1))
    request = pb.ComputeLayerLossRequest(layers=layers, layer_index=index, return_gradients=draw(st.booleans()))
    teacher, student = draw(tensor_pairs(hostile))
    labels = draw(label_maps(1, hostile))
    if labels:
        request.labels.CopyFrom(next(iter(labels.values())))
    missing = draw(st.integers(0, 29)) if hostile else -1
    if missing != 0:
        request.teacher.CopyFrom(teacher)
    if missing != 1:
        request.student.CopyFrom(student)
    return request


@st.composite
def _tensor_lists(draw: st.DrawFn, count: int, hostile: bool) -> tuple[list[pb.Tensor], list[pb.Tensor]]:
    """``count`` teacher/student pairs; hostile: sometimes one too many or too few."""
    pairs = [draw(tensor_pairs(hostile)) for _ in range(min(count, 4))]
    teachers, students = [t for t, _ in pairs], [s for _, s in pairs]
    if hostile:
        roll = draw(st.integers(0, 9))
        if roll == 0 and teachers:
            teachers.pop()
        elif roll == 1 and students:
            students.pop()
        elif roll == 2:
            teachers.append(draw(tensors(hostile)))
    return teachers, students


@st.composite
def total_loss_requests(draw: st.DrawFn) -> pb.ComputeTotalLossRequest:
    hostile = draw(_hostility())
    layers = draw(layer_lists(hostile))
    if hostile and _hostile(draw, 5):
        layers = []  # zero layers and zero tensors: a total of 0
    teachers, students = draw(_tensor_lists(len(layers), hostile))
    return pb.ComputeTotalLossRequest(
        layers=layers,
        teachers=teachers,
        students=students,
        return_gradients=draw(st.booleans()),
        labels=draw(label_maps(len(layers), hostile)),
    )


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


# ------------------------------------------------------------------ mutations

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int (any size)."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buffer: bytes) -> list[tuple[int, int, int, int, int]]:
    """The top-level fields of a message that parse (``number, wire_type,
    start, value_start, stop``); stops quietly at the first malformed one."""
    found: list[tuple[int, int, int, int, int]] = []
    pos = 0

    def read(at: int) -> tuple[int, int] | None:
        value = shift = 0
        while at < len(buffer) and shift < 70:
            byte = buffer[at]
            at += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, at
            shift += 7
        return None

    while pos < len(buffer):
        tag = read(pos)
        if tag is None:
            break
        number, wire_type = tag[0] >> 3, tag[0] & 7
        value_start = tag[1]
        if wire_type == _VARINT:
            value = read(value_start)
            if value is None:
                break
            stop = value[1]
        elif wire_type == _I64:
            stop = value_start + 8
        elif wire_type == _I32:
            stop = value_start + 4
        elif wire_type == _LEN:
            size = read(value_start)
            if size is None:
                break
            value_start, stop = size[1], size[1] + size[0]
        else:
            break
        if stop > len(buffer):
            break
        found.append((number, wire_type, pos, value_start, stop))
        pos = stop
    return found


@st.composite
def random_field(draw: st.DrawFn) -> bytes:
    """One field of any wire type, sometimes lying about its length."""
    number = draw(st.one_of(st.sampled_from(_TAG_NUMBERS), st.integers(0, 2**29 - 1)))
    wire_type = draw(st.integers(0, 7))
    tag = varint(number << 3 | wire_type)
    if wire_type == _VARINT:
        value = draw(st.one_of(st.sampled_from((0, 1, 2**63, 2**64 - 1, 2**70)), st.integers(0, 2**64 - 1)))
        body = varint(value)
        if draw(st.integers(0, 9)) == 0:  # an overlong (>10 byte) or unterminated varint
            body = b"\xff" * draw(st.integers(1, 12))
        return tag + body
    if wire_type == _I64:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if wire_type == _I32:
        return tag + draw(st.binary(min_size=4, max_size=4))
    if wire_type == _LEN:
        body = draw(st.binary(max_size=24))
        length = len(body) + draw(st.sampled_from((0, 0, 0, 1, 100, 2**31, 2**63)))
        return tag + varint(length) + body
    return tag + draw(st.binary(max_size=4))  # groups and the invalid wire types 6, 7


def _boundaries(buffer: bytes) -> list[int]:
    return [0, *(stop for *_, stop in _fields(buffer))]


@st.composite
def _mutate_once(draw: st.DrawFn, buffer: bytes, depth: int) -> bytes:
    op = draw(st.integers(0, 11))
    size = len(buffer)
    if op == 0 and size:  # flip one bit
        at = draw(st.integers(0, size - 1))
        return buffer[:at] + bytes([buffer[at] ^ 1 << draw(st.integers(0, 7))]) + buffer[at + 1 :]
    if op == 1 and size:  # set one byte
        at = draw(st.integers(0, size - 1))
        value = draw(st.one_of(st.sampled_from((0x00, 0x7F, 0x80, 0xFF)), st.integers(0, 255)))
        return buffer[:at] + bytes([value]) + buffer[at + 1 :]
    if op == 2:  # truncate
        return buffer[: draw(st.integers(0, size))]
    if op == 3 and size:  # delete a span
        start = draw(st.integers(0, size - 1))
        return buffer[:start] + buffer[start + draw(st.integers(1, 16)) :]
    if op == 4:  # random bytes anywhere
        at = draw(st.integers(0, size))
        return buffer[:at] + draw(st.binary(min_size=1, max_size=16)) + buffer[at:]
    if op in (5, 6):  # a random field, at a field boundary (parses further) or anywhere
        at = draw(st.sampled_from(_boundaries(buffer))) if op == 5 else draw(st.integers(0, size))
        return buffer[:at] + draw(random_field()) + buffer[at:]
    fields = _fields(buffer)
    if op == 7 and fields:  # duplicate a field (singular message fields merge, scalars: last wins)
        _, _, start, _, stop = draw(st.sampled_from(fields))
        at = draw(st.sampled_from(_boundaries(buffer)))
        return buffer[:at] + buffer[start:stop] + buffer[at:]
    if op == 8 and len(fields) >= 2:  # reorder the fields
        spans = [buffer[start:stop] for _, _, start, _, stop in fields]
        order = draw(st.permutations(range(len(spans))))
        return b"".join(spans[i] for i in order) + buffer[fields[-1][4] :]
    if op == 9 and depth < 3:  # mutate inside a length-delimited field (a Tensor, a Layer, a Loss)
        nested = [f for f in fields if f[1] == _LEN]
        if nested:
            number, _, start, value_start, stop = draw(st.sampled_from(nested))
            inner = draw(_mutate_once(buffer[value_start:stop], depth + 1))
            return buffer[:start] + varint(number << 3 | _LEN) + varint(len(inner)) + inner + buffer[stop:]
    if op == 10 and fields:  # change one length-delimited field's declared length
        candidates = [f for f in fields if f[1] == _LEN]
        if candidates:
            number, _, start, value_start, stop = draw(st.sampled_from(candidates))
            length = max(0, stop - value_start + draw(st.sampled_from((-3, -1, 1, 2, 7, 1 << 20, 1 << 40))))
            return buffer[:start] + varint(number << 3 | _LEN) + varint(length) + buffer[value_start:]
    if op == 11:  # wrap the whole message as a field of itself
        return varint(draw(st.sampled_from(_TAG_NUMBERS)) << 3 | _LEN) + varint(size) + buffer
    return draw(st.binary(max_size=48))  # the op did not apply: garbage


@st.composite
def mutated(draw: st.DrawFn, buffer: bytes) -> bytes:
    """``buffer`` after one to four byte-level mutations."""
    for _ in range(draw(st.integers(1, 4))):
        buffer = draw(_mutate_once(buffer, 0))
    return buffer


@st.composite
def variants(draw: st.DrawFn, messages: st.SearchStrategy[Message]) -> list[bytes]:
    """A drawn message serialized, then two to five mutations of it (each
    mutated independently): several requests per example, so thousands of
    requests fit in a few hundred examples."""
    base = _serialize(draw(messages))
    return [base, *draw(st.lists(mutated(base), min_size=2, max_size=5))]


def layer_loss_payloads() -> st.SearchStrategy[list[bytes]]:
    return variants(layer_loss_requests())


def total_loss_payloads() -> st.SearchStrategy[list[bytes]]:
    return variants(total_loss_requests())


def server_info_payloads() -> st.SearchStrategy[list[bytes]]:
    """GetServerInfoRequest has no fields: anything well-formed is unknown fields."""
    return st.one_of(
        st.lists(st.binary(max_size=32), min_size=1, max_size=4),
        st.lists(random_field(), min_size=1, max_size=4).map(lambda fields: [b"".join(fields)]),
        variants(st.just(pb.GetServerInfoRequest())),
    )


def registration_payloads(keys: Sequence[str]) -> st.SearchStrategy[list[bytes]]:
    """RegisterSharedMemory requests: the given keys (files that exist) or any
    text, any size, then mutations."""
    key = st.one_of(st.sampled_from(keys), st.text(max_size=40), st.just("distill-"))
    sizes = st.one_of(st.integers(*_INT64), st.integers(0, 8192))
    requests = st.builds(lambda k, n: pb.SystemSharedMemory(key=k, byte_size=n), key, sizes).map(
        lambda system: pb.RegisterSharedMemoryRequest(system=system)
    )
    return variants(st.one_of(requests, st.just(pb.RegisterSharedMemoryRequest())))


def handle_payloads() -> st.SearchStrategy[list[bytes]]:
    """UnregisterSharedMemory and GetSharedMemoryStatus requests (the same
    field numbers): handles no server gave, then mutations."""
    handle = st.one_of(st.text(max_size=40), st.text("0123456789abcdef", min_size=32, max_size=32))
    return variants(st.lists(handle, max_size=3).map(lambda h: pb.GetSharedMemoryStatusRequest(regions=h)))


HEALTH_SERVICES = ("", "distill.v1.DistillService", "grpc.health.v1.Health", "nope")


def health_payloads() -> st.SearchStrategy[list[bytes]]:
    names = st.one_of(st.sampled_from(HEALTH_SERVICES), st.text(max_size=40))
    return variants(names.map(lambda name: health_pb2.HealthCheckRequest(service=name)))


# ------------------------------------------------------------------ streams


@st.composite
def stream_configs(draw: st.DrawFn, hostile: bool) -> pb.StreamLossesRequest:
    config = pb.StreamConfig(layers=draw(layer_lists(hostile)), return_gradients=draw(st.booleans()))
    return pb.StreamLossesRequest(config=config)


@st.composite
def stream_steps(draw: st.DrawFn, layers: int, hostile: bool) -> pb.StreamLossesRequest:
    teachers, students = draw(_tensor_lists(layers, hostile))
    labels = draw(label_maps(layers, hostile))
    request = pb.StreamLossesRequest(step_id=draw(_int64s()), teachers=teachers, students=students, labels=labels)
    if hostile and _hostile(draw, 10):  # a configuration again: that step fails
        request.config.CopyFrom(draw(stream_configs(False)).config)
    return request


@st.composite
def stream_scripts(draw: st.DrawFn) -> tuple[list[bytes], list[bool], int | None]:
    """A StreamLosses conversation: ``(messages, mutated, cancel_after)``.

    The first message is mostly a configuration (sometimes a step, or
    nothing at all); then up to six steps, some hostile, some mutated, some
    empty (zero bytes: a valid message with every field unset).
    ``mutated[i]`` says whether message ``i`` was changed after
    serialization; ``cancel_after`` is a number of responses after which the
    client cancels, or None.
    """
    roll = draw(st.integers(0, 19))
    if roll == 0:
        return [], [], None
    config = draw(stream_configs(hostile=_hostile(draw, 15)))
    layers = len(config.config.layers)
    first = _serialize(config) if roll > 1 else _serialize(draw(stream_steps(layers, hostile=False)))
    messages, changed = [first], [False]
    if _hostile(draw, 10):
        messages[0], changed[0] = draw(mutated(first)), True
    for _ in range(draw(st.integers(0, 6))):
        if _hostile(draw, 5):  # an empty message: a step with nothing set (not the end of the stream)
            messages.append(b"")
            changed.append(False)
            continue
        step = _serialize(draw(stream_steps(layers, hostile=_hostile(draw, 20))))
        change = _hostile(draw, 20)
        messages.append(draw(mutated(step)) if change else step)
        changed.append(change)
    cancel_after = draw(st.integers(0, len(messages))) if _hostile(draw, 10) else None
    return messages, changed, cancel_after


_SYMBOLS = (
    "distill.v1.DistillService",
    "distill.v1.DistillService.ComputeLayerLoss",
    "distill.v1.Tensor",
    "distill.v1.Loss.KlDivergence",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "google.rpc.Status",
    "nope.Nope",
    "",
)
_FILES = ("distill/v1/distill.proto", "google/rpc/status.proto", "grpc/health/v1/health.proto", "nope.proto", "")


@st.composite
def reflection_requests(draw: st.DrawFn) -> reflection_pb2.ServerReflectionRequest:
    names = st.one_of(st.sampled_from(_SYMBOLS), st.text(max_size=30))
    request = reflection_pb2.ServerReflectionRequest(host=draw(st.text(max_size=8)))
    kind = draw(st.integers(0, 5))
    if kind == 0:
        request.file_by_filename = draw(st.one_of(st.sampled_from(_FILES), st.text(max_size=30)))
    elif kind == 1:
        request.file_containing_symbol = draw(names)
    elif kind == 2:
        request.file_containing_extension.containing_type = draw(names)
        request.file_containing_extension.extension_number = draw(st.integers(*_INT32))
    elif kind == 3:
        request.all_extension_numbers_of_type = draw(names)
    elif kind == 4:
        request.list_services = draw(st.text(max_size=8))
    return request  # kind 5: no request kind set


@st.composite
def reflection_streams(draw: st.DrawFn) -> list[bytes]:
    """One to four reflection requests on one stream, some of them mutated."""
    messages = []
    for _ in range(draw(st.integers(1, 4))):
        message = _serialize(draw(reflection_requests()))
        messages.append(draw(mutated(message)) if draw(st.integers(0, 2)) == 0 else message)
    return messages


def method_names(known_paths: frozenset[str]) -> st.SearchStrategy[str]:
    """Method paths that no service registers (none of ``known_paths``)."""
    word = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.", min_size=1, max_size=24)
    services = st.sampled_from(
        (
            "distill.v1.DistillService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "grpc.reflection.v1.ServerReflection",
            "distill.v1.distillservice",
        )
    )
    paths = st.one_of(
        st.tuples(services, word).map(lambda parts: f"/{parts[0]}/{parts[1]}"),
        st.tuples(word, word).map(lambda parts: f"/{parts[0]}/{parts[1]}"),
        st.sampled_from(RPC_METHOD_NAMES).map(lambda name: f"/distill.v1.DistillService/{name.lower()}"),
    )
    return paths.filter(lambda path: path not in known_paths)


# ------------------------------------------------------------------ the server's log

_LEVEL = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) ")
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def log_errors(lines: Sequence[str], limit: int = 3) -> str:
    """The server log's ERROR/CRITICAL records and tracebacks, each with the
    lines that continue it (the first ``limit`` of them, and a count); empty
    when there are none. Matches the text format's level field, so a WARNING
    that quotes a request's text cannot pass for an error."""
    starts = [i for i, line in enumerate(lines) if _LEVEL.match(line) or line.startswith("Traceback")]
    blocks: list[str] = []
    for i in starts:
        if blocks and i > 0 and lines[i].startswith("Traceback") and _LEVEL.match(lines[i - 1]):
            continue  # the traceback of the record just shown
        end = i + 1
        while end < len(lines) and not _RECORD.match(lines[end]) and end - i < 40:
            end += 1
        blocks.append("".join(lines[i:end]))
    if not blocks:
        return ""
    return f"{len(blocks)} ERROR records or tracebacks in the server log, the first:\n" + "".join(blocks[:limit])
