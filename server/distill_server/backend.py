"""The compute device: ``--device`` -> an array module and host<->device moves.

With :mod:`distill_server.kernels` (the engine's CUDA kernels) and
:mod:`distill_server.cuda_ipc` (clients' CUDA memory), the only modules that
import CuPy. NumPy arrays are processed in blocks that fit in cache (one
pass over memory); CuPy arrays in one block.

On a GPU each server thread computes on a stream of its own, so one call's
copies overlap another's kernels, and moves host memory through pinned
staging buffers of its own, reused across calls: the host copies one chunk
while the DMA engine moves the previous one, and no call pays for pinning.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["CPU_BLOCK", "Backend", "BackendError", "array_module", "block_size", "select"]

log = logging.getLogger(__name__)

CPU_BLOCK = 1 << 17
"""Elements per block on the CPU: 1 MiB float64 scratch buffers, each within
a core's 2 MiB L2 and all of them in the last-level cache. Larger blocks
cost fewer Python steps per pass; measured side by side, this size was the
fastest of 2^14 to 2^19 for every loss, with and without the gradient,
except the value of cosine, whose passes use fewer buffers and take two
blocks at a time (docs/benchmarks.md, the engine)."""

STAGING_CHUNK = 8 << 20
"""Bytes per pinned staging buffer; each GPU server thread has two."""


class BackendError(RuntimeError):
    """The requested device cannot be used."""


def array_module(array: Any) -> ModuleType:
    """NumPy or CuPy, whichever ``array`` belongs to."""
    module: ModuleType = np
    if type(array).__module__.startswith("cupy"):
        import cupy

        module = cupy
    return module


def block_size(array: Any) -> int:
    """How many elements of ``array`` the engine processes at a time (>= 1):
    a cache-sized block on the CPU, everything at once on a GPU."""
    size = max(int(array.size), 1)
    return min(size, CPU_BLOCK) if array_module(array) is np else size


@dataclass(frozen=True)
class Backend:
    """A device the engine computes on.

    Attributes:
        device: ``"cpu"`` or ``"cuda:N"``.
        description: The device and array library, for logs and GetServerInfo.
    """

    device: str
    description: str
    xp: ModuleType = field(repr=False)
    ordinal: int | None = None
    _threads: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    def to_device(self, array: np.ndarray) -> Any:
        """Move a host array to this device (a no-op on the CPU), on the
        calling thread's stream: kernels it runs next see the data.

        CuPy has no bfloat16: such arrays are widened to float32 on the host.
        """
        if self.xp is np:
            return array
        if array.dtype.kind == "V" or array.dtype.name == "bfloat16":
            array = array.astype(np.float32)
        with self.xp.cuda.Device(self.ordinal):
            device = self.xp.empty(array.shape, dtype=array.dtype)
            self._staging().upload(np.ascontiguousarray(array), device)
        return device

    def to_host(self, array: Any) -> np.ndarray:
        """Copy a device array to the host (a no-op on the CPU)."""
        if self.xp is np:
            host: np.ndarray = array
            return host
        with self.xp.cuda.Device(self.ordinal):
            array = self.xp.ascontiguousarray(array)
            host = np.empty(array.shape, dtype=array.dtype)
            self._staging().download(array, host)
        return host

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Make this device, and the calling thread's stream on it, current;
        on exit, wait for the work queued on that stream."""
        if self.ordinal is None:
            yield
            return
        with self.xp.cuda.Device(self.ordinal):
            stream = self._staging().stream
            with stream:
                try:
                    yield
                finally:
                    stream.synchronize()

    def _staging(self) -> _Staging:
        """The calling thread's stream and pinned buffers (made on first use)."""
        staging: _Staging | None = getattr(self._threads, "staging", None)
        if staging is None:
            with self.xp.cuda.Device(self.ordinal):
                staging = self._threads.staging = _Staging(self.xp, STAGING_CHUNK)
        return staging


