"""The tensor codec: arrays <-> Tensor messages."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

from distill.v1 import distill_pb2 as pb
from distill_client import InvalidArgument
from distill_core import tensors

WIRE = {
    pb.DTYPE_FLOAT32: np.float32,
    pb.DTYPE_FLOAT16: np.float16,
    pb.DTYPE_BFLOAT16: ml_dtypes.bfloat16,
    pb.DTYPE_FLOAT64: np.float64,
}


@pytest.mark.parametrize(("code", "dtype"), WIRE.items(), ids=[pb.Dtype.Name(c) for c in WIRE])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4)], ids=str)
def test_round_trip(code: int, dtype: Any, shape: tuple[int, ...]) -> None:
    array = np.arange(np.prod(shape, dtype=int), dtype=np.float32).reshape(shape).astype(dtype) - 1
    message = tensors.encode(array)
    assert message.dtype == code
    assert tuple(message.shape) == shape
    assert len(message.data) == array.size * np.dtype(dtype).itemsize
    decoded = tensors.decode(pb.Tensor.FromString(message.SerializeToString()))
    assert decoded.dtype == np.dtype(dtype)
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)


def test_wire_bytes_are_little_endian_c_order() -> None:
    array = np.arange(6, dtype=">f4").reshape(2, 3).T  # big-endian and Fortran-ordered
    message = tensors.encode(array)
    assert message.data == np.ascontiguousarray(array, dtype="<f4").tobytes()
    assert tuple(message.shape) == (3, 2)


def test_decode_is_a_view_on_the_message_bytes() -> None:
    message = tensors.encode(np.ones(1000, np.float32))
    decoded = tensors.decode(message)
    assert not decoded.flags.owndata
    assert not decoded.flags.writeable
    base = decoded
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, bytes)


def test_lists_and_integers_become_float32() -> None:
    assert tensors.encode([1.0, 2.5]).dtype == pb.DTYPE_FLOAT32
    assert tensors.encode([[1, 2], [3, 4]]).shape == [2, 2]
    assert tensors.encode(np.arange(3)).dtype == pb.DTYPE_FLOAT32
    assert tensors.encode(np.float64(2.0)).dtype == pb.DTYPE_FLOAT64


@pytest.mark.parametrize("value", [np.ones(3, np.complex64), np.array(["a"]), np.array([object()])], ids=str)
def test_unsupported_dtypes_are_refused_before_sending(value: np.ndarray) -> None:
    with pytest.raises(InvalidArgument, match="cannot be sent"):
        tensors.encode(value)


@pytest.mark.parametrize(
    ("message", "field", "text"),
    [
        (pb.Tensor(dtype=99, shape=[1], data=b"1234"), "x.dtype", "99"),
        (pb.Tensor(shape=[1], data=b"1234"), "x.dtype", "DTYPE_UNSPECIFIED"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3, -1], data=b""), "x.shape", "shape[1] is -1"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[2], data=b"\0" * 15), "x.data", "needs 16"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT16, shape=[2**40, 2**40], data=b""), "x.data", "has 0 bytes"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**62, 0], data=b""), "x.shape", "cannot be used"),
        (
            pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 70, data=b"\0" * 4),
            "x.shape",
            "70 dimensions; expected at most 32",
        ),
    ],
)
def test_decode_errors_name_the_field(message: pb.Tensor, field: str, text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        tensors.decode(message, "x")
    assert info.value.field == field
    assert text in info.value.message


# 1.0 and -2.0 as each wire dtype's little-endian bytes, written out (not from this host's order).
LITTLE_ENDIAN = {
    pb.DTYPE_FLOAT32: bytes.fromhex("0000803f 000000c0"),
    pb.DTYPE_FLOAT16: bytes.fromhex("003c 00c0"),
    pb.DTYPE_BFLOAT16: bytes.fromhex("803f 00c0"),
    pb.DTYPE_FLOAT64: bytes.fromhex("000000000000f03f 00000000000000c0"),
}


@pytest.mark.parametrize("code", LITTLE_ENDIAN, ids=pb.Dtype.Name)
def test_decode_reads_little_endian_bytes(code: int) -> None:
    message = pb.Tensor(dtype=code, shape=[2], data=LITTLE_ENDIAN[code])
    decoded = tensors.decode(message)
    assert decoded.dtype.type is WIRE[code]  # in whichever byte order reads the bytes as they are
    assert decoded.astype(np.float64).tolist() == [1.0, -2.0]


ORDERS = [
    pytest.param(code, order, id=f"{pb.Dtype.Name(code)}-{name}")
    for code in LITTLE_ENDIAN
    # ml_dtypes' bfloat16 exists in native order only.
    for order, name in ([("=", "native")] if code == pb.DTYPE_BFLOAT16 else [("<", "little"), (">", "big")])
]


@pytest.mark.parametrize(("code", "order"), ORDERS)
def test_encode_writes_little_endian_bytes_whatever_the_arrays_order(code: int, order: str) -> None:
    array = np.array([1.0, -2.0]).astype(np.dtype(WIRE[code]).newbyteorder(order))
    message = tensors.encode(array)
    assert message.dtype == code
    assert message.data == LITTLE_ENDIAN[code]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "features are None"),
        ([[1.0, 2.0], [3.0]], "cannot be sent"),  # ragged
        (["a", "b"], "cannot be sent"),
        (np.array([1 << 25], dtype=np.int64), "beyond 2\\^24"),
    ],
    ids=["None", "ragged", "strings", "large-integers"],
)
def test_user_mistakes_are_invalid_argument_with_the_reason(value: Any, text: str) -> None:
    with pytest.raises(InvalidArgument, match=text):
        tensors.to_array(value)


def test_integers_float32_holds_and_booleans_become_float32() -> None:
    assert tensors.to_array(np.array([-(1 << 24), 1 << 24])).tolist() == [-(1 << 24), 1 << 24]
    converted = tensors.to_array(np.array([True, False]))
    assert converted.dtype == np.float32 and converted.tolist() == [1.0, 0.0]


def test_torch_tensors_bfloat16_and_requiring_grad() -> None:
    torch = pytest.importorskip("torch")
    values = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)
    array = tensors.to_array(values)
    assert array.dtype == ml_dtypes.bfloat16 and array.astype(np.float32).tolist() == [1.5, -2.25, 3.0]
    with pytest.raises(InvalidArgument, match=r"requires grad.*detach\(\)"):
        tensors.to_array(torch.ones(3, requires_grad=True))


@pytest.mark.parametrize("value", [np.ones((32, 8), np.float32), None], ids=["one-tensor", "None"])
def test_one_tensor_where_a_list_of_layers_is_expected(value: Any) -> None:
    with pytest.raises(InvalidArgument, match="expected a list with one tensor per layer") as info:
        tensors.per_layer("teachers", value)
    assert info.value.field == "teachers"
    if value is not None:
        assert "of shape [32, 8]" in info.value.message
    assert tensors.per_layer("teachers", (value, value)) == [value, value]
