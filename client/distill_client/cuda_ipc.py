"""CUDA tensors by IPC handle, for a trainer on the server's GPU.

A trainer whose server computes on the same GPU (``--device cuda`` on its
host) need not copy its feature maps to the host at all: it sends each
tensor as a CUDA IPC handle of its allocation and the tensor's range in it
(``Tensor.cuda_ipc``); the server computes on the memory where it is and
writes the gradients into buffers this client allocated on the device
(``gradient_cuda_outputs``), which come back as the layers' gradients.

- CuPy arrays, torch CUDA tensors and other objects with
  ``__cuda_array_interface__`` (through CuPy) are taken; a non-contiguous
  one is made contiguous first, integers become float32, on the device.
- A handle names a whole allocation (``cudaMalloc``'s), so the client finds
  the allocation a tensor lies in (the driver's ``cuMemGetAddressRange``:
  memory pools hand out pieces of larger allocations) and sends its offset.
- Before a request goes out the producing streams are synchronized, so the
  server reads finished data; when the answer comes the server has finished
  writing the gradients and has unmapped everything.
- A call that fails without an answer from the server (a deadline, a lost
  connection) may still be computing there: its arrays are kept alive until
  the client closes, so the server never writes into reused memory.

:class:`CudaIpc` is what a :class:`~distill_client.DistillClient` does per
call: IPC where its ``transport`` and the server allow it, else the tensors
copied to the host and sent as bytes (or shared memory), as before.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import ml_dtypes
import numpy as np

from distill.v1 import distill_pb2 as pb
from distill_client.shared_memory import Batch, SharedMemory, Transport
from distill_core import cuda, tensors
from distill_core.errors import (
    Cancelled,
    CudaIpcUnavailable,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    Unavailable,
)
from distill_core.losses import LayerLoss
from distill_core.tensors import DTYPES

__all__ = [
    "CudaBatch",
    "CudaIpc",
    "CudaIpcInfo",
    "DeviceArray",
    "device_array",
    "export",
    "is_cuda_array",
    "to_host",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_CODES = {dtype: code for code, dtype in DTYPES.items()}
_TORCH_DTYPES = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
    "float64": pb.DTYPE_FLOAT64,
}
"""torch dtype names (``str(dtype)`` without ``torch.``) -> wire dtypes."""
_AMBIGUOUS = (Cancelled, DeadlineExceeded, Unavailable)
"""Failures that leave open whether the server is still using a call's memory."""


@dataclass(frozen=True)
class CudaIpcInfo:
    """Whether a server takes CUDA memory by IPC handle (``GetServerInfo``)."""

    enabled: bool
    device_uuid: str
    """Its GPU's UUID, as nvidia-smi prints it; empty when not enabled."""

    @classmethod
    def from_proto(cls, message: pb.CudaIpcInfo) -> CudaIpcInfo:
        """The description a CudaIpcInfo message holds."""
        return cls(message.enabled, message.device_uuid)


def _torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _cupy_array(value: Any) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(value, cupy.ndarray)


def is_cuda_array(value: Any) -> bool:
    """Whether ``value`` lives in CUDA memory: a torch CUDA tensor, a CuPy
    array, or anything with ``__cuda_array_interface__``."""
    if _torch_tensor(value):
        return bool(value.is_cuda)
    return _cupy_array(value) or hasattr(type(value), "__cuda_array_interface__")


def to_host(value: Any) -> Any:
    """``value`` copied to a NumPy array when it is in CUDA memory (bfloat16
    as ``ml_dtypes.bfloat16``); anything else as it is."""
    if not is_cuda_array(value):
        return value
    if _torch_tensor(value):
        import torch

        host = value.detach().to("cpu").contiguous()
        if host.dtype == torch.bfloat16:
            return host.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return host.numpy()
    try:
        import cupy
    except ImportError:
        raise InvalidArgument(f"a {type(value).__name__} in CUDA memory needs CuPy to be copied to the host") from None
    return cupy.asnumpy(cupy.asarray(value))


