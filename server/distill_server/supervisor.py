"""``--processes N``: N server processes on one port (SO_REUSEPORT), kept up.

The parent binds nothing it keeps: it checks the address is free, starts the
children (the spawn start method: no gRPC state crosses a fork), and then

- restarts a child that dies on its own, after a delay that doubles from
  :attr:`RestartPolicy.initial_delay` to :attr:`RestartPolicy.max_delay` (back
  to the initial delay once a child stayed up :attr:`RestartPolicy.stable_after`
  seconds), at most :attr:`RestartPolicy.max_restarts` times in
  :attr:`RestartPolicy.window` seconds per child: one more death stops the
  group with that child's status;
- stops the group, without restarts, when a child exits with a status of
  :data:`CANNOT_START` (the server could not start: a restart fails the same way);
- forwards SIGTERM and SIGINT to the children and waits for them to drain.

A child dies with its parent: on Linux the kernel sends it SIGTERM when the
parent dies (``PR_SET_PDEATHSIG``), and on every platform a thread in the
child sends it SIGTERM when the pipe from the parent reads end-of-file.

A busy address is refused before any child starts. Every child sets
SO_REUSEPORT, so it would share the port with any other group's children: the
parent first binds the address without SO_REUSEPORT (with SO_REUSEADDR, as
gRPC does, so connections in TIME_WAIT do not count), which Linux refuses while
any socket listens there, another group's included, and closes it again. The
gap between that check and the children listening is covered by a lock held
for the group's life, an abstract Unix socket named after the address
(Linux): a second group started at the same moment, or while every child
waits to be restarted, finds it taken.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from types import FrameType

from distill_server import __version__
from distill_server.config import ServerConfig, format_address

__all__ = ["CANNOT_START", "RestartPolicy", "RestartSchedule", "Supervisor", "die_with_parent", "supervise"]

log = logging.getLogger(__name__)

#: The exit statuses with which the server refuses to start (see ``cli._run``):
#: 1, it cannot serve on the address (or with the TLS files); 2, it cannot use
#: the device. A child exiting with one of them is not restarted.
CANNOT_START = frozenset({1, 2})

ChildTarget = Callable[[ServerConfig, str, str], object]
"""A child's entry point: ``target(config, log_level, log_format)``, a
module-level function (it is pickled for the spawn start method)."""

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class RestartPolicy:
    """When a child that died on its own is started again (times in seconds)."""

    initial_delay: float = 0.5
    max_delay: float = 30.0
    stable_after: float = 60.0
    max_restarts: int = 5
    window: float = 60.0


def supervise(
    config: ServerConfig,
    count: int,
    level: str,
    form: str,
    *,
    target: ChildTarget,
    policy: RestartPolicy | None = None,
) -> int:
    """Serve ``config`` with ``count`` processes running ``target(config, level,
    form)`` until SIGTERM or SIGINT; returns the exit status. Call it from the
    main thread (it installs signal handlers, restored on return)."""
    return Supervisor(config, count, target, (level, form), policy or RestartPolicy()).run()


def _metrics_port(port: int | None, index: int) -> int | None:
    """Child ``index``'s metrics port: ``port + index``, or a free one for 0."""
    return port if not port else port + index


def _exit_status(code: int | None) -> int:
    """A process's exit status as a shell reports it (128 + N when killed by signal N)."""
    if code is None:
        return 1
    return 128 - code if code < 0 else code


def _describe(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[object, ...]]]:
    """Every address ``host:port`` binds (gRPC binds all of them)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    unique: list[tuple[socket.AddressFamily, tuple[object, ...]]] = []
    for family, _, _, _, sockaddr in infos:
        if (family, sockaddr) not in unique:
            unique.append((family, tuple(sockaddr)))
    return unique


def _address_in_use(detail: str = "") -> OSError:
    return OSError(errno.EADDRINUSE, "address in use" + detail)


def _pick_port(host: str) -> int:
    family, sockaddr = _addresses(host, 0)[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(sockaddr)
        port: int = probe.getsockname()[1]
    return port


def _check_free(host: str, port: int) -> None:
    """Raise EADDRINUSE if anything listens on ``host:port``, a group of
    SO_REUSEPORT listeners included: a socket without SO_REUSEPORT cannot bind
    beside them. Other bind errors are left to the server to report."""
    for family, sockaddr in _addresses(host, port):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise _address_in_use() from exc


def _lock(host: str, port: int) -> socket.socket | None:
    """The group's claim on ``host:port``: an abstract Unix socket (Linux; per
    network namespace, as ports are), released by the kernel when the parent
    dies. None where there is no abstract namespace."""
    if not sys.platform.startswith("linux"):
        return None
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0distill-server {format_address(host, port)}")
    except OSError as exc:
        lock.close()
        if exc.errno == errno.EADDRINUSE:
            raise _address_in_use(" (another distill-server group serves there)") from exc
        raise
    return lock


def _reserve(host: str, port: int) -> tuple[int, socket.socket | None]:
    """The port to serve on (a free one for 0) and the group's lock on it."""
    if port == 0:
        port = _pick_port(host)
    lock = _lock(host, port)
    try:
        _check_free(host, port)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return port, lock


