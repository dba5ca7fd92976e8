"""Tensors through shared memory, for a trainer on the server's host.

A co-located client need not push its feature maps through a socket: it
registers shared memory with the server (``RegisterSharedMemory``), copies
each call's tensors into it and sends references (``Tensor.shared_memory``)
instead of bytes; the server writes gradients back into it. Where the
server offers its socket (Linux), a region is a memory file sealed against
shrinking and handed to that socket, which the server maps and computes on
in place; elsewhere it is a file in the server's shared-memory directory
(``/dev/shm``), which the server reads and writes by descriptor. Either way
nothing is left behind if either side dies: a file's name is removed as
soon as the server holds it.

- :class:`Region`: one registered region, a writable ``mmap`` whose
  registration call is its lease (cancelled by :meth:`Region.free`, or when
  the region is garbage-collected).
- :class:`RegionPool`: registered regions reused across calls, one call at a
  time each.
- :class:`SharedMemory`: what a :class:`~distill_client.DistillClient` does
  per call for its ``transport``: whether to use shared memory at all, the
  layout of a call's tensors and gradient outputs, and the arrays of
  :meth:`~distill_client.DistillClient.shared_arrays` sent with no copy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import mmap
import os
import re
import secrets
import socket
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple, Protocol, TypeVar, get_args

import grpc
import numpy as np
import numpy.typing as npt

from distill.v1 import distill_pb2 as pb
from distill_client._closing import Closing
from distill_core import rpc
from distill_core.errors import (
    Cancelled,
    DeadlineExceeded,
    DistillError,
    Internal,
    RegionNotFound,
    ResourceExhausted,
    SharedMemoryDisabled,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from distill_core.losses import LayerLoss
from distill_core.tensors import DTYPES, to_wire

__all__ = [
    "ALIGNMENT",
    "IDLE_REGIONS",
    "MIN_REGION_BYTES",
    "SHM_THRESHOLD_BYTES",
    "TRANSPORTS",
    "Batch",
    "Lease",
    "Region",
    "RegionPool",
    "SharedMemory",
    "SharedMemoryInfo",
    "create_region",
    "create_sealed_region",
    "layout",
    "region_size",
    "shared_range",
]

log = logging.getLogger(__name__)

Transport = Literal["auto", "shm", "grpc", "cuda_ipc"]
TRANSPORTS: tuple[str, ...] = get_args(Transport)
"""The values of ``DistillClient(transport=...)``."""

SHM_THRESHOLD_BYTES = 64 * 1024
"""``transport="auto"`` sends a call through shared memory only when the bytes
it would copy there (tensors, and gradients with ``gradients=True``) total at
least this much: below it, inline bytes cost less than a region round trip."""
MIN_REGION_BYTES = 1 << 20
"""Smallest pooled region; larger ones are rounded up to a power of two, so
that a region serves the next calls of a training loop whose sizes vary a little."""
IDLE_REGIONS = 4
"""Most idle regions a pool keeps registered (the largest ones)."""
ALIGNMENT = 64
"""Byte alignment of every tensor in a region (a cache line; enough for any SIMD load)."""

_SHM_DTYPES = frozenset(DTYPES.values())
# Errors that say nothing about whether this client can share memory with the
# server (it was unreachable, busy or full): never a reason to stop trying.
_TRANSIENT = (Cancelled, DeadlineExceeded, ResourceExhausted, Unauthenticated, Unavailable)
_REGISTER = rpc.RPCS["RegisterSharedMemory"]

_T = TypeVar("_T")


class Lease(Protocol):
    """What keeps a region registered: its ``RegisterSharedMemory`` call."""

    def cancel(self) -> bool: ...
    def done(self) -> bool: ...


@dataclass(frozen=True)
class SharedMemoryInfo:
    """Whether and how a server shares memory (``GetServerInfo``)."""

    enabled: bool
    directory: str
    """Where region files must be (``/dev/shm``)."""
    key_prefix: str
    """How their names must start (``distill-``)."""
    max_bytes: int
    """The most bytes all registered regions may hold together."""
    max_regions: int
    """The most regions registered at once."""
    socket: str = ""
    """The server's socket for sealed memory files; empty when it takes none."""

    @classmethod
    def from_proto(cls, message: pb.SharedMemoryInfo) -> SharedMemoryInfo:
        """The description a SharedMemoryInfo message holds."""
        return cls(
            message.enabled,
            message.directory,
            message.key_prefix,
            message.max_bytes,
            message.max_regions,
            message.socket,
        )


