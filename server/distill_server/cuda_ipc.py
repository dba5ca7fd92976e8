"""Tensors and gradient outputs in CUDA memory of a trainer on this GPU.

A client on the server's host and GPU sends CUDA IPC handles
(``Tensor.cuda_ipc``, ``CudaIpcRef``) instead of bytes: the server maps the
client's allocations into its own address space, computes on them in place
and writes gradients straight into the client's buffers, so the features
never leave the GPU.

- :func:`tensor_reference` and :func:`output_reference` check what a request says of such a tensor (dtype,
  shape, handle length, byte size, alignment), without a GPU: a malformed
  request is INVALID_ARGUMENT on any server.
- :class:`CudaIpc` is the server's side: whether it takes CUDA memory at
  all, its GPU's UUID, and the allocations mapped now. An allocation is
  mapped once however many calls use it, and unmapped when the last of them
  is done, so nothing stays mapped between calls.
- :class:`Session` is one call's use: it maps what the call names, checks
  each range against its allocation and, once the call's work on the device
  is finished (its stream synchronized), unmaps it, whether the call
  succeeded or not.

CuPy has no bfloat16: bfloat16 tensors are read as their 16-bit patterns
and widened exactly to float32 on the device; a bfloat16 gradient is
computed in float32 and rounded to nearest-even into the client's buffer.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from distill.v1 import distill_pb2 as pb
from distill_core import cuda, tensors
from distill_core.errors import CudaIpcUnavailable, InvalidArgument, LossOverflow, OutOfRange
from distill_core.wire import TensorView

__all__ = [
    "CudaIpc",
    "Reference",
    "Session",
    "narrow_bfloat16",
    "output_reference",
    "tensor_reference",
    "widen_bfloat16",
]

log = logging.getLogger(__name__)

_BFLOAT16 = tensors.DTYPES[pb.DTYPE_BFLOAT16]


def widen_bfloat16(xp: Any, bits: Any) -> Any:
    """bfloat16 bit patterns (uint16) as the float32 values they stand for (exact)."""
    return (bits.astype(xp.uint32) << 16).view(xp.float32)


def narrow_bfloat16(xp: Any, values: Any, out: Any) -> bool:
    """Round float32 ``values`` to bfloat16, to nearest even, into the uint16
    array ``out`` (as ml_dtypes does); whether a finite value became infinite."""
    bits = values.view(xp.uint32)
    rounded = (bits + ((bits >> 16) & 1) + xp.uint32(0x7FFF)) >> 16
    rounded = xp.where(xp.isnan(values), xp.uint32(0x7FC0), rounded)
    out[...] = rounded.astype(xp.uint16)
    return bool((((rounded & 0x7FFF) == 0x7F80) & xp.isfinite(values)).any())


@dataclass(frozen=True)
class Reference:
    """A checked CudaIpcRef: where a tensor (or gradient output) of ``dtype``
    and ``shape`` is, the request field naming it and its layer, if any."""

    ref: pb.CudaIpcRef
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    field: str
    layer: int | None = None

    @property
    def size(self) -> int:
        """Its element count (what ``--max-elements`` counts)."""
        return math.prod(self.shape)


def _check_ref(ref: pb.CudaIpcRef, dtype: np.dtype[Any], shape: tuple[int, ...], field: str) -> None:
    if len(ref.handle) != cuda.HANDLE_BYTES:
        raise InvalidArgument(
            f"{field}.handle has {len(ref.handle)} bytes; a CUDA IPC handle has {cuda.HANDLE_BYTES}",
            field=f"{field}.handle",
        )
    expected = math.prod(shape) * dtype.itemsize
    if ref.byte_size != expected:
        raise InvalidArgument(
            f"{field}.byte_size is {ref.byte_size}; shape {list(shape)} of {dtype.name} needs {expected}",
            field=f"{field}.byte_size",
        )
    if ref.offset % dtype.itemsize:
        raise InvalidArgument(
            f"{field}.offset is {ref.offset}; elements of {dtype.name} start at multiples of {dtype.itemsize}",
            field=f"{field}.offset",
        )


def tensor_reference(view: TensorView, field: str) -> Reference:
    """A tensor in CUDA memory (``view.cuda_ipc`` is set), checked.

    Raises:
        InvalidArgument: a bad dtype or shape, ``data`` or ``shared_memory``
            also set, a handle that is not 64 bytes, a byte size other than
            the shape's, an offset that is not a multiple of the dtype's size.
    """
    assert view.cuda_ipc is not None
    dtype, shape = tensors.dtype_and_shape(view, field)
    for other, present in (("data", len(view.data) > 0), ("shared_memory", view.shared_memory is not None)):
        if present:
            raise InvalidArgument(f"{field} sets both {other} and cuda_ipc; set one", field=field)
    _check_ref(view.cuda_ipc, dtype, shape, f"{field}.cuda_ipc")
    return Reference(view.cuda_ipc, dtype, shape, f"{field}.cuda_ipc")


def output_reference(
    ref: pb.CudaIpcRef, dtype: np.dtype[Any], shape: tuple[int, ...], field: str, layer: int
) -> Reference:
    """A gradient output in CUDA memory for a student of ``dtype`` and ``shape``, checked.

    Raises:
        InvalidArgument: as :func:`tensor_reference`.
    """
    _check_ref(ref, dtype, shape, field)
    return Reference(ref, dtype, shape, field, layer)


@dataclass(eq=False)
class _Mapping:
    """An allocation of another process mapped here: its handle, where it
    is, its size from there, and how many calls use it now."""

    handle: bytes
    pointer: int
    size: int
    users: int = 0


class CudaIpc:
    """The server's CUDA IPC: on where it computes on CUDA device ``ordinal``
    and ``enabled``; ``count`` is told how many allocations are mapped."""

    def __init__(self, ordinal: int | None, enabled: bool, count: Callable[[int], None] | None = None) -> None:
        self.ordinal = ordinal
        self.device_uuid = ""
        self._why = "this server has CUDA IPC off (--no-cuda-ipc)"
        if ordinal is None:
            self._why = "this server computes on the CPU"
        if ordinal is not None and enabled:
            try:
                self.device_uuid = _device_uuid(ordinal)
                log.info("CUDA IPC on: clients on %s may send tensors in CUDA memory", self.device_uuid)
            except cuda.CudaDriverError as exc:
                self._why = f"this server cannot tell its GPU's UUID ({exc})"
                log.warning("CUDA IPC is off: %s", self._why)
        self._count = count or (lambda _: None)
        self._lock = threading.Lock()
        self._mapped: dict[bytes, _Mapping] = {}

    @property
    def enabled(self) -> bool:
        """Whether tensors in CUDA memory are taken."""
        return bool(self.device_uuid)

    @property
    def mapped(self) -> int:
        """How many allocations of clients are mapped now (calls using them are in flight)."""
        return len(self._mapped)

    def info(self) -> pb.CudaIpcInfo:
        """What GetServerInfo says of CUDA IPC."""
        return pb.CudaIpcInfo(enabled=self.enabled, device_uuid=self.device_uuid)

    def session(self) -> Session:
        """One call's use of CUDA memory (a context manager)."""
        return Session(self)

    def _acquire(self, ref: pb.CudaIpcRef, field: str) -> _Mapping:
        """The mapping of ``ref``'s allocation, opened now or shared with the
        calls using it; one more user of it."""
        if not self.enabled:
            raise CudaIpcUnavailable(f"{field}: {self._why}; send the tensor's bytes instead", field=field)
        if ref.device_uuid != self.device_uuid:
            raise CudaIpcUnavailable(
                f"{field}.device_uuid is {ref.device_uuid[:64]!r} but this server computes on {self.device_uuid}; "
                "CUDA memory goes by handle only to a server on its own GPU",
                field=f"{field}.device_uuid",
            )
        import cupy

        handle = bytes(ref.handle)
        with self._lock:
            mapping = self._mapped.get(handle)
            if mapping is None:
                mapping = self._open(cupy, handle, field)
                self._mapped[handle] = mapping
                self._count(len(self._mapped))
            mapping.users += 1
        return mapping

    def _open(self, cupy: Any, handle: bytes, field: str) -> _Mapping:
        runtime = cupy.cuda.runtime
        try:
            pointer = int(runtime.ipcOpenMemHandle(handle, runtime.cudaIpcMemLazyEnablePeerAccess))
        except runtime.CUDARuntimeError as exc:
            raise CudaIpcUnavailable(
                f"{field}.handle cannot be opened: {exc} (a freed allocation, or a process that cannot share "
                "CUDA memory with the server)",
                field=f"{field}.handle",
            ) from None
        try:
            base, size = cuda.address_range(pointer, self.ordinal or 0)
        except cuda.CudaDriverError as exc:
            _close(cupy, pointer)
            raise CudaIpcUnavailable(f"{field}.handle: the mapped allocation cannot be measured: {exc}") from None
        return _Mapping(handle, pointer, base + size - pointer)

    def _release(self, mapping: _Mapping) -> None:
        """One user less; the last one unmaps the allocation."""
        import cupy

        with self._lock:
            mapping.users -= 1
            if mapping.users > 0:
                return
            del self._mapped[mapping.handle]
            self._count(len(self._mapped))
            _close(cupy, mapping.pointer)