class _Staging:
    """One thread's non-blocking stream and two pinned host buffers.

    A move goes through the buffers in turn, a chunk at a time: while the
    DMA engine moves one chunk (asynchronously, on the stream), the host
    copies the next into the other buffer, waiting only for that buffer's
    previous move to finish.
    """

    def __init__(self, xp: ModuleType, chunk: int) -> None:
        self.xp, self.chunk = xp, chunk
        self.stream = xp.cuda.Stream(non_blocking=True)
        self.memory = [xp.cuda.alloc_pinned_memory(chunk) for _ in range(2)]
        self.buffers = [np.frombuffer(memory, dtype=np.uint8, count=chunk) for memory in self.memory]
        self.done = [xp.cuda.Event(disable_timing=True) for _ in range(2)]

    def _chunks(self, nbytes: int) -> Iterator[tuple[int, int, int]]:
        """``(buffer, offset, length)`` of each chunk of ``nbytes``."""
        for index, offset in enumerate(range(0, nbytes, self.chunk)):
            yield index % 2, offset, min(self.chunk, nbytes - offset)

    def upload(self, host: np.ndarray, device: Any) -> None:
        """Queue the copy of ``host`` into ``device`` (same size, contiguous)."""
        runtime, source = self.xp.cuda.runtime, host.reshape(-1).view(np.uint8)
        for buffer, offset, length in self._chunks(source.size):
            self.done[buffer].synchronize()
            np.copyto(self.buffers[buffer][:length], source[offset : offset + length])
            runtime.memcpyAsync(
                device.data.ptr + offset,
                self.buffers[buffer].ctypes.data,
                length,
                runtime.memcpyHostToDevice,
                self.stream.ptr,
            )
            self.done[buffer].record(self.stream)

    def download(self, device: Any, host: np.ndarray) -> None:
        """Copy ``device`` into ``host`` (same size, contiguous) once the
        stream's earlier work has written it."""
        runtime, target = self.xp.cuda.runtime, host.reshape(-1).view(np.uint8)
        pending: tuple[int, int, int] | None = None
        for buffer, offset, length in self._chunks(target.size):
            runtime.memcpyAsync(
                self.buffers[buffer].ctypes.data,
                device.data.ptr + offset,
                length,
                runtime.memcpyDeviceToHost,
                self.stream.ptr,
            )
            self.done[buffer].record(self.stream)
            if pending is not None:
                self._land(pending, target)
            pending = (buffer, offset, length)
        if pending is not None:
            self._land(pending, target)

    def _land(self, chunk: tuple[int, int, int], target: np.ndarray) -> None:
        buffer, offset, length = chunk
        self.done[buffer].synchronize()
        np.copyto(target[offset : offset + length], self.buffers[buffer][:length])


def _cpu() -> Backend:
    return Backend("cpu", f"cpu (numpy {np.__version__})", np)


def _cuda(ordinal: int) -> Backend:
    try:
        import cupy
    except ImportError as exc:
        raise BackendError("CuPy is not installed: pip install 'distill-service[gpu]'") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise BackendError(f"no CUDA device: {exc}") from exc
    if not 0 <= ordinal < count:
        raise BackendError(f"cuda:{ordinal} requested but {count} CUDA device(s) present")
    props = cupy.cuda.runtime.getDeviceProperties(ordinal)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return Backend(f"cuda:{ordinal}", f"cuda:{ordinal} {name} (cupy {cupy.__version__})", cupy, ordinal)


def select(device: str) -> Backend:
    """Resolve ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` to a backend.

    ``auto`` takes CUDA device 0 when CuPy finds one, else the CPU.

    Raises:
        BackendError: an explicit CUDA device that cannot be used, or an
            unknown device name.
    """
    if device == "cpu":
        return _cpu()
    if device == "auto":
        try:
            return _cuda(0)
        except BackendError as exc:
            log.info("no usable CUDA device (%s); computing on the CPU", exc)
            return _cpu()
    if device == "cuda" or device.startswith("cuda:"):
        ordinal = device.partition(":")[2] or "0"
        if not ordinal.isdigit():
            raise BackendError(f"bad device {device!r}: expected cuda:N")
        return _cuda(int(ordinal))
    raise BackendError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N")