def die_with_parent(parent: int, lifeline: Connection) -> None:
    """In a child: SIGTERM ourselves when the parent dies (PR_SET_PDEATHSIG,
    and end-of-file on ``lifeline``, the pipe from the parent, where that is
    missing)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl: no signal will come
        raise SystemExit(1)

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            lifeline.recv_bytes()  # the parent never sends: this waits for end-of-file
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="distill-parent-watch", daemon=True).start()


def _child_main(
    target: ChildTarget, config: ServerConfig, args: tuple[str, str], parent: int, lifeline: Connection
) -> None:
    die_with_parent(parent, lifeline)
    target(config, *args)


class RestartSchedule:
    """One child's restarts under a :class:`RestartPolicy`: the delay doubles
    from ``initial_delay`` to ``max_delay`` and starts over once a child has
    been up ``stable_after`` seconds; at most ``max_restarts`` in ``window``."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._delay = policy.initial_delay
        self._restarts: deque[float] = deque()

    @property
    def restarts(self) -> int:
        """Restarts planned in the window, as of the last plan."""
        return len(self._restarts)

    def plan(self, now: float, uptime: float) -> float | None:
        """A restart at ``now`` of a child that was up ``uptime`` seconds: its
        delay, or None when the child has used up its restarts in the window."""
        policy = self.policy
        if uptime >= policy.stable_after:
            self._delay = policy.initial_delay
        while self._restarts and now - self._restarts[0] >= policy.window:
            self._restarts.popleft()
        if len(self._restarts) >= policy.max_restarts:
            return None
        self._restarts.append(now)
        delay, self._delay = self._delay, min(self._delay * 2, policy.max_delay)
        return delay


@dataclass
class _Slot:
    """One of the ``count`` children, across its restarts."""

    index: int
    config: ServerConfig
    schedule: RestartSchedule
    process: SpawnProcess | None = None
    lifeline: Connection | None = None  # the parent's end of the child's pipe
    started: float = 0.0
    restart_at: float | None = None

    @property
    def name(self) -> str:
        return f"distill-server-{self.index}"