@dataclass(frozen=True, eq=False)
class DeviceArray:
    """A contiguous CUDA array of a wire dtype, ready to export: its library
    (``"cupy"`` or ``"torch"``), the array, its device and where it is."""

    library: str
    array: Any
    ordinal: int
    code: pb.Dtype
    shape: tuple[int, ...]
    pointer: int
    nbytes: int

    def empty(self) -> DeviceArray:
        """A new array of this one's library, device, dtype and shape (a gradient buffer)."""
        if self.library == "torch":
            import torch

            return _torch(torch.empty_like(self.array, memory_format=torch.contiguous_format))
        import cupy

        with cupy.cuda.Device(self.ordinal):
            return _cupy(cupy.empty(self.shape, self.array.dtype), self.code)


def _torch(tensor: Any) -> DeviceArray:
    name = str(tensor.dtype).removeprefix("torch.")
    code = _TORCH_DTYPES[name]
    return DeviceArray(
        "torch",
        tensor,
        int(tensor.device.index),
        code,
        tuple(tensor.shape),
        int(tensor.data_ptr()),
        tensor.numel() * tensor.element_size(),
    )


def _cupy(array: Any, code: pb.Dtype) -> DeviceArray:
    return DeviceArray("cupy", array, int(array.device.id), code, tuple(array.shape), int(array.data.ptr), array.nbytes)


def _unsendable(dtype: Any) -> InvalidArgument:
    return InvalidArgument(f"features of dtype {dtype} cannot be sent: use float32, float16, bfloat16 or float64")


def device_array(value: Any) -> DeviceArray | None:
    """``value`` as a contiguous CUDA array of a wire dtype (a copy on the
    device where it is not one already); None when it is not in CUDA memory.

    Raises:
        InvalidArgument: a dtype that cannot be sent (complex, ...).
        CudaIpcUnavailable: an ``__cuda_array_interface__`` object without CuPy to read it.
    """
    if _torch_tensor(value):
        if not value.is_cuda:
            return None
        tensor = value.detach()
        if str(tensor.dtype).removeprefix("torch.") not in _TORCH_DTYPES:
            if tensor.is_floating_point() or tensor.is_complex():
                raise _unsendable(tensor.dtype)
            tensor = tensor.float()
        return _torch(tensor.contiguous())
    if not is_cuda_array(value):
        return None
    try:
        import cupy
    except ImportError:
        raise CudaIpcUnavailable(
            f"a {type(value).__name__} in CUDA memory needs CuPy to be sent (pip install cupy-cuda12x)"
        ) from None
    array = cupy.asarray(value)
    code = _CODES.get(np.dtype(array.dtype))
    if code is None:
        if array.dtype.kind not in "biu":
            raise _unsendable(array.dtype)
        array, code = array.astype(cupy.float32), pb.DTYPE_FLOAT32
    return _cupy(cupy.ascontiguousarray(array), code)


def _synchronize(arrays: Sequence[DeviceArray]) -> None:
    """Wait for the current stream of every device the arrays are on: the
    server then reads finished data, and no queued work of this process
    touches memory the server writes."""
    for library, ordinal in sorted({(a.library, a.ordinal) for a in arrays}):
        if library == "torch":
            import torch

            torch.cuda.current_stream(ordinal).synchronize()
        else:
            import cupy

            with cupy.cuda.Device(ordinal):
                cupy.cuda.get_current_stream().synchronize()


def export(array: DeviceArray, device_uuid: str) -> pb.CudaIpcRef:
    """The IPC reference of ``array`` on the GPU ``device_uuid``: its
    allocation's handle and its range there (the array must stay alive, and
    its producer's stream synchronized, while a server uses it).

    Raises:
        CudaIpcUnavailable: memory the driver will not export (e.g. from a
            stream-ordered or virtual-memory pool).
    """
    try:
        base, _ = cuda.address_range(array.pointer, array.ordinal)
        if array.library == "cupy":
            import cupy

            with cupy.cuda.Device(array.ordinal):
                handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(base))
        else:
            # Not torch's own _share_cuda_: it puts the storage behind torch's inter-process reference count,
            # which keeps the memory after the tensor is freed until a torch consumer releases it.
            handle = cuda.ipc_handle(base, array.ordinal)
    except Exception as exc:  # the driver's error (CudaDriverError, CuPy's CUDARuntimeError)
        raise CudaIpcUnavailable(f"CUDA memory at {array.pointer:#x} cannot be exported: {exc}") from exc
    return pb.CudaIpcRef(handle=handle, offset=array.pointer - base, byte_size=array.nbytes, device_uuid=device_uuid)


