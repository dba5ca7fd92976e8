"""Prometheus metrics, read from a real server's /metrics endpoint."""

from __future__ import annotations

import contextlib
import gzip
import select
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

from distill.v1 import distill_pb2 as pb
from distill_client import DistillClient, DistilLoss, EmptyInput
from distill_core import wire
from distill_server.metrics import Metrics
from tests.scraping import scrape
from tests.servers import ServerProcess


@pytest.fixture(scope="module")
def metered() -> Iterator[ServerProcess]:
    proc = ServerProcess(["--device", "cpu", "--metrics-port", "0"])
    yield proc
    proc.stop()


def test_calls_are_counted_by_rpc_and_code(metered: ServerProcess) -> None:
    layers = [(1.0, DistilLoss.mse())]
    t = np.ones((4, 25), np.float32)
    empty = np.ones(0)
    with DistillClient(metered.target, timeout=10) as client:
        for _ in range(3):
            client.compute_total_loss(layers, [t], [t])
        client.compute_layer_loss(layers, 0, t, t)
        with pytest.raises(EmptyInput):
            client.compute_total_loss(layers, [empty], [empty])
        with client.stream(layers) as session:
            session.step([t], [t])
            session.step([t], [t])
        client.server_info()
    m = scrape(metered)
    assert m['distill_requests_total{code="OK",rpc="ComputeTotalLoss"}'] == 3
    assert m['distill_requests_total{code="INVALID_ARGUMENT",rpc="ComputeTotalLoss"}'] == 1
    assert m['distill_requests_total{code="OK",rpc="ComputeLayerLoss"}'] == 1
    assert m['distill_requests_total{code="OK",rpc="GetServerInfo"}'] == 1
    assert m['distill_stream_steps_total{code="OK"}'] == 2
    assert m['distill_request_duration_seconds_count{rpc="ComputeTotalLoss"}'] == 4
    assert m['distill_elements_total{rpc="ComputeTotalLoss"}'] == 3 * 200
    assert m['distill_elements_total{rpc="StreamLosses"}'] == 2 * 200
    # The bytes of the four requests as the client frames them (distill_core.wire).
    request = pb.ComputeTotalLossRequest(layers=[pb.Layer(weight=1.0, loss=DistilLoss.mse().to_proto())])
    full = len(wire.build(request, teachers=[t], students=[t]))
    refused = len(wire.build(request, teachers=[empty], students=[empty]))
    assert m['distill_received_bytes_total{rpc="ComputeTotalLoss"}'] == 3 * full + refused
    assert m["distill_requests_in_flight"] == 0
    assert m['distill_device_info{description="cpu (numpy ' + np.__version__ + ')",device="cpu"}'] == 1


# The endpoint itself, in this process: bounded in threads, connections and time.

_HALF_REQUEST = b"GET /metrics HT"  # half a request line, then silence


@contextlib.contextmanager
def endpoint(host: str = "127.0.0.1", http_timeout: float | None = None) -> Iterator[tuple[Metrics, int]]:
    metrics = Metrics("cpu", "test", http_timeout=http_timeout)
    port = metrics.serve(host, 0)
    try:
        yield metrics, port
    finally:
        metrics.close()


def fetch(port: int, host: str = "127.0.0.1") -> str:
    url_host = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{url_host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return str(response.read().decode())


def silent(port: int, stack: contextlib.ExitStack, count: int) -> list[socket.socket]:
    """``count`` connections that send half a request line and stay silent."""
    socks = []
    for _ in range(count):
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        sock.sendall(_HALF_REQUEST)
        socks.append(sock)
    return socks


def closed_by_server(sock: socket.socket) -> bool:
    """Wait (10 s at most) for the server to close ``sock``."""
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def still_open(*socks: socket.socket) -> bool:
    """No end of stream (or data) from any of ``socks`` for 50 ms."""
    readable, _, _ = select.select(socks, [], [], 0.05)
    return not readable


def wait_threads(at_most: int) -> int:
    """The thread count, once it is ``at_most`` or after 10 s."""
    deadline = time.monotonic() + 10
    while threading.active_count() > at_most and time.monotonic() < deadline:
        time.sleep(0.01)
    return threading.active_count()


def test_silent_connections_hold_no_threads_and_cannot_lock_scrapes_out() -> None:
    base = threading.active_count()
    with contextlib.ExitStack() as stack:
        metrics, port = stack.enter_context(endpoint(http_timeout=30.0))
        bound = base + 1 + metrics.http_workers  # the I/O thread and the workers
        socks = silent(port, stack, 100)
        assert threading.active_count() <= bound + 2
        assert "distill_device_info" in fetch(port)  # while they are open
        assert threading.active_count() <= bound + 2
        # 64 connections are held: the scrape, and each connection past 64,
        # closed the oldest one still sending its request.
        evicted = 100 + 1 - metrics.http_connections
        assert all(closed_by_server(sock) for sock in socks[:evicted])
        assert still_open(*socks[evicted:])
        metrics.close()  # closes them, ends every thread it started
        assert all(closed_by_server(sock) for sock in socks[evicted:])
        assert wait_threads(base) <= base
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        metrics.close()  # twice is fine


def test_half_sent_requests_are_dropped_after_the_timeout() -> None:
    with contextlib.ExitStack() as stack:
        _, port = stack.enter_context(endpoint(http_timeout=0.5))
        start = time.monotonic()
        socks = silent(port, stack, 20)
        trickle = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        dropped = False
        for byte in _HALF_REQUEST * 20:  # a byte every 50 ms: each recv is quick, the request never complete
            try:
                trickle.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
            if not still_open(trickle):
                dropped = closed_by_server(trickle)
                break
        assert dropped
        assert all(closed_by_server(sock) for sock in socks)
        assert time.monotonic() - start < 10
        assert "distill_device_info" in fetch(port)


def test_many_scrapes_at_once_are_answered_by_bounded_workers() -> None:
    base = threading.active_count()
    with contextlib.ExitStack() as stack:
        metrics, port = stack.enter_context(endpoint(http_timeout=10.0))
        socks = []
        for i in range(40):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            accept = "Accept: application/openmetrics-text; version=1.0.0\r\n" if i % 2 else ""
            sock.sendall(f"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n{accept}\r\n".encode())
            socks.append(sock)
        assert threading.active_count() <= base + 1 + metrics.http_workers + 2
        for i, sock in enumerate(socks):
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            lines = head.decode().lower().split("\r\n")
            assert lines[0].startswith("http/1.0 200"), lines[0]
            assert "content-encoding: gzip" in lines
            assert any(line.startswith("content-type: application/openmetrics-text") for line in lines) == bool(i % 2)
            assert b"distill_device_info" in gzip.decompress(body)


def test_ipv6_host() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with endpoint("::1") as (_, port):
        assert "distill_device_info" in fetch(port, "::1")