def _close(cupy: Any, pointer: int) -> None:
    try:
        cupy.cuda.runtime.ipcCloseMemHandle(pointer)
    except cupy.cuda.runtime.CUDARuntimeError as exc:  # nothing the call can do; the mapping is gone either way
        log.warning("closing a CUDA IPC mapping failed: %s", exc)


def _device_uuid(ordinal: int) -> str:
    """The UUID of CUDA device ``ordinal``: from its properties (the
    runtime's), else from the driver when those do not hold all 16 bytes."""
    import cupy

    raw = cupy.cuda.runtime.getDeviceProperties(ordinal).get("uuid")
    if isinstance(raw, bytes) and len(raw) == 16:
        return cuda.format_uuid(raw)
    return cuda.device_uuid(ordinal)


@dataclass(eq=False)
class _Output:
    """A gradient output in CUDA memory: the array the engine writes into
    (the client's buffer, or float32 scratch for bfloat16) and the client's."""

    array: Any
    target: Any
    reference: Reference


class Session:
    """One call's CUDA memory: mapped as the call names it, unmapped by
    :meth:`close` once the call's work on the device is done."""

    def __init__(self, ipc: CudaIpc) -> None:
        self.ipc = ipc
        self._held: list[_Mapping] = []
        self._outputs: list[_Output] = []

    def _array(self, ref: Reference) -> Any:
        """``ref``'s range as a CuPy array: of its dtype, or of uint16 for bfloat16 (its bits)."""
        mapping = self.ipc._acquire(ref.ref, ref.field)
        self._held.append(mapping)
        end = ref.ref.offset + ref.ref.byte_size  # Python integers: no overflow
        if end > mapping.size:
            raise OutOfRange(
                f"{ref.field}: bytes {ref.ref.offset} to {end} are outside the allocation's {mapping.size}",
                field=ref.field,
                layer=ref.layer,
            )
        import cupy

        memory = cupy.cuda.UnownedMemory(mapping.pointer, mapping.size, mapping, self.ipc.ordinal or 0)
        pointer = cupy.cuda.MemoryPointer(memory, ref.ref.offset)
        dtype = cupy.uint16 if ref.dtype == _BFLOAT16 else ref.dtype
        return cupy.ndarray(ref.shape, dtype=dtype, memptr=pointer)

    def tensor(self, ref: Reference) -> Any:
        """The tensor at ``ref``, on the device (bfloat16 widened to float32).

        Raises:
            CudaIpcUnavailable: IPC off, another GPU, a handle the driver refuses.
            OutOfRange: a range past the end of its allocation.
        """
        array = self._array(ref)
        if ref.dtype != _BFLOAT16:
            return array
        import cupy

        return widen_bfloat16(cupy, array)

    def output(self, ref: Reference) -> Any:
        """The array the engine writes the gradient at ``ref`` into; see :meth:`finish`.

        Raises:
            CudaIpcUnavailable, OutOfRange: as :meth:`tensor`.
        """
        target = self._array(ref)
        made = _Output(target, target, ref)
        if ref.dtype == _BFLOAT16:
            import cupy

            made = _Output(cupy.empty_like(target, dtype=cupy.float32), target, ref)
        self._outputs.append(made)
        return made.array

    def finish(self) -> None:
        """Round the bfloat16 gradients the engine wrote into their outputs.

        Raises:
            LossOverflow: a float32 gradient beyond bfloat16's range.
        """
        for made in self._outputs:
            if made.array is made.target:
                continue
            import cupy

            if narrow_bfloat16(cupy, made.array, made.target):
                raise LossOverflow(
                    f"layer {made.reference.layer}: the gradient overflows bfloat16 (an element rounds to infinity)",
                    layer=made.reference.layer,
                    field=made.reference.field,
                )

    def close(self) -> None:
        """Wait for the work queued on the current stream, then unmap (idempotent)."""
        held, self._held = self._held, []
        self._outputs = []
        if not held:
            return
        import cupy

        try:
            cupy.cuda.get_current_stream().synchronize()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            log.error("the device failed while a call used CUDA memory of a client: %s", exc)
        for mapping in held:
            self.ipc._release(mapping)

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