class Region(mmap.mmap):
    """A registered shared-memory region: a writable mapping of its file,
    the server's handle for it and the lease that keeps it registered.

    The lease is cancelled by :meth:`free`, or when the region is
    garbage-collected (arrays viewing it keep it alive).
    """

    handle: str
    address: int
    """Where the mapping starts in this process's memory."""
    _lease: Lease
    _release: weakref.finalize[[], Region]

    @classmethod
    def open(cls, fd: int, size: int, handle: str, lease: Lease) -> Region:
        """Map ``size`` bytes of ``fd`` (``-1``: anonymous memory) as the region ``handle``."""
        region = cls(fd, size)  # the mapping holds a descriptor of its own
        region.handle = handle
        region.address = np.frombuffer(region, np.uint8, count=1).ctypes.data
        region._lease = lease
        # Not at exit: the process's connections close then, which releases it anyway.
        region._release = weakref.finalize(region, lease.cancel)
        region._release.atexit = False
        return region

    @property
    def alive(self) -> bool:
        """Whether the server still holds the region (its lease is open)."""
        return self._release.alive and not self._lease.done()

    def array(self, shape: tuple[int, ...], dtype: np.dtype[Any], offset: int) -> npt.NDArray[Any]:
        """An array viewing the region from ``offset``.

        It holds a buffer export of the mapping (``np.frombuffer`` does;
        ``np.ndarray(buffer=...)`` would not), so the mapping cannot be
        unmapped under it: :meth:`free` then leaves that to the collector.
        """
        return np.frombuffer(self, dtype, count=math.prod(shape), offset=offset).reshape(shape)

    def ref(self, offset: int, byte_size: int) -> pb.SharedMemoryRef:
        """A range of this region, for a request."""
        return pb.SharedMemoryRef(region=self.handle, offset=offset, byte_size=byte_size)

    def release(self) -> None:
        """End the lease (idempotent): the server releases the region."""
        self._release()

    def free(self) -> None:
        """Release the region and unmap it; arrays still viewing it keep
        the mapping until they are garbage-collected."""
        self.release()
        try:
            self.close()
        except BufferError:  # exported to live arrays: unmapped when they go
            pass


def create_region(
    directory: str, key_prefix: str, size: int, register: Callable[[str, int], tuple[str, Lease]]
) -> Region:
    """Create a ``size``-byte file in ``directory``, register it as
    ``register(key, size) -> (handle, lease)`` and map it; its name is
    removed in any case before this returns.

    Raises:
        ResourceExhausted: the directory has no room for ``size`` bytes.
        SharedMemoryDisabled: the file cannot be created there.
        DistillError: the registration's error.
    """
    key = key_prefix + secrets.token_hex(16)
    path = os.path.join(directory, key)
    try:
        # O_EXCL and O_NOFOLLOW: never someone else's file or a link planted at that name.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SharedMemoryDisabled(f"cannot create a shared-memory file in {directory}: {exc}") from exc
    try:
        os.fchmod(fd, 0o600)  # whatever the umask: the server accepts exactly this
        os.ftruncate(fd, size)
        if hasattr(os, "posix_fallocate"):
            # Reserve the pages now: on a full tmpfs a write to the mapping would be SIGBUS.
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        return _registered(fd, size, key, register)
    except OSError as exc:
        raise _setup_error(exc, size, f"a shared-memory file in {directory}") from exc
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the server holds its descriptor by now, or never will


