"""Real servers for the tests: a ``distill-server`` process, or a
``DistillServer`` running in this process on an event loop of its own."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from distill_server.config import ServerConfig
from distill_server.server import DistillServer

__all__ = ["InProcessServer", "ServerProcess", "eventually"]

T = TypeVar("T")

_READY = re.compile(r"ready on (\S+):(\d+)")
_METRICS_PORT = re.compile(r"metrics on :(\d+)")


def eventually(condition: Callable[[], bool], timeout: float = 30, what: str = "the condition") -> None:
    """Poll ``condition()`` until it is true; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not hold within {timeout:g} s")
        time.sleep(0.005)


@dataclass
class ServerProcess:
    """A ``distill-server`` subprocess on a free loopback port, its log (stderr) read as it comes."""

    args: list[str]
    process: subprocess.Popen[str] = field(init=False)
    port: int = field(init=False)
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        command = [sys.executable, "-m", "distill_server", "--host", "127.0.0.1", "--port", "0", *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        ready = threading.Event()
        found: list[int] = []

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.log.append(line)
                match = _READY.search(line)
                if match and not found:
                    found.append(int(match.group(2)))
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(60) or not found:
            self.stop()
            raise RuntimeError("distill-server did not become ready:\n" + "".join(self.log))
        self.port = found[0]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_port(self) -> int:
        """The metrics port of the last process that logged it ready (``--metrics-port``)."""
        return self.metrics_ports()[-1]

    def metrics_ports(self) -> list[int]:
        """The metrics ports the server (each of its processes) logged."""
        return [int(port) for port in _METRICS_PORT.findall(self.text())]

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(10)
        if self.process.stderr is not None:
            self.process.stderr.close()

    def wait_for_lines(self, text: str, count: int, timeout: float = 60) -> None:
        """Wait until ``count`` log lines contain ``text``."""
        deadline = time.monotonic() + timeout
        while sum(text in line for line in list(self.log)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} x {text!r} not logged:\n{self.text()}")
            time.sleep(0.002)

    def text(self) -> str:
        """The log read so far: all of it once the process has exited (a
        line a running server is about to write: :meth:`wait_for_lines`)."""
        if self.process.poll() is not None:
            self._reader.join(10)  # the rest of the pipe, up to its end
        return "".join(self.log)


class InProcessServer:
    """The real :class:`DistillServer` in this process, serving from an event
    loop in a background thread. Started by :meth:`start` (or ``with``)."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="distill-test-server", daemon=True)
        self._thread.start()
        try:
            self.server = self.run(self._create(config))
        except BaseException:
            self._close_loop()
            raise

    @staticmethod
    async def _create(config: ServerConfig) -> DistillServer:
        return DistillServer(config)  # on the loop it serves from

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Run ``coroutine`` on the server's loop; its future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coroutine`` on the server's loop and wait for its result."""
        return self.submit(coroutine).result(timeout)

    def start(self) -> InProcessServer:
        """Serve; returns once health says SERVING (the device warmed up)."""
        self.run(self.server.start())
        return self

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop (the config's grace period unless ``grace``), then end the loop."""
        try:
            self.run(self.server.stop(grace))
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()

    def __enter__(self) -> InProcessServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return self.server.address

    @property
    def metrics_port(self) -> int:
        """The ``/metrics`` port (the config must set ``metrics_port``)."""
        assert self.server.metrics_port is not None, "started without metrics_port"
        return self.server.metrics_port

    def sample(self, name: str, **labels: str) -> float:
        """A metric's current value, as ``/metrics`` would report it (0 if never set)."""
        value = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value
