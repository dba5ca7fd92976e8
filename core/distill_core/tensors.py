"""NumPy arrays <-> ``distill.v1.Tensor`` messages: the one tensor codec.

The wire format is raw little-endian bytes in C order beside a dtype and a
shape. Decoding is a view on the message's bytes (no copy); bfloat16 comes
from ``ml_dtypes``, the maintained NumPy extension that JAX and TensorFlow use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

import ml_dtypes
import numpy as np
import numpy.typing as npt

from distill.v1 import distill_pb2 as pb
from distill_core.errors import InvalidArgument

__all__ = [
    "DTYPES",
    "MAX_RANK",
    "TensorLike",
    "decode",
    "dtype_and_shape",
    "encode",
    "labels_by_layer",
    "per_layer",
    "to_array",
    "to_labels",
    "to_wire",
]

MAX_RANK = 32
"""Most dimensions a tensor may have (NumPy's own limit is 64)."""

DTYPES: dict[pb.Dtype, np.dtype[Any]] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
}
"""Wire dtype -> NumPy dtype, little-endian."""

_WIRE_DTYPES = {dtype.newbyteorder("="): code for code, dtype in DTYPES.items()}


_EXACT_IN_FLOAT32 = 1 << 24
"""Integers up to this magnitude are exact in float32."""


def to_array(value: Any) -> npt.NDArray[Any]:
    """Turn features into an array of a wire dtype.

    Accepts NumPy arrays of any shape, objects exposing ``__array__`` or
    DLPack (CPU torch tensors, bfloat16 ones too) and nested lists of
    numbers. Arrays of a wire dtype keep it; lists, integers up to 2^24 in
    magnitude (exact in float32) and booleans (0 and 1) become float32, the
    seed's type.

    Raises:
        InvalidArgument: None, a ragged or non-numeric list, a torch tensor
            that requires grad, integers beyond 2^24, or another dtype
            (complex, object, ...).
    """
    if value is None:
        raise InvalidArgument("features are None; expected an array, a tensor or a list of numbers")
    array: npt.NDArray[Any]
    try:
        if isinstance(value, (list, tuple)):
            array = np.asarray(value, dtype=np.float32)
        elif isinstance(value, np.ndarray):
            array = value
        elif type(value).__module__.startswith("torch"):
            array = _from_torch(value)
        else:
            array = np.asarray(value) if hasattr(value, "__array__") else np.from_dlpack(value)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"features of type {type(value).__name__} cannot be sent: {exc}") from None
    if array.dtype.newbyteorder("=") in _WIRE_DTYPES:
        return array
    if array.dtype.kind in "iu" and array.size and int(np.abs(array).max()) > _EXACT_IN_FLOAT32:
        raise InvalidArgument(
            f"integer features reach {int(np.abs(array).max())}, beyond 2^24, where float32 is no longer exact: "
            "convert them to float64 (or float32) yourself"
        )
    if array.dtype.kind in "biu":
        return array.astype(np.float32)
    raise InvalidArgument(f"features of dtype {array.dtype} cannot be sent: use float32, float16, bfloat16 or float64")


def _from_torch(tensor: Any) -> npt.NDArray[Any]:
    """A CPU torch tensor as NumPy (bfloat16 by its bits, through ml_dtypes)."""
    if tensor.requires_grad:
        raise InvalidArgument(
            "a torch tensor that requires grad cannot be sent as features: pass tensor.detach(), or train through "
            "the loss with distill_client.torch.RemoteDistillLoss"
        )
    if str(tensor.dtype) == "torch.bfloat16":
        import torch

        bits: npt.NDArray[Any] = tensor.contiguous().view(torch.int16).numpy()
        return bits.view(ml_dtypes.bfloat16)
    return np.asarray(tensor)


def to_labels(value: Any, field: str = "labels") -> pb.Labels:
    """Class labels as the requests carry them: integers, one per sample.

    Accepts an integer, a list of them, NumPy integer arrays and torch
    integer tensors (on any device).

    Raises:
        InvalidArgument: None, anything not made of integers (floats and
            booleans included), or more than one axis.
    """
    if value is None:
        raise InvalidArgument(f"{field} is None; expected integer class labels, one per sample", field=field)
    try:
        if type(value).__module__.startswith("torch"):
            array = np.asarray(value.detach().cpu())
        else:
            array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        what = f"{field} of type {type(value).__name__} are not class labels: {exc}"
        raise InvalidArgument(what, field=field) from None
    empty_list = array.size == 0 and isinstance(value, (list, tuple))
    if array.dtype.kind not in "iu" and not empty_list:
        raise InvalidArgument(f"{field} have dtype {array.dtype}; expected integer class labels", field=field)
    if array.ndim > 1:
        raise InvalidArgument(
            f"{field} have shape {list(array.shape)}; expected one label per sample (one axis)", field=field
        )
    if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise InvalidArgument(f"{field} hold {int(array.max())}, beyond int64; expected class labels", field=field)
    return pb.Labels(classes=array.reshape(-1).astype(np.int64).tolist())


