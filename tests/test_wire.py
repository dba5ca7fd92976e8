"""Zero-copy framing of tensor requests agrees with protobuf's own encoding."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

from distill.v1 import distill_pb2 as pb
from distill_client import DistilLoss, InvalidArgument, LimitExceeded
from distill_core import tensors, wire
from tests.fuzzing import varint

LAYERS = [pb.Layer(weight=0.5, loss=DistilLoss.kl_divergence(2.0).to_proto(), name="conv1")]


def arrays(rng: np.random.Generator) -> list[np.ndarray]:
    shapes = [(), (0,), (3,), (2, 5), (1, 2, 3)]
    dtypes = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64]
    return [rng.normal(size=shapes[i % 5]).astype(dtypes[i % 4]) for i in range(8)]


def same_tensor(view: Any, array: np.ndarray) -> None:
    decoded = tensors.decode(view)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()


def test_built_requests_parse_with_protobuf() -> None:
    ts = arrays(np.random.default_rng(0))
    payload = wire.build(pb.ComputeTotalLossRequest(layers=LAYERS), teachers=ts, students=ts[::-1])
    expected = pb.ComputeTotalLossRequest(
        layers=LAYERS, teachers=[tensors.encode(t) for t in ts], students=[tensors.encode(t) for t in ts[::-1]]
    )
    assert pb.ComputeTotalLossRequest.FromString(payload) == expected

    single = wire.build(pb.ComputeLayerLossRequest(layers=LAYERS, layer_index=3), teacher=ts[1], student=ts[2])
    assert pb.ComputeLayerLossRequest.FromString(single) == pb.ComputeLayerLossRequest(
        layers=LAYERS, layer_index=3, teacher=tensors.encode(ts[1]), student=tensors.encode(ts[2])
    )


@pytest.mark.parametrize(
    "elements",
    [0, 3, wire.SMALL_TENSOR_BYTES // 4, wire.SMALL_TENSOR_BYTES // 4 + 1, 3 * wire.SMALL_TENSOR_BYTES],
    ids=["empty", "tiny", "largest-small", "smallest-framed", "framed"],
)
def test_tensors_small_and_large_are_the_bytes_protobuf_writes(elements: int) -> None:
    # Small tensors go through protobuf (a copy), larger ones are framed around the array's memory.
    t = np.random.default_rng(elements).normal(size=elements).astype(np.float32)
    payload = wire.build(pb.ComputeTotalLossRequest(layers=LAYERS), teachers=[t], students=[t[::-1]])
    expected = pb.ComputeTotalLossRequest(
        layers=LAYERS, teachers=[tensors.encode(t)], students=[tensors.encode(t[::-1])]
    ).SerializeToString()
    assert payload == expected


def test_protobuf_requests_split_into_views() -> None:
    ts = arrays(np.random.default_rng(1))
    message = pb.ComputeTotalLossRequest(
        layers=LAYERS, teachers=[tensors.encode(t) for t in ts], students=[tensors.encode(t) for t in ts[:3]]
    )
    payload = message.SerializeToString()
    rest, views = wire.split(pb.ComputeTotalLossRequest, payload, 8)
    assert rest == pb.ComputeTotalLossRequest(layers=LAYERS)
    assert len(views["teachers"]) == len(ts) and len(views["students"]) == 3
    for view, array in zip(views["teachers"], ts, strict=True):
        same_tensor(view, array)
    for view, array in zip(views["students"], ts[:3], strict=True):
        same_tensor(view, array)


def test_views_share_the_request_bytes() -> None:
    t = np.arange(1000, dtype=np.float32)
    payload = wire.build(pb.ComputeLayerLossRequest(layers=LAYERS), teacher=t, student=t)
    _, views = wire.split(pb.ComputeLayerLossRequest, payload, 8)
    decoded = tensors.decode(views["teacher"][0])
    base: Any = decoded
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and base.obj is payload  # a view, not a copy
    np.testing.assert_array_equal(decoded, t)


def field(number: int, wire_type: int, body: bytes) -> bytes:
    tag = varint(number << 3 | wire_type)
    return tag + (varint(len(body)) + body if wire_type == 2 else body)


def tensor_body(rng: np.random.Generator) -> bytes:
    """A Tensor body in random field order, packed or unpacked shape, with unknown
    fields and a stale data field before the one that counts."""
    array = rng.normal(size=tuple(rng.integers(0, 4, size=rng.integers(0, 3)))).astype(np.float32)
    dims = [varint(d) for d in array.shape]
    if rng.random() < 0.5:
        parts = [field(2, 2, b"".join(dims))]  # packed
    else:
        parts = [field(2, 0, d) for d in dims]  # unpacked: also valid proto3
    parts += [field(1, 0, varint(pb.DTYPE_FLOAT32)), field(15, 5, b"\0" * 4), field(16, 1, b"\0" * 8)]
    parts = [parts[i] for i in rng.permutation(len(parts))]
    stale = int(rng.integers(0, len(parts) + 1))
    parts.insert(stale, field(3, 2, b"\xff" * (4 * array.size + 1)))
    parts.insert(int(rng.integers(stale + 1, len(parts) + 1)), field(3, 2, array.tobytes()))
    return b"".join(parts)


@pytest.mark.parametrize("seed", range(100))
def test_split_agrees_with_protobuf_on_any_valid_encoding(seed: int) -> None:
    rng = np.random.default_rng(seed)
    chunks: list[bytes] = [field(1, 2, layer.SerializeToString()) for layer in LAYERS * int(rng.integers(0, 3))]
    for _ in range(int(rng.integers(0, 4))):
        chunks.append(field(2 + int(rng.integers(0, 2)), 2, tensor_body(rng)))
    chunks.append(field(99, 0, varint(12345)))  # an unknown field from a newer client
    chunks.append(field(98, 2, b"future"))
    payload = b"".join(chunks[i] for i in rng.permutation(len(chunks)))
    reference = pb.ComputeTotalLossRequest.FromString(payload)
    rest, views = wire.split(pb.ComputeTotalLossRequest, payload, 8)
    assert list(rest.layers) == list(reference.layers)
    for name in ("teachers", "students"):
        expected = getattr(reference, name)
        assert len(views[name]) == len(expected)
        for view, message in zip(views[name], expected, strict=True):
            assert (view.dtype, tuple(view.shape), bytes(view.data)) == (
                message.dtype,
                tuple(message.shape),
                message.data,
            )


def test_a_repeated_singular_tensor_merges_as_protobuf_does() -> None:
    first = field(1, 0, varint(pb.DTYPE_FLOAT64)) + field(2, 0, varint(2)) + field(3, 2, b"\1" * 8)
    second = field(1, 0, varint(pb.DTYPE_FLOAT32)) + field(2, 0, varint(3)) + field(3, 2, b"\2" * 24)
    payload = field(3, 2, first) + field(2, 0, varint(7)) + field(3, 2, second)
    reference = pb.ComputeLayerLossRequest.FromString(payload)
    rest, views = wire.split(pb.ComputeLayerLossRequest, payload, 8)
    assert rest.layer_index == 7
    (view,) = views["teacher"]
    assert (view.dtype, tuple(view.shape), bytes(view.data)) == (
        reference.teacher.dtype,
        tuple(reference.teacher.shape),
        reference.teacher.data,
    )
    assert views["student"] == []


@pytest.mark.parametrize(
    "payload",
    [
        b"\x12",  # a tag with no length
        b"\x12\x05ab",  # length beyond the end
        b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # overlong varint
        b"\x13",  # a group (wire type 3)
        b"\x02\x00",  # field number 0
        field(2, 2, b"\x1a\x09abc"),  # a Tensor whose data overruns it
        field(1, 2, b"\xff\xff"),  # a Layer protobuf cannot parse
    ],
)
def test_malformed_requests_are_invalid_arguments(payload: bytes) -> None:
    with pytest.raises(InvalidArgument, match="malformed request"):
        wire.split(pb.ComputeTotalLossRequest, payload, 8)


def test_labels_beyond_their_byte_limit_are_refused_before_protobuf_unpacks_them() -> None:
    ones = [1] * (wire.MAX_LABEL_BYTES // 2)  # 1-byte varints: 8 MiB of labels would unpack into 64 MiB
    at_limit = pb.ComputeTotalLossRequest(
        labels={0: pb.Labels(classes=ones), 1: pb.Labels(classes=ones[:-64])}
    )  # less their framing
    message, _ = wire.split(pb.ComputeTotalLossRequest, at_limit.SerializeToString(), 64)
    assert len(message.labels[0].classes) == len(ones)
    over = pb.ComputeTotalLossRequest(labels={0: pb.Labels(classes=ones), 1: pb.Labels(classes=ones)})
    with pytest.raises(LimitExceeded) as info:
        wire.split(pb.ComputeTotalLossRequest, over.SerializeToString(), 64)
    assert (info.value.field, info.value.limit) == ("labels", wire.MAX_LABEL_BYTES)
    assert info.value.got > wire.MAX_LABEL_BYTES
    step = pb.StreamLossesRequest(labels={3: pb.Labels(classes=ones + ones)})
    with pytest.raises(LimitExceeded):
        wire.split(pb.StreamLossesRequest, step.SerializeToString(), 64)
