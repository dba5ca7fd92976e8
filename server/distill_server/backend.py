"""The compute device: ``--device`` -> an array module and host->device moves.

The only module that imports CuPy. NumPy arrays are processed in blocks that
fit in cache (one pass over memory); CuPy arrays in one block.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["CPU_BLOCK", "Backend", "BackendError", "array_module", "block_size", "select"]

log = logging.getLogger(__name__)

CPU_BLOCK = 1 << 15
"""Elements per block on the CPU: float64 scratch buffers stay in L2."""


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

    def to_device(self, array: np.ndarray) -> Any:
        """Move a host array to this device (a no-op on the CPU).

        CuPy has no bfloat16: such arrays are widened to float32 on the host.
        """
        if self.xp is np:
            return array
        if array.dtype.kind == "V" or array.dtype.name == "bfloat16":
            array = array.astype(np.float32)
        return self.xp.asarray(array)

    def to_host(self, array: Any) -> np.ndarray:
        """Copy a device array to the host (a no-op on the CPU)."""
        host: np.ndarray = array if self.xp is np else array.get()
        return host

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Make this device current in the calling thread."""
        if self.ordinal is None:
            yield
            return
        with self.xp.cuda.Device(self.ordinal):
            yield


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