def labels_by_layer(labels: Mapping[int, Any] | None) -> dict[int, pb.Labels]:
    """Layer index -> class labels (:func:`to_labels` each), as the requests carry them.

    Raises:
        InvalidArgument: not a mapping by layer index, or not integer labels.
    """
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise InvalidArgument(
            f"labels are a {type(labels).__name__}; expected a mapping of layer index -> class labels, e.g. {{0: y}}",
            field="labels",
        )
    by_layer = {}
    for index, value in labels.items():
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not 0 <= index < 1 << 32:
            raise InvalidArgument(f"labels has key {index!r}; expected layer indices from 0", field="labels")
        by_layer[int(index)] = to_labels(value, f"labels[{index}]")
    return by_layer


def per_layer(field: str, tensors: Any) -> list[Any]:
    """``tensors``, one per layer, as a list.

    Raises:
        InvalidArgument: None, or one tensor where a list of them is
            expected (iterating it would send its rows as layers).
    """
    if tensors is None:
        raise InvalidArgument(f"{field} is None; expected a list with one tensor per layer", field=field)
    if isinstance(tensors, (list, tuple)):
        return list(tensors)
    shape = getattr(tensors, "shape", None)
    if shape is not None or hasattr(tensors, "__array__") or hasattr(tensors, "__dlpack__"):
        of = f" of shape {list(shape)}" if shape is not None else ""
        raise InvalidArgument(
            f"{field} is one tensor{of}; expected a list with one tensor per layer, e.g. [tensor]", field=field
        )
    return list(tensors)


def to_wire(value: Any) -> tuple[pb.Dtype, npt.NDArray[Any]]:
    """Features as their wire dtype and a little-endian, C-ordered array.

    Copies only when the input is not already laid out so.
    """
    array = to_array(value)
    code = _WIRE_DTYPES[array.dtype.newbyteorder("=")]
    return code, array.astype(DTYPES[code], order="C", copy=False)


def encode(value: Any) -> pb.Tensor:
    """Encode features (anything :func:`to_array` takes) as a Tensor message."""
    code, array = to_wire(value)
    return pb.Tensor(dtype=code, shape=array.shape, data=array.tobytes())


class TensorLike(Protocol):
    """A Tensor message, or a view of one (:class:`distill_core.wire.TensorView`)."""

    @property
    def dtype(self) -> int: ...
    @property
    def shape(self) -> Sequence[int]: ...
    @property
    def data(self) -> bytes | memoryview: ...


def dtype_and_shape(tensor: TensorLike, field: str = "tensor") -> tuple[np.dtype[Any], tuple[int, ...]]:
    """A Tensor's NumPy dtype and shape, checked (whatever holds its elements).

    Raises:
        InvalidArgument: unknown dtype, more than MAX_RANK dimensions or a negative dimension; the error names
            ``field``.
    """
    dtype = DTYPES.get(cast(pb.Dtype, tensor.dtype))
    if dtype is None:
        name = pb.Dtype.Name(tensor.dtype) if tensor.dtype in pb.Dtype.values() else str(tensor.dtype)
        known = ", ".join(pb.Dtype.Name(code) for code in DTYPES)
        raise InvalidArgument(
            f"{field}.dtype is {name}; expected one of {known}",
            field=f"{field}.dtype",
        )
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK:
        raise InvalidArgument(
            f"{field}.shape has {len(shape)} dimensions; expected at most {MAX_RANK}", field=f"{field}.shape"
        )
    for axis, size in enumerate(shape):
        if size < 0:
            raise InvalidArgument(
                f"{field}.shape[{axis}] is {size}; dimensions must be >= 0",
                field=f"{field}.shape",
            )
    return dtype, shape


def decode(tensor: TensorLike, field: str = "tensor") -> npt.NDArray[Any]:
    """Decode a Tensor into a read-only array viewing its bytes (no copy).

    ``tensor.data`` is read once (each read of a protobuf bytes field copies it).

    Raises:
        InvalidArgument: unknown dtype, more than MAX_RANK dimensions, a negative dimension, or a data length
            other than product(shape) x itemsize; the error names ``field``.
    """
    dtype, shape = dtype_and_shape(tensor, field)
    data = tensor.data
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{field}.data has {len(data)} bytes; shape {list(shape)} of "
            f"{pb.Dtype.Name(tensor.dtype)} needs {expected}",
            field=f"{field}.data",
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as exc:  # e.g. more dimensions than NumPy allows
        raise InvalidArgument(f"{field}.shape {list(shape)} cannot be used: {exc}", field=f"{field}.shape") from exc
