"""Fixtures: the array modules to test, and real servers on loopback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import pytest

from distill_client import DistillClient


def _cuda_available() -> bool:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


CUDA = _cuda_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and CuPy")


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=[pytest.mark.gpu, gpu])])
def xp(request: pytest.FixtureRequest) -> ModuleType:
    """Each array module the engine runs on: NumPy, and CuPy with a GPU."""
    if request.param == "cupy":
        import cupy

        return cupy
    return np


_READY = re.compile(r"ready on (\S+):(\d+)")


@dataclass
class ServerProcess:
    """A ``distill-server`` subprocess on a free loopback port."""

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
        time.sleep(0.05)
        return "".join(self.log)


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One real ``distill-server`` (CPU) shared by the end-to-end tests."""
    process = ServerProcess(["--device", "cpu", "--workers", "4"])
    yield process
    process.stop()
    assert process.process.returncode == 0, process.text()


@pytest.fixture
def start_server() -> Iterator[type[ServerProcess]]:
    """Start servers with custom flags; every one is stopped afterwards."""
    started: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def __post_init__(self) -> None:
            started.append(self)
            super().__post_init__()

    yield Tracked
    for process in started:
        process.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[DistillClient]:
    with DistillClient(server.target, timeout=60) as c:
        yield c
