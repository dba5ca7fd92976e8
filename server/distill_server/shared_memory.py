"""Shared-memory regions that clients on this host register, so that their
tensors and gradients need not cross a socket.

A region is one of two kinds:

- **sealed**: a memory file (``memfd_create``) the client sealed against
  shrinking (``F_SEAL_SHRINK``) and handed to the server's Unix socket
  (:class:`SealedSocket`, descriptor passing), which answers a ticket the
  client then registers. The server maps it and uses tensors in place: no
  copy. The seal is what makes that safe: a file that cannot shrink cannot
  take pages from under the mapping, so no SIGBUS. The socket takes only
  clients of the server's own user (``SO_PEERCRED``).
- **system**: a file a client created in the shared-memory directory
  (/dev/shm), for clients that cannot pass descriptors. Such a file can be
  truncated at any time, so the server never maps it: it opens it once, at
  registration, and reads and writes it through that descriptor with
  ``pread``/``pwrite`` only (one copy each way):

- it never maps a client's file, so a client that truncates its file
  mid-call cannot raise SIGBUS in the server: a short read is an error
  (REGION_TRUNCATED) for that call alone;
- the client may remove the name at once (the descriptor keeps the memory),
  so nothing is left behind when either side dies;
- only a name with the fixed prefix, directly in the directory, opened
  without following a symlink (``O_NOFOLLOW``) and without blocking (a FIFO
  cannot stall the event loop), a regular file owned by the server's user
  and closed to every other user (mode 0600), is accepted: a client cannot
  make the server open anything else, the server's own files included;
- regions are named to clients by a random handle, never by another
  client's key, and are bounded in number and bytes.

A region lives while its ``RegisterSharedMemory`` call is open (the
servicer releases it when that call ends); calls reading or writing it hold
it, so its descriptor is closed only once they are done.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import math
import mmap
import os
import re
import secrets
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.v1 import distill_pb2 as pb
from distill_core.errors import (
    InvalidArgument,
    LimitExceeded,
    RegionNotFound,
    RegionOutOfBounds,
    RegionRefused,
    RegionTruncated,
    SharedMemoryDisabled,
)

__all__ = ["KEY_PREFIX", "SOCKET_PREFIX", "Region", "Regions", "SealedSocket"]

log = logging.getLogger(__name__)

KEY_PREFIX = "distill-"
_KEY = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_.-]{1,200}")
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(eq=False)
class Region:
    """A registered file: its handle, key, size, and its descriptor (system)
    or mapping (sealed)."""

    handle: str
    key: str
    byte_size: int
    fd: int
    mapping: mmap.mmap | None = None
    users: int = 0
    released: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _close_if_done(self) -> None:
        if self.released and self.users == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Regions:
    """The regions registered with one server, and their limits.

    ``register`` and ``release`` run on the event loop; ``read`` and
    ``write`` may run in worker threads.
    """

    def __init__(
        self, directory: Path | None, max_bytes: int, max_regions: int, sealed: SealedSocket | None = None
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_regions = max_regions
        self.sealed = sealed
        self._regions: dict[str, Region] = {}
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        """Whether regions can be registered at all."""
        return self.directory is not None and self.max_bytes > 0 and self.max_regions > 0

    def info(self) -> pb.SharedMemoryInfo:
        """What GetServerInfo says of shared memory."""
        if not self.enabled:
            return pb.SharedMemoryInfo(enabled=False)
        return pb.SharedMemoryInfo(
            enabled=True,
            directory=str(self.directory),
            key_prefix=KEY_PREFIX,
            max_bytes=self.max_bytes,
            max_regions=self.max_regions,
            socket=str(self.sealed.path) if self.sealed is not None else "",
        )

    @property
    def registered_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._regions)

    def register(self, request: pb.RegisterSharedMemoryRequest) -> Region:
        """Open and check the file a registration names; the new region.

        Raises:
            SharedMemoryDisabled, InvalidArgument, RegionNotFound,
            RegionRefused, RegionOutOfBounds, LimitExceeded: see the proto's
            RegisterSharedMemory.
        """
        if not self.enabled or self.directory is None:
            raise SharedMemoryDisabled(
                "this server shares no memory (--max-shared-memory-mb 0 or no --shared-memory-dir); send tensors inline"
            )
        kind = request.WhichOneof("memory")
        if kind is None:
            raise InvalidArgument("the registration names no memory; set system or sealed", field="memory")
        if kind == "system":
            key, size = request.system.key, request.system.byte_size
            if not _KEY.fullmatch(key):
                raise InvalidArgument(
                    f"system.key must be {KEY_PREFIX!r} followed by 1 to 200 of [A-Za-z0-9_.-]; got {key[:64]!r}",
                    field="system.key",
                )
        else:
            key, size = "", request.sealed.byte_size
        if size <= 0:
            raise InvalidArgument(f"{kind}.byte_size is {size}; expected > 0", field=f"{kind}.byte_size")
        if len(self._regions) >= self.max_regions:
            raise LimitExceeded(
                f"this server holds its limit of {self.max_regions} shared-memory regions "
                "(--max-shared-memory-regions); unregister some",
                limit=self.max_regions,
                got=len(self._regions) + 1,
            )
        if self._bytes + size > self.max_bytes:
            raise LimitExceeded(
                f"registering {size} bytes would make {self._bytes + size}; this server takes at most "
                f"{self.max_bytes} bytes of shared memory (--max-shared-memory-mb)",
                field="system.byte_size",
                limit=self.max_bytes,
                got=self._bytes + size,
            )
        if kind == "system":
            region = Region(secrets.token_hex(16), key, size, self._open(key, size))
        else:
            region = Region(secrets.token_hex(16), "", size, -1, self._map(request.sealed.ticket, size))
        self._regions[region.handle] = region
        self._bytes += size
        return region

    def _open(self, key: str, size: int) -> int:
        where = f"{key!r} in {self.directory}"
        try:
            fd = os.open(Path(self.directory or "") / key, _OPEN_FLAGS)
        except FileNotFoundError:
            raise RegionNotFound(f"no file {where}", field="system.key") from None
        except OSError as exc:  # ELOOP: a symlink (O_NOFOLLOW); EACCES; ENXIO: a FIFO without a writer
            raise RegionRefused(f"{where} cannot be opened: {exc.strerror}", field="system.key") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RegionRefused(f"{where} is not a regular file", field="system.key")
            if info.st_uid != os.geteuid():
                raise RegionRefused(f"{where} is not owned by the server's user", field="system.key")
            if info.st_mode & 0o077:
                raise RegionRefused(
                    f"{where} is open to other users (mode {stat.S_IMODE(info.st_mode):o}); create it with mode 600",
                    field="system.key",
                )
            if info.st_size < size:
                raise RegionOutOfBounds(
                    f"{where} holds {info.st_size} bytes; the region needs {size}", field="system.byte_size"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _map(self, ticket: str, size: int) -> mmap.mmap:
        fd = self.sealed.take(ticket) if self.sealed is not None else None
        if fd is None:
            raise RegionNotFound(
                "sealed.ticket: no memory file was handed over with this ticket", field="sealed.ticket"
            )
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RegionRefused("the file handed over is not a regular file", field="sealed.ticket")
            if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
                raise RegionRefused(
                    "the file handed over is not sealed against shrinking (F_SEAL_SHRINK)", field="sealed.ticket"
                )
            if info.st_size < size:
                raise RegionOutOfBounds(
                    f"the file handed over holds {info.st_size} bytes; the region needs {size}",
                    field="sealed.byte_size",
                )
            return mmap.mmap(fd, size)
        except OSError as exc:  # F_GET_SEALS on a file that is not a memfd: EINVAL
            raise RegionRefused(f"the file handed over cannot be used: {exc.strerror}", field="sealed.ticket") from None
        finally:
            os.close(fd)  # the mapping keeps the memory

    def release(self, region: Region) -> None:
        """Forget ``region``; its descriptor is closed once no call uses it."""
        if self._regions.pop(region.handle, None) is region:
            self._bytes -= region.byte_size
        with region.lock:
            region.released = True
            region.mapping = None  # views still in use keep the mapping; it goes with the last one
            region._close_if_done()

    def get(self, handle: str, field: str = "region") -> Region:
        """The region of ``handle``.

        Raises:
            RegionNotFound: no region of this server has that handle.
        """
        region = self._regions.get(handle)
        if region is None:
            raise RegionNotFound(f"{field}: no shared-memory region registered with this handle", field=field)
        return region

    def status(self, handles: list[str]) -> pb.GetSharedMemoryStatusResponse:
        """The regions of ``handles``, in order."""
        return pb.GetSharedMemoryStatusResponse(
            regions=[
                pb.SharedMemoryRegionStatus(
                    region=region.handle, key=region.key, byte_size=region.byte_size, calls_in_flight=region.users
                )
                for region in (self.get(handle, f"regions[{i}]") for i, handle in enumerate(handles))
            ]
        )

    @contextlib.contextmanager
    def _using(self, ref: pb.SharedMemoryRef, field: str) -> Iterator[Region]:
        """The region of ``ref``, its range checked, held open for the block."""
        region = self.get(ref.region, f"{field}.region")
        end = ref.offset + ref.byte_size  # Python integers: no overflow to check
        if end > region.byte_size:
            raise RegionOutOfBounds(
                f"{field}: bytes {ref.offset} to {end} are outside the region's {region.byte_size}",
                field=field,
            )
        with region.lock:
            if region.released:
                raise RegionNotFound(f"{field}.region: the region was unregistered", field=f"{field}.region")
            region.users += 1
        try:
            yield region
        finally:
            with region.lock:
                region.users -= 1
                region._close_if_done()

    def read(self, ref: pb.SharedMemoryRef, field: str) -> memoryview:
        """The bytes of ``ref``, copied out of the region (one ``pread``).

        Raises:
            RegionNotFound, RegionOutOfBounds: an unknown handle or a range
                outside the region.
            RegionTruncated: the file is shorter than the range now.
        """
        with self._using(ref, field) as region:
            if region.mapping is not None:  # sealed: the range in place, which nothing here may write
                return memoryview(region.mapping).toreadonly()[ref.offset : ref.offset + ref.byte_size]
            data = np.empty(ref.byte_size, np.uint8).data  # no zero-filling pass
            done = 0
            while done < ref.byte_size:
                count = os.preadv(region.fd, [data[done:]], ref.offset + done)
                if count == 0:
                    raise RegionTruncated(
                        f"{field}: the region's file ends before byte {ref.offset + ref.byte_size}; it was cut "
                        "shorter after it was registered",
                        field=field,
                    )
                done += count
            return data

    def array(self, ref: pb.SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...], field: str) -> Any:
        """A writable array on ``ref`` where its region is mapped (sealed), so
        that a gradient is computed straight into it; None for a region read
        and written by descriptor (then :meth:`write` copies it there).

        Raises:
            InvalidArgument: ``ref.byte_size`` differs from the array's size.
            RegionNotFound, RegionOutOfBounds: as :meth:`read`.
        """
        nbytes = math.prod(shape) * dtype.itemsize
        if ref.byte_size != nbytes:
            raise InvalidArgument(
                f"{field}.byte_size is {ref.byte_size}; the gradient needs {nbytes} bytes", field=f"{field}.byte_size"
            )
        with self._using(ref, field) as region:
            if region.mapping is None:
                return None
            return np.frombuffer(region.mapping, dtype, math.prod(shape), ref.offset).reshape(shape)

    def write(self, ref: pb.SharedMemoryRef, data: memoryview, field: str) -> None:
        """Write ``data`` at ``ref`` (the sizes must agree).

        Raises:
            InvalidArgument: ``ref.byte_size`` differs from the data's size.
            RegionNotFound, RegionOutOfBounds, RegionTruncated: as :meth:`read`.
        """
        if ref.byte_size != data.nbytes:
            raise InvalidArgument(
                f"{field}.byte_size is {ref.byte_size}; the gradient needs {data.nbytes} bytes",
                field=f"{field}.byte_size",
            )
        with self._using(ref, field) as region:
            if region.mapping is not None:
                memoryview(region.mapping)[ref.offset : ref.offset + ref.byte_size] = data.cast("B")
                return
            if os.fstat(region.fd).st_size < ref.offset + ref.byte_size:  # pwrite would grow the file instead
                raise RegionTruncated(
                    f"{field}: the region's file ends before byte {ref.offset + ref.byte_size}; it was cut "
                    "shorter after it was registered",
                    field=field,
                )
            done = 0
            flat = data.cast("B")
            while done < flat.nbytes:
                done += os.pwritev(region.fd, [flat[done:]], ref.offset + done)


SOCKET_PREFIX = "distill-server-"


def _remove_dead_sockets(directory: Path) -> None:
    """Remove the sockets of servers that died without removing their own
    (killed): nothing answers at them any more."""
    for path in directory.glob(SOCKET_PREFIX + "*.sock"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            except OSError:  # another user's, or not a socket: not ours to judge
                pass


class SealedSocket:
    """The Unix socket that takes sealed memory files from clients of the
    server's user and answers each with a ticket for RegisterSharedMemory.

    One thread accepts; at most ``handlers`` connections are served at once,
    each within ``timeout`` seconds (one more is told the socket is busy), so
    clients that connect and say nothing cannot lock the others out. At
    most ``most`` files wait for their registration, each for at most
    ``hold`` seconds.
    """

    def __init__(self, path: Path, most: int, hold: float, timeout: float = 2.0, handlers: int = 4) -> None:
        self.path = path
        self._most, self._hold, self._timeout = most, hold, timeout
        self._handlers = threading.BoundedSemaphore(handlers)
        self._pending: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        _remove_dead_sockets(path.parent)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file: mode 0600 from its creation
        try:
            self._socket.bind(str(path))
        finally:
            os.umask(old)
        self._socket.listen(16)
        self._socket.settimeout(0.5)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="distill-sealed-socket", daemon=True)
        self._thread.start()

    def take(self, ticket: str) -> int | None:
        """The descriptor handed over with ``ticket`` (once), or None."""
        with self._lock:
            self._expire(time.monotonic())
            entry = self._pending.pop(ticket, None)
        return None if entry is None else entry[0]

    def close(self) -> None:
        """Stop serving, remove the socket file and close what is pending."""
        self._closing.set()
        self._thread.join(5)
        self._socket.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with self._lock:
            for fd, _ in self._pending.values():
                os.close(fd)
            self._pending.clear()

    def _expire(self, now: float) -> None:
        for ticket in [t for t, (_, deadline) in self._pending.items() if deadline < now]:
            os.close(self._pending.pop(ticket)[0])

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._handlers.acquire(blocking=False):
                with connection, contextlib.suppress(OSError):
                    connection.sendall(b"error: the socket is busy; retry\n")
                continue
            threading.Thread(target=self._handle, args=(connection,), name="distill-sealed-handler").start()

    def _handle(self, connection: socket.socket) -> None:
        try:
            with connection:
                connection.settimeout(self._timeout)
                connection.sendall(self._answer(connection).encode() + b"\n")
        except OSError as exc:  # the client went away, or took too long
            log.debug("sealed-memory socket: %s", exc)
        finally:
            self._handlers.release()

    def _answer(self, connection: socket.socket) -> str:
        """Receive one descriptor; the ticket for it, or ``error: ...``."""
        _, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        fds = array.array("i")
        _, ancillary, flags, _ = connection.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        received = list(fds)
        if uid != os.geteuid():
            reason = "this socket takes files from the server's own user only"
        elif flags & socket.MSG_CTRUNC or len(received) != 1:
            reason = "send exactly one descriptor with one byte"
        else:
            reason = ""
        if reason:
            for fd in received:
                os.close(fd)
            return f"error: {reason}"
        ticket = secrets.token_hex(16)
        with self._lock:
            self._expire(time.monotonic())
            if len(self._pending) >= self._most:
                os.close(received[0])
                return "error: too many files wait for their registration; register or retry later"
            self._pending[ticket] = (received[0], time.monotonic() + self._hold)
        return ticket