def _tensor(array: DeviceArray, device_uuid: str) -> pb.Tensor:
    """A Tensor message for ``array``: by reference, or with no elements (nothing to map)."""
    if array.nbytes == 0:
        return pb.Tensor(dtype=array.code, shape=array.shape)
    return pb.Tensor(dtype=array.code, shape=array.shape, cuda_ipc=export(array, device_uuid))


class CudaBatch(Batch):
    """One call's tensors as references to CUDA memory, the gradient buffers
    allocated for it and their references (``gradient_cuda_outputs``)."""

    def __init__(
        self,
        teachers: list[pb.Tensor],
        students: list[pb.Tensor],
        gradients: Sequence[DeviceArray],
        outputs: Sequence[pb.CudaIpcRef],
        keep: Sequence[DeviceArray],
    ) -> None:
        super().__init__(teachers, students)
        self.gradient_cuda_outputs = list(outputs)
        self.buffers = list(gradients)
        self.keep = [*keep, *gradients]
        """Every array the server may read or write during the call."""

    @property
    def shared(self) -> bool:
        """False: nothing of the call is in shared memory."""
        return False

    def layers(self, messages: Sequence[pb.LayerLoss]) -> list[LayerLoss]:
        """The results, each gradient the buffer the server wrote it into."""
        results = []
        for position, message in enumerate(messages):
            gradient = message.student_gradient
            if message.HasField("student_gradient") and gradient.HasField("cuda_ipc"):
                if position >= len(self.buffers) or gradient.cuda_ipc != self.gradient_cuda_outputs[position]:
                    raise Internal(f"the server wrote layer {position}'s gradient to memory this call did not give it")
                array = self.buffers[position].array
                results.append(LayerLoss(message.layer_index, message.name, message.loss, message.weighted_loss, array))
            else:
                results.append(LayerLoss.from_proto(message))
        return results


