"""The CUDA driver API through ctypes: what CUDA IPC needs that neither CuPy
nor torch offers, for the client and the server alike.

- :func:`address_range`: the allocation a device pointer lies in (its base
  and size, ``cuMemGetAddressRange``). A client exports the allocation's
  base (an IPC handle names a whole allocation) and sends the tensor's
  offset in it; the server checks a range against the allocation it opened.
- :func:`ipc_handle`: the ``cudaIpcMemHandle_t`` of an allocation
  (``cuIpcGetMemHandle``), for arrays of libraries that do not export one.
- :func:`device_uuid`: a GPU's UUID as nvidia-smi prints it, so that a
  client and a server can tell whether they share a GPU whatever their
  ``CUDA_VISIBLE_DEVICES``.

Each call runs with the device's primary context current (the one the CUDA
runtime, and so CuPy and torch, use), pushed for the call and popped after,
so it works from any thread. The driver library is loaded on first use; a
machine without one gets :class:`CudaDriverError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from typing import Any

__all__ = ["HANDLE_BYTES", "CudaDriverError", "address_range", "device_uuid", "format_uuid", "ipc_handle"]

HANDLE_BYTES = 64
"""Size of a ``cudaIpcMemHandle_t`` (``CU_IPC_HANDLE_SIZE``)."""

_UUID_BYTES = 16


class CudaDriverError(RuntimeError):
    """The CUDA driver is missing or refused a call; the message says which."""


@functools.cache
def _driver() -> ctypes.CDLL:
    """libcuda, initialised (``cuInit``)."""
    candidates = ["libcuda.so.1", ctypes.util.find_library("cuda")]
    for name in filter(None, candidates):
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        _check(library, "cuInit", library.cuInit(0))
        return library
    raise CudaDriverError("the CUDA driver (libcuda) cannot be loaded on this machine")


def _function(library: ctypes.CDLL, *names: str) -> Any:
    """The first of ``names`` (newest ABI first) the driver exports."""
    for name in names:
        function = getattr(library, name, None)
        if function is not None:
            return function
    raise CudaDriverError(f"the CUDA driver has no {names[-1]}")


def _check(library: ctypes.CDLL, what: str, status: int) -> None:
    if status == 0:
        return
    name = ctypes.c_char_p()
    known = library.cuGetErrorName(status, ctypes.byref(name)) == 0 and name.value
    text = name.value.decode(errors="replace") if known and name.value else f"CUresult {status}"
    raise CudaDriverError(f"{what} failed: {text}")


@contextlib.contextmanager
def _context(ordinal: int) -> Iterator[ctypes.CDLL]:
    """The driver, with device ``ordinal``'s primary context current for the block."""
    library = _driver()
    device = ctypes.c_int()
    _check(library, "cuDeviceGet", library.cuDeviceGet(ctypes.byref(device), ordinal))
    context = ctypes.c_void_p()
    retain = _function(library, "cuDevicePrimaryCtxRetain")
    release = _function(library, "cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease")
    _check(library, "cuDevicePrimaryCtxRetain", retain(ctypes.byref(context), device))
    try:
        push = _function(library, "cuCtxPushCurrent_v2", "cuCtxPushCurrent")
        pop = _function(library, "cuCtxPopCurrent_v2", "cuCtxPopCurrent")
        _check(library, "cuCtxPushCurrent", push(context))
        try:
            yield library
        finally:
            pop(ctypes.byref(ctypes.c_void_p()))
    finally:
        release(device)


def address_range(pointer: int, ordinal: int) -> tuple[int, int]:
    """``(base, size)`` of the allocation on device ``ordinal`` that holds ``pointer``.

    Raises:
        CudaDriverError: no driver, or ``pointer`` is not in device memory of this process.
    """
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    with _context(ordinal) as library:
        get = _function(library, "cuMemGetAddressRange_v2", "cuMemGetAddressRange")
        _check(
            library,
            "cuMemGetAddressRange",
            get(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(pointer)),
        )
    return int(base.value), int(size.value)


def ipc_handle(base: int, ordinal: int) -> bytes:
    """The IPC handle of the allocation starting at ``base`` on device ``ordinal``.

    Raises:
        CudaDriverError: no driver, or memory that cannot be exported (not
            from ``cudaMalloc``: e.g. a stream-ordered or virtual-memory pool).
    """
    handle = ctypes.create_string_buffer(HANDLE_BYTES)
    with _context(ordinal) as library:
        _check(library, "cuIpcGetMemHandle", library.cuIpcGetMemHandle(handle, ctypes.c_uint64(base)))
    return handle.raw


def format_uuid(raw: bytes) -> str:
    """A 16-byte GPU UUID as nvidia-smi prints it: ``GPU-`` and 8-4-4-4-12 hex digits."""
    if len(raw) != _UUID_BYTES:
        raise ValueError(f"a GPU UUID has {_UUID_BYTES} bytes, not {len(raw)}")
    digits = raw.hex()
    return f"GPU-{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


@functools.cache
def device_uuid(ordinal: int) -> str:
    """The UUID of CUDA device ``ordinal`` (of this process's visible devices).

    Raises:
        CudaDriverError: no driver, or no such device.
    """
    library = _driver()  # a device query: no context needed
    device = ctypes.c_int()
    _check(library, "cuDeviceGet", library.cuDeviceGet(ctypes.byref(device), ordinal))
    raw = ctypes.create_string_buffer(_UUID_BYTES)
    get = _function(library, "cuDeviceGetUuid_v2", "cuDeviceGetUuid")
    _check(library, "cuDeviceGetUuid", get(raw, device))
    return format_uuid(raw.raw)