def create_sealed_region(socket_path: str, size: int, register: Callable[[str, int], tuple[str, Lease]]) -> Region:
    """Create a ``size``-byte memory file, seal it against shrinking and
    growing, hand it to the server's socket and register the ticket it
    answers as ``register(ticket, size) -> (handle, lease)``; the region,
    mapped. The server then uses tensors in place, with no copy.

    Raises:
        ResourceExhausted: no memory for ``size`` bytes.
        SharedMemoryDisabled: the socket refused the file or cannot be reached.
        DistillError: the registration's error.
    """
    fd = os.memfd_create("distill", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)  # the pages now: a full memory is ENOSPC here, not SIGBUS later
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(10)
            connection.connect(socket_path)
            socket.send_fds(connection, [b"\0"], [fd])
            answer = connection.makefile("r", encoding="ascii", errors="replace").readline(256).strip()
        if not re.fullmatch(r"[0-9a-f]{32}", answer):
            raise SharedMemoryDisabled(f"the server's socket {socket_path} refused the memory file: {answer!r}")
        return _registered(fd, size, answer, register)
    except OSError as exc:
        raise _setup_error(exc, size, f"a memory file for the server's socket {socket_path}") from exc
    finally:
        os.close(fd)


def _registered(fd: int, size: int, name: str, register: Callable[[str, int], tuple[str, Lease]]) -> Region:
    """Register ``name`` and map ``fd`` as that region (the lease ended if mapping fails)."""
    handle, lease = register(name, size)
    try:
        return Region.open(fd, size, handle, lease)
    except BaseException:
        lease.cancel()
        raise


def _setup_error(exc: OSError, size: int, what: str) -> DistillError:
    """What an OSError setting up a region means for the caller."""
    if exc.errno in (errno.ENOSPC, errno.ENOMEM):
        return ResourceExhausted(f"no room for a {size}-byte region, {what}: {exc}")
    return SharedMemoryDisabled(f"cannot set up {what}: {exc}")


