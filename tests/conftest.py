"""Fixtures: the array modules to test, and real servers on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType

import numpy as np
import pytest

from distill_client import DistillClient
from distill_server.config import ServerConfig
from tests.devices import CUDA
from tests.servers import InProcessServer, ServerProcess

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and CuPy")


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=[pytest.mark.gpu, gpu])])
def xp(request: pytest.FixtureRequest) -> ModuleType:
    """Each array module the engine runs on: NumPy, and CuPy with a GPU."""
    if request.param == "cupy":
        import cupy

        return cupy
    return np


@pytest.fixture(scope="session")
def server() -> Iterator[InProcessServer]:
    """One real server (CPU, four workers) in this process, shared by the end-to-end tests."""
    running = InProcessServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", workers=4)).start()
    yield running
    running.stop()


@pytest.fixture
def start_in_process() -> Iterator[Callable[[ServerConfig], InProcessServer]]:
    """Start in-process servers with their own configuration; every one is stopped afterwards."""
    started: list[InProcessServer] = []

    def start(config: ServerConfig) -> InProcessServer:
        running = InProcessServer(config)
        started.append(running)
        return running.start()

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def start_server() -> Iterator[type[ServerProcess]]:
    """Start ``distill-server`` processes with custom flags; every one is stopped afterwards."""
    started: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def __post_init__(self) -> None:
            started.append(self)
            super().__post_init__()

    yield Tracked
    for process in started:
        process.stop()


@pytest.fixture
def client(server: InProcessServer) -> Iterator[DistillClient]:
    with DistillClient(server.target, timeout=60) as c:
        yield c