class Supervisor:
    """``count`` children running ``target(config, *args)`` on one port; see
    the module's documentation. :meth:`run` once, from the main thread."""

    def __init__(
        self,
        config: ServerConfig,
        count: int,
        target: ChildTarget,
        args: tuple[str, str],
        policy: RestartPolicy | None = None,
    ) -> None:
        self.config = config
        self.count = count
        self.target = target
        self.args = args
        self.policy = policy or RestartPolicy()
        self._context = multiprocessing.get_context("spawn")
        self._slots: list[_Slot] = []
        self._stopping = False
        self._failure: int | None = None  # the status the group stops with, after a fatal exit
        self._signalled: set[int] = set()  # pids sent SIGTERM
        self._statuses: list[int] = []  # of the children that exited during the shutdown

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT or a child's fatal exit; the exit status."""
        address = format_address(self.config.host, self.config.port)
        try:
            port, lock = _reserve(self.config.host, self.config.port)
        except OSError as exc:
            log.error("cannot serve on %s: %s", address, exc.strerror or exc)
            return 1
        self._slots = [
            _Slot(
                index=i,
                config=replace(
                    self.config, port=port, reuse_port=True, metrics_port=_metrics_port(self.config.metrics_port, i)
                ),
                schedule=RestartSchedule(self.policy),
            )
            for i in range(self.count)
        ]
        with contextlib.ExitStack() as stack:
            if lock is not None:
                stack.enter_context(lock)
            wake = stack.enter_context(self._signals())
            stack.callback(self._release_all)
            for slot in self._slots:
                self._start(slot)
            log.info(
                "distill-server %s: %d processes on %s", __version__, self.count, format_address(self.config.host, port)
            )
            self._loop(wake)
        if self._failure is not None:
            return self._failure
        return max(self._statuses, default=0)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[socket.socket]:
        """SIGTERM and SIGINT start the shutdown; yields the socket they wake the loop on."""
        reader, writer = socket.socketpair()
        writer.setblocking(False)

        def stop(sig: int, frame: FrameType | None) -> None:
            self._stopping = True
            with contextlib.suppress(OSError):
                writer.send(b"\0")

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield reader
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            reader.close()
            writer.close()

    def _loop(self, wake: socket.socket) -> None:
        while True:
            if self._stopping:
                self._terminate_all()
            else:
                now = time.monotonic()
                for slot in self._slots:
                    if slot.restart_at is not None and slot.restart_at <= now:
                        self._start(slot)
            running = [slot for slot in self._slots if slot.process is not None]
            if self._stopping and not running:
                return
            due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
            timeout = None if self._stopping or not due else max(0.0, min(due) - time.monotonic())
            waitables: list[socket.socket | int] = [wake, *(slot.process.sentinel for slot in running if slot.process)]
            ready = multiprocessing.connection.wait(waitables, timeout)
            if wake in ready:
                with contextlib.suppress(OSError):
                    wake.recv(4096)
            for slot in running:
                if slot.process is not None and not slot.process.is_alive():
                    self._exited(slot)

    def _start(self, slot: _Slot) -> None:
        # Always from the main thread: PR_SET_PDEATHSIG fires when the thread
        # that started the child ends, not only when the process does.
        restarted = slot.restart_at is not None
        slot.restart_at = None
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_child_main,
            args=(self.target, slot.config, self.args, os.getpid(), reader),
            name=slot.name,
        )
        try:
            process.start()
        finally:
            reader.close()  # the child has its own copy; the parent keeps only the writing end
        slot.process, slot.lifeline, slot.started = process, writer, time.monotonic()
        if restarted:
            log.info(
                "%s restarted (pid %s; restart %d of at most %d in %g s)",
                slot.name,
                process.pid,
                slot.schedule.restarts,
                self.policy.max_restarts,
                self.policy.window,
            )
        else:
            log.info("%s started (pid %s)", slot.name, process.pid)

    def _exited(self, slot: _Slot) -> None:
        process = slot.process
        assert process is not None
        process.join()
        code, pid = process.exitcode, process.pid
        self._release(slot)
        now = time.monotonic()
        uptime = now - slot.started
        what = f"{slot.name} (pid {pid}) {_describe(code)} after {uptime:.1f} s"
        if self._stopping:
            self._statuses.append(_exit_status(code))
            log.info("%s", what)
            return
        if code in CANNOT_START:
            self._fail(_exit_status(code), "%s: it cannot start; stopping the group", what)
            return
        delay = slot.schedule.plan(now, uptime)
        if delay is None:
            self._fail(
                max(1, _exit_status(code)),
                "%s; restarted %d times in %g s already: stopping the group",
                what,
                slot.schedule.restarts,
                self.policy.window,
            )
            return
        slot.restart_at = now + delay
        log.warning("%s; restarting it in %g s", what, delay)

    def _fail(self, status: int, message: str, *args: object) -> None:
        log.error(message, *args)
        self._failure = status
        self._stopping = True

    def _terminate_all(self) -> None:
        """SIGTERM every child not sent one yet; no restart is pending any more."""
        for slot in self._slots:
            slot.restart_at = None
            process = slot.process
            if process is not None and process.pid is not None and process.pid not in self._signalled:
                self._signalled.add(process.pid)
                if process.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGTERM)

    def _release(self, slot: _Slot) -> None:
        if slot.lifeline is not None:
            slot.lifeline.close()
        if slot.process is not None:
            slot.process.close()
        slot.process, slot.lifeline = None, None

    def _release_all(self) -> None:
        """On the way out (normally with no child left): stop and reap any child left."""
        for slot in self._slots:
            if slot.process is not None:
                if slot.process.is_alive():
                    slot.process.terminate()
                slot.process.join()
                self._release(slot)
