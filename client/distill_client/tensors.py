"""NumPy arrays <-> ``distill.v1.Tensor`` messages: the one tensor codec.

The wire format is raw little-endian bytes in C order beside a dtype and a
shape. Decoding is a view on the message's bytes (no copy); bfloat16 comes
from ``ml_dtypes``, the maintained NumPy extension that JAX and TensorFlow use.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from distill.v1 import distill_pb2 as pb
from distill_client.errors import InvalidArgument

__all__ = ["DTYPES", "decode", "encode", "to_array"]

DTYPES: dict[pb.Dtype, np.dtype[Any]] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
}
"""Wire dtype -> NumPy dtype, little-endian."""

_WIRE_DTYPES = {dtype.newbyteorder("="): code for code, dtype in DTYPES.items()}


def to_array(value: Any) -> npt.NDArray[Any]:
    """Turn features into an array of a wire dtype.

    Accepts NumPy arrays of any shape, objects exposing ``__array__`` or
    DLPack (CPU torch tensors) and nested lists of numbers. Arrays of a wire
    dtype keep it; lists, integers and booleans become float32, the seed's
    type.

    Raises:
        InvalidArgument: for other dtypes (complex, object, ...).
    """
    array: npt.NDArray[Any]
    if isinstance(value, (list, tuple)):
        array = np.asarray(value, dtype=np.float32)
    elif isinstance(value, np.ndarray):
        array = value
    else:
        array = np.asarray(value) if hasattr(value, "__array__") else np.from_dlpack(value)
    if array.dtype.newbyteorder("=") in _WIRE_DTYPES:
        return array
    if array.dtype.kind in "biu":
        return array.astype(np.float32)
    raise InvalidArgument(f"features of dtype {array.dtype} cannot be sent: use float32, float16, bfloat16 or float64")


def encode(value: Any) -> pb.Tensor:
    """Encode features (anything :func:`to_array` takes) as a Tensor message."""
    array = to_array(value)
    wire = DTYPES[_WIRE_DTYPES[array.dtype.newbyteorder("=")]]
    data = array.astype(wire, order="C", copy=False)
    return pb.Tensor(
        dtype=_WIRE_DTYPES[wire.newbyteorder("=")],
        shape=data.shape,
        data=data.tobytes(),
    )


def decode(tensor: pb.Tensor, field: str = "tensor") -> npt.NDArray[Any]:
    """Decode a Tensor message into a read-only array viewing its bytes.

    ``tensor.data`` is read once (each read of a bytes field copies it).

    Raises:
        InvalidArgument: unknown dtype, negative dimension, or a data length
            other than product(shape) x itemsize; the error names ``field``.
    """
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        name = pb.Dtype.Name(tensor.dtype) if tensor.dtype in pb.Dtype.values() else str(tensor.dtype)
        known = ", ".join(pb.Dtype.Name(code) for code in DTYPES)
        raise InvalidArgument(
            f"{field}.dtype is {name}; expected one of {known}",
            field=f"{field}.dtype",
        )
    shape = tuple(tensor.shape)
    for axis, size in enumerate(shape):
        if size < 0:
            raise InvalidArgument(
                f"{field}.shape[{axis}] is {size}; dimensions must be >= 0",
                field=f"{field}.shape",
            )
    data = tensor.data
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{field}.data has {len(data)} bytes; shape {list(shape)} of "
            f"{pb.Dtype.Name(tensor.dtype)} needs {expected}",
            field=f"{field}.data",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)