def region_size(nbytes: int, max_bytes: int = 0) -> int:
    """The size of a pooled region for ``nbytes``: at least
    :data:`MIN_REGION_BYTES`, rounded up to a quarter of a power of two (1,
    1.25, 1.5, 1.75, 2, 2.5 ... MiB: a training loop's slightly varying
    calls share regions, and at most a fifth of one is slack); just
    ``nbytes`` where that would pass the server's ``max_bytes`` (> 0) for
    all its regions together."""
    step = max(MIN_REGION_BYTES // 4, 1 << max(nbytes.bit_length() - 3, 0))
    size = max(MIN_REGION_BYTES, -(-nbytes // step) * step)
    return max(nbytes, 1) if 0 < max_bytes < size else size


def layout(sizes: Iterable[int]) -> tuple[list[int], int]:
    """Offsets of ranges of ``sizes`` bytes placed one after the other, each
    at a multiple of :data:`ALIGNMENT`; and the bytes they span."""
    offsets = []
    end = 0
    for size in sizes:
        start = -(-end // ALIGNMENT) * ALIGNMENT
        offsets.append(start)
        end = start + size
    return offsets, end


def shared_range(array: npt.NDArray[Any], regions: Iterable[Region]) -> tuple[Region, int] | None:
    """The region among ``regions`` that ``array``'s elements lie in and their
    offset there, when the server can read them as they are: C order,
    little-endian, a wire dtype, not empty. None otherwise."""
    if array.size == 0 or array.dtype not in _SHM_DTYPES or not array.flags.c_contiguous:
        return None
    start = array.ctypes.data
    for region in regions:
        if region.address <= start and start + array.nbytes <= region.address + len(region):
            return region, start - region.address
    return None


class RegionPool:
    """Registered regions reused across calls; thread-safe.

    :meth:`acquire` gives a region to one call, :meth:`release` takes it back;
    at most ``idle`` idle regions stay registered.
    """

    def __init__(self, create: Callable[[int], Region], *, max_bytes: int = 0, idle: int = IDLE_REGIONS) -> None:
        self._create = create
        self._max_bytes = max_bytes
        self._idle_most = idle
        self._lock = threading.Lock()
        self._idle: list[Region] = []
        self._all: weakref.WeakSet[Region] = weakref.WeakSet()
        self._closed = False

    def acquire(self, nbytes: int) -> Region:
        """An idle region of at least ``nbytes`` (the smallest), else a new one.

        Raises:
            Cancelled: the pool is closed (its client is).
        """
        with self._lock:
            if self._closed:
                raise Cancelled("the client is closed")
            dead = [region for region in self._idle if not region.alive]  # e.g. the server restarted
            fits = [region for region in self._idle if region.alive and len(region) >= nbytes]
            chosen = min(fits, key=len) if fits else None
            self._idle = [region for region in self._idle if region.alive and region is not chosen]
        for region in dead:
            region.free()
        if chosen is not None:
            return chosen
        region = self._create(region_size(nbytes, self._max_bytes))  # unlocked: it is a call
        with self._lock:
            self._all.add(region)
        return region

    def release(self, region: Region) -> None:
        """Give a region back after its call; the smallest idle one goes over the limit."""
        evicted = [region]
        with self._lock:
            if not self._closed and region.alive:
                self._idle.append(region)
                self._idle.sort(key=len, reverse=True)
                evicted = self._idle[self._idle_most :]
                del self._idle[self._idle_most :]
        for stale in evicted:
            stale.free()

    def close(self) -> None:
        """Release every region, in use or not (calls still using one then fail)."""
        with self._lock:
            self._closed = True
            regions = list(self._all)
            self._idle = []
        for region in regions:
            region.free()


class _Gradient(NamedTuple):
    """Where one layer's gradient is to be written, and as what."""

    code: pb.Dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class Batch(Closing):
    """One call's tensors as they go out: arrays (inline bytes) or Tensor
    messages referencing shared memory, the gradient outputs, and the
    region holding them, given back to the pool by :meth:`close`."""

    def __init__(
        self,
        teachers: list[Any],
        students: list[Any],
        gradient_outputs: Sequence[pb.SharedMemoryRef] = (),
        gradients: Sequence[_Gradient] = (),
        region: Region | None = None,
        pool: RegionPool | None = None,
    ) -> None:
        self.teachers = teachers
        self.students = students
        self.gradient_outputs = list(gradient_outputs)
        """For the request's ``gradient_outputs`` (or ``gradient_output``): empty when inline."""
        self.gradient_cuda_outputs: list[pb.CudaIpcRef] = []
        """For the request's ``gradient_cuda_outputs`` (or ``gradient_cuda_output``): see
        :class:`distill_client.cuda_ipc.CudaBatch`."""
        self._gradients = list(gradients)
        self._region = region
        self._pool = pool

    @property
    def shared(self) -> bool:
        """Whether anything of this call is in shared memory."""
        return any(isinstance(t, pb.Tensor) for t in (*self.teachers, *self.students)) or self._region is not None

    def layers(self, messages: Sequence[pb.LayerLoss]) -> list[LayerLoss]:
        """The results of a response's LayerLoss messages (in layer order),
        gradients written to shared memory read out as new arrays."""
        results = []
        for position, message in enumerate(messages):
            gradient = message.student_gradient
            if message.HasField("student_gradient") and gradient.HasField("shared_memory"):
                array = self._read(position, gradient.shared_memory)
                results.append(LayerLoss(message.layer_index, message.name, message.loss, message.weighted_loss, array))
            else:
                results.append(LayerLoss.from_proto(message))
        return results

    def _read(self, position: int, ref: pb.SharedMemoryRef) -> npt.NDArray[Any]:
        region = self._region
        spec = self._gradients[position] if position < len(self._gradients) else None
        if region is None or spec is None or ref != region.ref(spec.offset, spec.nbytes):
            raise Internal(f"the server returned layer {position}'s gradient in a range this call did not give it")
        # One copy: the region goes back to the pool, the caller keeps the array.
        try:
            return region.array(spec.shape, DTYPES[spec.code], spec.offset).copy()
        except ValueError:  # unmapped: the client was closed during the call
            raise Cancelled("the client was closed during the call") from None

    def close(self) -> None:
        """Give the region back (idempotent)."""
        region, self._region = self._region, None
        if region is not None and self._pool is not None:
            self._pool.release(region)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None and self._region is not None:
            # The server may still be reading or writing the region of a call
            # that failed here (cancelled, past its deadline): never reuse it.
            region, self._region = self._region, None
            region.free()
        self.close()


class SharedMemory:
    """The shared-memory side of one :class:`~distill_client.DistillClient`.

    ``transport`` is the client's: ``"grpc"`` (and ``"cuda_ipc"``, which
    sends CUDA memory by handle instead) never shares memory; ``"shm"``
    sends every call's tensors through it or raises
    :class:`~distill_core.errors.SharedMemoryDisabled`; ``"auto"`` finds out
    at the first call that would use it (from :data:`SHM_THRESHOLD_BYTES`
    copied), once, and otherwise sends bytes.

    Args:
        transport: ``"auto"``, ``"shm"``, ``"grpc"`` or ``"cuda_ipc"``.
        channel: The client's channel, for ``RegisterSharedMemory``.
        metadata: The client's call metadata (its bearer token).
        timeout: How long a registration may take to answer.
        server_info: The server's shared-memory description (``GetServerInfo``).
        target: The server, for messages.
    """

    def __init__(
        self,
        transport: Transport,
        channel: grpc.Channel,
        metadata: Sequence[tuple[str, str]] | None,
        timeout: float | None,
        server_info: Callable[[], SharedMemoryInfo | None],
        target: str,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport is {transport!r}; expected one of {', '.join(map(repr, TRANSPORTS))}")
        self.transport = transport
        self._register_call = channel.unary_stream(_REGISTER.path, response_deserializer=_REGISTER.response.FromString)
        self._metadata = metadata
        self._timeout = timeout
        self._server_info = server_info
        self._target = target
        self._lock = threading.Lock()  # the state below
        self._probing = threading.Lock()
        self._info: SharedMemoryInfo | None = None
        self._pool: RegionPool | None = None
        self._disabled: str | None = f"transport={transport!r}" if transport in ("grpc", "cuda_ipc") else None
        self._closed = False
        self._shared: weakref.WeakSet[Region] = weakref.WeakSet()

    # -- availability -------------------------------------------------------

    def _register(self, key: str, size: int) -> tuple[str, Lease]:
        """Register the file ``key``; its handle and lease (the open call)."""
        return self._lease(pb.RegisterSharedMemoryRequest(system=pb.SystemSharedMemory(key=key, byte_size=size)))

    def _register_sealed(self, ticket: str, size: int) -> tuple[str, Lease]:
        """Register the sealed file the server's socket gave ``ticket`` for."""
        return self._lease(pb.RegisterSharedMemoryRequest(sealed=pb.SealedSharedMemory(ticket=ticket, byte_size=size)))

    def _lease(self, request: pb.RegisterSharedMemoryRequest) -> tuple[str, Lease]:
        """Make the registration call; the region's handle and the call, its lease."""
        # No deadline: it would end the lease. The wait for the handle is bounded by a timer instead.
        call = self._register_call(request.SerializeToString(), metadata=self._metadata)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            call.cancel()

        timer = threading.Timer(self._timeout, expire) if self._timeout is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            response: pb.RegisterSharedMemoryResponse = next(call)
        except grpc.RpcError as exc:
            if expired.is_set():
                raise DeadlineExceeded(f"RegisterSharedMemory did not answer within {self._timeout:g} s") from exc
            raise from_rpc_error(exc) from exc
        except StopIteration:
            raise Internal("RegisterSharedMemory ended without a region handle") from None
        finally:
            if timer is not None:
                timer.cancel()
        return response.region, call

    def _new_region(self, size: int) -> Region:
        """A region: a sealed memory file, used in place by the server, where
        it takes them (Linux); else a file in its directory."""
        info = self._info
        assert info is not None
        if info.socket and hasattr(os, "memfd_create") and os.path.exists(info.socket):
            return create_sealed_region(info.socket, size, self._register_sealed)
        return create_region(info.directory, info.key_prefix, size, self._register)

    def _probe(self) -> SharedMemoryInfo:
        info = self._server_info()
        if info is None or not info.enabled:
            raise SharedMemoryDisabled("the server shares no memory (its shared_memory.enabled is false)")
        if not os.path.isdir(info.directory):
            raise SharedMemoryDisabled(
                f"the server's shared-memory directory {info.directory} is not on this host "
                "(is the server on another host or in another container?)"
            )
        return info

    def _attempt(self, action: Callable[[], _T]) -> _T | None:
        """``action()``; or, where it fails and this call can go without
        shared memory (``auto``), None. Errors that show this client cannot
        share memory with the server turn shared memory off for good."""
        try:
            return action()
        except _TRANSIENT as exc:
            if self.transport == "shm":
                raise
            log.debug("%s: this call goes without shared memory: %s", self._target, exc)
            return None
        except DistillError as exc:
            self._disable(str(exc))
            if self.transport == "shm":
                raise self._refusal() from exc
            return None

    def _disable(self, reason: str) -> None:
        """Turn shared memory off for this client, and release the pool."""
        with self._lock:
            self._disabled = self._disabled or reason
            pool, self._pool = self._pool, None
        log.debug("%s: shared memory off for this client: %s", self._target, reason)
        if pool is not None:
            pool.close()

    def _refusal(self) -> SharedMemoryDisabled:
        return SharedMemoryDisabled(
            f"transport='shm': no shared memory with {self._target}: {self._disabled}; "
            "transport='grpc' (or 'auto') sends the tensors as bytes instead"
        )

    def _ready(self) -> RegionPool | None:
        """The pool, after finding out once whether shared memory works with
        the server; None where it does not and the call may go inline."""
        with self._probing:  # one probe: concurrent first calls wait for its answer
            if self._pool is None and self._disabled is None and not self._closed:
                info = self._attempt(self._probe)
                if info is not None:
                    with self._lock:
                        self._info = info
                        self._pool = RegionPool(self._new_region, max_bytes=info.max_bytes)
        with self._lock:
            pool, disabled, closed = self._pool, self._disabled, self._closed
        if closed:
            return None  # the channel says the rest
        if disabled is not None:
            if self.transport == "shm":
                raise self._refusal()
            return None
        return pool

    # -- calls --------------------------------------------------------------

    def batch(self, teachers: Sequence[Any], students: Sequence[Any], gradients: bool) -> Batch:
        """A call's tensors laid out for the wire (see the class).

        Tensors lying in a region of :meth:`shared_arrays` go as references
        to it; the others are copied into a pooled region (with ``shm``, or
        with ``auto`` from :data:`SHM_THRESHOLD_BYTES`) together with the
        gradient outputs, or go inline.
        """
        if self.transport in ("grpc", "cuda_ipc"):
            return Batch(list(teachers), list(students))
        wired = [to_wire(value) for value in (*teachers, *students)]
        with self._lock:
            shared = [region for region in self._shared if region.alive] if self._disabled is None else []
        items: list[Any] = []
        copies: list[int] = []
        for position, (code, array) in enumerate(wired):
            found = shared_range(array, shared)
            if found is None:
                items.append(array)
                copies.append(position)
            else:
                home, offset = found
                items.append(pb.Tensor(dtype=code, shape=array.shape, shared_memory=home.ref(offset, array.nbytes)))
        students_wired = wired[len(teachers) :]
        # What would be copied into a region: the other tensors, and the gradients.
        sizes = [wired[i][1].nbytes for i in copies] + [a.nbytes for _, a in students_wired if gradients]
        inline = Batch(items[: len(teachers)], items[len(teachers) :])
        if not sizes or (self.transport == "auto" and sum(sizes) < SHM_THRESHOLD_BYTES):
            return inline
        pool = self._ready()
        offsets, total = layout(sizes)
        region = None if pool is None else self._attempt(lambda: pool.acquire(total))
        if pool is None or region is None:
            return inline
        try:
            for position, offset in zip(copies, offsets, strict=False):
                code, array = wired[position]
                np.copyto(region.array(array.shape, array.dtype, offset), array)
                ref = region.ref(offset, array.nbytes)
                items[position] = pb.Tensor(dtype=code, shape=array.shape, shared_memory=ref)
            outputs = []
            specs = []
            if gradients:
                for (code, array), offset in zip(students_wired, offsets[len(copies) :], strict=True):
                    outputs.append(region.ref(offset, array.nbytes))
                    specs.append(_Gradient(code, array.shape, offset, array.nbytes))
        except BaseException:
            pool.release(region)
            raise
        return Batch(items[: len(teachers)], items[len(teachers) :], outputs, specs, region, pool)

    def exchange(
        self, teachers: Sequence[Any], students: Sequence[Any], gradients: bool, send: Callable[[Batch], _T]
    ) -> _T:
        """``send(batch)`` for a call's tensors, the region given back after.

        With ``auto``, a call whose shared memory the server does not know
        (:class:`~distill_core.errors.RegionNotFound`: it went to another
        replica than the one holding the region) is sent again inline, and
        shared memory is off for this client from then on.
        """
        with self.batch(teachers, students, gradients) as batch:
            try:
                return send(batch)
            except RegionNotFound as exc:
                if self.transport != "auto" or not batch.shared:
                    raise
                self._disable(f"a call through shared memory failed: {exc}")
        with self.batch(teachers, students, gradients) as batch:  # inline now
            return send(batch)

    # -- zero copy ----------------------------------------------------------

    def shared_arrays(self, shapes: Sequence[int | Sequence[int]], dtype: npt.DTypeLike) -> list[npt.NDArray[Any]]:
        """Zeroed arrays in a region of their own (see
        :meth:`~distill_client.DistillClient.shared_arrays`)."""
        wanted = np.dtype(dtype)
        if wanted not in _SHM_DTYPES:
            raise ValueError(f"dtype {wanted} cannot be shared: use float32, float16, bfloat16 or float64")
        dims = [(shape,) if isinstance(shape, int) else tuple(shape) for shape in shapes]
        if any(size < 0 for shape in dims for size in shape):
            raise ValueError(f"shapes {dims} have a negative dimension")
        sizes = [math.prod(shape) * wanted.itemsize for shape in dims]
        offsets, total = layout(sizes)
        region = self._attempt(lambda: self._new_region(max(total, 1))) if self._ready() is not None else None
        if region is None:
            return [np.zeros(shape, wanted) for shape in dims]
        with self._lock:
            self._shared.add(region)
        # Each array holds the region: it stays registered while any of them is alive.
        return [region.array(shape, wanted, at) for shape, at in zip(dims, offsets, strict=True)]

    def close(self) -> None:
        """Release every region (idempotent); arrays of :meth:`shared_arrays`
        stay usable, as ordinary memory."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            shared = list(self._shared)
            self._shared = weakref.WeakSet()
        if pool is not None:
            pool.close()
        for region in shared:
            region.release()
