"""The standard services beside DistillService: health, reflection, the probe."""

from __future__ import annotations

import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.conftest import ServerProcess


def test_health_is_serving(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "distill.v1.DistillService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_the_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "distill.v1.DistillService" in set(database.get_services())
        service = database.FindFileContainingSymbol("distill.v1.DistillService").service[0]
        assert [m.name for m in service.method] == [
            "ComputeLayerLoss",
            "ComputeTotalLoss",
            "StreamLosses",
            "GetServerInfo",
        ]


def test_probe_exit_codes(server: ServerProcess) -> None:
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
