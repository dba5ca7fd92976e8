"""A rolling restart under steady load costs no call.

Three real replicas on loopback, one client balancing over all three, and
threads calling continuously while each replica in turn is stopped with
SIGTERM and started again on the same port. Together, the server's
``--drain-delay`` (NOT_SERVING, yet still serving, before it stops accepting),
the client's health checking (round_robin leaves a NOT_SERVING replica) and
its retries of CANCELLED and UNAVAILABLE must make every call succeed.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distill_client import DistillClient, DistillError, DistilLoss
from tests.scraping import scrape
from tests.servers import ServerProcess

MSE = [(1.0, DistilLoss.mse())]
TEACHER = np.arange(1000, dtype=np.float32) / 8  # exact in float32
STUDENT = TEACHER + 0.5  # every difference exactly 0.5: the MSE is 0.25
EXPECTED = 0.25
SERVED = 'distill_requests_total{code="OK",rpc="ComputeTotalLoss"}'
FLAGS = ["--device", "cpu", "--drain-delay", "1", "--grace", "5", "--metrics-port", "0"]
THREADS = 4
DEADLINE = 55.0  # seconds for the whole restart sequence


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free right now (all bound at once)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service="distill.v1.DistillService")
        status: int = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status
        return status


@dataclass
class Load:
    """Threads calling ComputeTotalLoss through one client until stopped."""

    client: DistillClient
    start: float = field(default_factory=time.monotonic)
    calls: int = 0
    failures: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def note(self, event: str) -> None:
        """A restart step, so failures can be placed among them."""
        with self._lock:
            self.events.append(f"{time.monotonic() - self.start:7.3f}s {event}")

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                total = self.client.compute_total_loss(MSE, [TEACHER], [STUDENT]).total
                failure = None if total == pytest.approx(EXPECTED) else f"wrong total {total}"
            except DistillError as exc:
                failure = f"{type(exc).__name__} ({exc.code.name}): {exc}"
            with self._lock:
                self.calls += 1
                if failure is not None:
                    self.failures.append(f"{time.monotonic() - self.start:7.3f}s {failure}")

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self.run, name=f"load-{i}") for i in range(THREADS)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def report(self) -> str:
        with self._lock:
            return "\n".join(
                [f"{len(self.failures)} of {self.calls} calls failed:", *self.failures[:50], "steps:", *self.events]
            )


def served(proc: ServerProcess) -> float:
    return scrape(proc).get(SERVED, 0.0)


def wait_until_served(proc: ServerProcess, load: Load, deadline: float) -> float:
    """Wait (under load) until ``proc`` has answered calls; its count."""
    while (count := served(proc)) == 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.target} served no call\n{load.report()}\n{proc.text()}")
        time.sleep(0.05)
    return count


def test_rolling_restart_under_load_fails_no_call(start_server: type[ServerProcess]) -> None:
    deadline = time.monotonic() + DEADLINE
    ports = free_ports(3)
    # The fixture passes --port 0 first; argparse keeps the last --port.
    replicas = [start_server([*FLAGS, "--port", str(port)]) for port in ports]
    assert [r.port for r in replicas] == ports
    targets = [r.target for r in replicas]
    counts: list[float] = []
    with DistillClient(targets, timeout=30) as client, Load(client) as load:
        for replica in replicas:
            wait_until_served(replica, load, deadline)
        for i, port in enumerate(ports):
            old = replicas[i]
            counts.append(served(old))  # what it answered until now: it is about to go
            load.note(f"SIGTERM {old.target}")
            old.signal(signal.SIGTERM)
            assert old.wait(30) == 0, old.text()
            load.note(f"exited {old.target}")
            old.stop()
            new = start_server([*FLAGS, "--port", str(port)])
            assert new.port == port
            assert health(new.target) == health_pb2.HealthCheckResponse.SERVING
            load.note(f"SERVING {new.target}")
            replicas[i] = new
            wait_until_served(new, load, deadline)  # the client is back on it before the next goes
            load.note(f"served by {new.target}")
        counts.extend(wait_until_served(r, load, deadline) for r in replicas)
    report = load.report()
    assert not load.failures, report
    assert all(count > 0 for count in counts), (counts, report)
    assert load.calls > 0
    for proc in replicas:
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.text()