class CudaIpc:
    """The CUDA IPC side of one :class:`~distill_client.DistillClient`.

    With ``transport`` ``"auto"``, a call whose tensors are all in CUDA
    memory of the GPU the server computes on goes by handle, and any other
    call (or one the server refuses with CUDA_IPC_UNAVAILABLE, which turns
    IPC off for this client) as ``shared_memory`` sends it, tensors copied to
    the host. ``"cuda_ipc"`` sends every call by handle or raises
    :class:`~distill_core.errors.CudaIpcUnavailable`; ``"grpc"`` and
    ``"shm"`` never do.

    Args:
        transport: The client's.
        shared_memory: The client's shared-memory side, for calls that go another way.
        server_info: The server's CUDA IPC description (``GetServerInfo``).
        target: The server, for messages.
    """

    def __init__(
        self,
        transport: Transport,
        shared_memory: SharedMemory,
        server_info: Callable[[], CudaIpcInfo | None],
        target: str,
    ) -> None:
        self.transport = transport
        self._shared_memory = shared_memory
        self._server_info = server_info
        self._target = target
        self._lock = threading.Lock()
        self._info: CudaIpcInfo | None = None
        self._disabled: str | None = None
        self._held: list[list[DeviceArray]] = []

    def exchange(
        self, teachers: Sequence[Any], students: Sequence[Any], gradients: bool, send: Callable[[Batch], _T]
    ) -> _T:
        """``send(batch)`` for a call's tensors: by handle where it can go so,
        else copied to the host (see the class)."""
        teachers, students = tensors.per_layer("teachers", teachers), tensors.per_layer("students", students)
        if self.transport in ("auto", "cuda_ipc"):
            batch = self.batch(teachers, students, gradients)
            if batch is not None:
                try:
                    with batch:
                        return send(batch)
                except _AMBIGUOUS:
                    with self._lock:
                        self._held.append(batch.keep)  # the server may still be using them
                    raise
                except CudaIpcUnavailable as exc:
                    if self.transport == "cuda_ipc":
                        raise
                    self._disable(f"the server refused CUDA memory: {exc}")
        hosted = [to_host(value) for value in teachers], [to_host(value) for value in students]
        return self._shared_memory.exchange(*hosted, gradients, send)

    def batch(self, teachers: Sequence[Any], students: Sequence[Any], gradients: bool) -> CudaBatch | None:
        """A call's tensors by reference to CUDA memory, with gradient buffers
        if ``gradients``; None where the call goes another way (``auto``).

        Raises:
            CudaIpcUnavailable: with ``cuda_ipc``, where the call cannot go by handle.
            InvalidArgument: a tensor of a dtype that cannot be sent.
        """
        values = [*teachers, *students]
        if not values:
            return None  # nothing to send either way
        try:
            info = self._available(values)
            device = [array for array in map(device_array, values) if array is not None]
            self._same_gpu(device, info)
            count = len(teachers)
            buffers = [array.empty() for array in device[count:]] if gradients else []
            sendable = gradients and all(buffer.nbytes for buffer in buffers)  # an empty student fails anyway
            _synchronize(device + buffers)
            tensors = [_tensor(array, info.device_uuid) for array in device]
            outputs = [export(buffer, info.device_uuid) for buffer in buffers] if sendable else []
        except CudaIpcUnavailable as exc:
            if self.transport == "cuda_ipc":
                raise CudaIpcUnavailable(
                    f"transport='cuda_ipc': {exc}; transport='auto' sends such calls as bytes", field=exc.field
                ) from exc
            log.debug("%s: this call goes without CUDA IPC: %s", self._target, exc)
            return None
        return CudaBatch(tensors[:count], tensors[count:], buffers if sendable else [], outputs, device)

    def _available(self, values: Sequence[Any]) -> CudaIpcInfo:
        """The server's description, where CUDA IPC can carry ``values``.

        Raises:
            CudaIpcUnavailable: a value not in CUDA memory, IPC off for this
                client, or a server that takes no CUDA memory.
        """
        if not all(map(is_cuda_array, values)):
            raise CudaIpcUnavailable("not every tensor is in CUDA memory (a CuPy array, a torch CUDA tensor)")
        with self._lock:
            disabled = self._disabled
        if disabled is not None:
            raise CudaIpcUnavailable(disabled)
        info = self._probe()
        if not info.enabled:
            raise CudaIpcUnavailable("the server takes no CUDA memory (it computes on the CPU, or has CUDA IPC off)")
        return info

    @staticmethod
    def _same_gpu(device: Sequence[DeviceArray], info: CudaIpcInfo) -> None:
        """Raises CudaIpcUnavailable unless every array is on the server's GPU."""
        try:
            uuids = {cuda.device_uuid(ordinal) for ordinal in {array.ordinal for array in device}}
        except cuda.CudaDriverError as exc:
            raise CudaIpcUnavailable(str(exc)) from exc
        if uuids != {info.device_uuid}:
            raise CudaIpcUnavailable(
                f"the tensors are on {', '.join(sorted(uuids))} but the server computes on {info.device_uuid}"
            )

    def _probe(self) -> CudaIpcInfo:
        """The server's CUDA IPC description, asked once (a server that does
        not say takes no CUDA memory)."""
        with self._lock:
            info = self._info
        if info is None:
            info = self._server_info() or CudaIpcInfo(False, "")
            with self._lock:
                self._info = info
        return info

    def _disable(self, reason: str) -> None:
        with self._lock:
            self._disabled = self._disabled or reason
        log.debug("%s: CUDA IPC off for this client: %s", self._target, reason)

    def close(self) -> None:
        """Let go of the arrays of calls that failed without an answer (idempotent)."""
        with self._lock:
            self._held = []
