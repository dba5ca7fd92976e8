"""The standard services beside DistillService: health, reflection, the probe."""

from __future__ import annotations

import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from distill_server import server as server_module
from distill_server.config import ServerConfig
from tests.servers import InProcessServer


def test_health_is_serving(server: InProcessServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "distill.v1.DistillService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_the_service(server: InProcessServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "distill.v1.DistillService" in set(database.get_services())
        service = database.FindFileContainingSymbol("distill.v1.DistillService").service[0]
        assert [m.name for m in service.method] == [
            "ComputeLayerLoss",
            "ComputeTotalLoss",
            "StreamLosses",
            "GetServerInfo",
            "RegisterSharedMemory",
            "UnregisterSharedMemory",
            "GetSharedMemoryStatus",
        ]


def test_probe_exit_codes(server: InProcessServer) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "distill_server.probe", "--target", server.target],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    down = subprocess.run(
        [sys.executable, "-m", "distill_server.probe", "--target", "127.0.0.1:1", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_not_serving_until_warm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real server in-process, its warm-up held back until the test lets it go.

    The gate replaces the module's private warm-up function: nothing public
    runs between the server's start and its warm-up's end."""
    gate = threading.Event()
    warm_up = server_module._warm_up
    monkeypatch.setattr(server_module, "_warm_up", lambda backend: (gate.wait(30), warm_up(backend)))
    server = InProcessServer(ServerConfig(port=0, device="cpu"))
    started = server.submit(server.server.start())
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="distill.v1.DistillService")
            status = stub.Check(request, timeout=10, wait_for_ready=True).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            gate.set()
            started.result(30)
            assert stub.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gate.set()
        server.stop(0)
