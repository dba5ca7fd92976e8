"""TLS, mutual TLS and bearer tokens, against real server processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distill_client import DistillClient, DistillError, DistilLoss, Unauthenticated, Unavailable
from tests.certs import Authority, Pair
from tests.scraping import scrape
from tests.servers import ServerProcess

LAYERS = [(1.0, DistilLoss.mse())]
T = np.arange(12, dtype=np.float32)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Pair]]:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = Authority(directory, "ca"), Authority(directory, "other-ca")
    yield {
        "ca": ca.pair,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "stranger": other.issue("stranger", server=False),
    }


def test_tls(start_server: type[ServerProcess], pki: dict[str, Pair]) -> None:
    proc = start_server(["--device", "cpu", "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key)])
    with DistillClient(proc.target, tls_ca=pki["ca"].cert, timeout=10) as client:
        assert client.compute_total_loss(LAYERS, [T], [T + 1]).total == 1.0
    probe = [sys.executable, "-m", "distill_server.probe", "--target", proc.target, "--tls-ca", str(pki["ca"].cert)]
    assert subprocess.run(probe, capture_output=True, text=True, timeout=30).returncode == 0
    # Plaintext cannot talk to a TLS server; an untrusted CA cannot either.
    with DistillClient(proc.target, timeout=5, retries=0) as plain, pytest.raises(Unavailable):
        plain.server_info()
    with DistillClient(proc.target, tls_ca=pki["stranger"].cert, timeout=5, retries=0) as wrong:
        with pytest.raises(Unavailable):
            wrong.server_info()


def test_mutual_tls(start_server: type[ServerProcess], pki: dict[str, Pair]) -> None:
    proc = start_server(
        [
            "--device", "cpu",
            "--tls-cert", str(pki["server"].cert),
            "--tls-key", str(pki["server"].key),
            "--tls-client-ca", str(pki["ca"].cert),
        ]
    )  # fmt: skip
    client_pair = pki["client"]
    with DistillClient(
        proc.target, tls_ca=pki["ca"].cert, tls_cert=client_pair.cert, tls_key=client_pair.key, timeout=10
    ) as client:
        assert client.compute_total_loss(LAYERS, [T], [T]).total == 0.0
    for pair in (None, pki["stranger"]):  # no client certificate, or one from another CA
        kwargs = {} if pair is None else {"tls_cert": pair.cert, "tls_key": pair.key}
        with DistillClient(proc.target, tls_ca=pki["ca"].cert, timeout=5, retries=0, **kwargs) as refused:
            with pytest.raises(DistillError) as info:
                refused.server_info()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_bearer_token(start_server: type[ServerProcess], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    proc = start_server(["--device", "cpu", "--auth-token-file", str(token_file), "--metrics-port", "0"])
    with DistillClient(proc.target, token="s3cret-token", timeout=10) as client:
        assert client.compute_total_loss(LAYERS, [T], [T + 2]).total == 4.0
        with client.stream(LAYERS) as session:
            assert session.step([T], [T + 1]).total == 1.0
    metrics_before = scrape(proc)
    for token in (None, "wrong", "s3cret-token-and-more"):
        with DistillClient(proc.target, token=token, timeout=10) as client:
            with pytest.raises(Unauthenticated) as info:
                client.compute_total_loss(LAYERS, [T], [T])
            assert "Bearer" in info.value.message
            with pytest.raises(Unauthenticated), client.stream(LAYERS) as session:
                session.step([T], [T])
    metrics_after = scrape(proc)
    # Refused calls did no work: no element was computed.
    assert metrics_after["distill_elements_total"] == metrics_before["distill_elements_total"]
    assert metrics_after['distill_requests_total{code="UNAUTHENTICATED",rpc="ComputeTotalLoss"}'] == 3
    # And logged like any failed call: one line each, with the peer.
    proc.wait_for_lines("call failed: rpc=ComputeTotalLoss code=UNAUTHENTICATED", 3)
    refused = [line for line in proc.log if "code=UNAUTHENTICATED" in line and "rpc=ComputeTotalLoss" in line]
    assert len(refused) == 3 and all("peer=ipv" in line for line in refused), refused
    # Health stays open for probes.
    with grpc.insecure_channel(proc.target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_token_from_the_environment(start_server: type[ServerProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILL_AUTH_TOKEN", "from-env")
    proc = start_server(["--device", "cpu"])  # the server reads it too
    with DistillClient(proc.target, timeout=10) as client:
        assert client.compute_total_loss(LAYERS, [T], [T]).total == 0.0
    monkeypatch.delenv("DISTILL_AUTH_TOKEN")
    with DistillClient(proc.target, timeout=10) as client, pytest.raises(Unauthenticated):
        client.compute_total_loss(LAYERS, [T], [T])
