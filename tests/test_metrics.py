"""Prometheus metrics, read from a real server's /metrics endpoint."""

from __future__ import annotations

import re
import urllib.request
from collections import defaultdict

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from distill_client import DistillClient, DistilLoss, EmptyInput
from tests.conftest import ServerProcess

_METRICS_PORT = re.compile(r"metrics on :(\d+)")


def metrics_ports(proc: ServerProcess) -> list[int]:
    """The metrics ports the server (each of its processes) logged."""
    return [int(port) for port in _METRICS_PORT.findall(proc.text())]


def scrape(proc: ServerProcess, port: int | None = None) -> dict[str, float]:
    """Every sample as ``name{label="value",...}``, plus each name summed over its labels."""
    port = port or metrics_ports(proc)[-1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] += sample.value
            if labels:
                samples[sample.name] += sample.value
    return dict(samples)


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    proc = ServerProcess(["--device", "cpu", "--metrics-port", "0"])
    yield proc  # type: ignore[misc]
    proc.stop()


def test_calls_are_counted_by_rpc_and_code(metered: ServerProcess) -> None:
    layers = [(1.0, DistilLoss.mse())]
    t = np.ones((4, 25), np.float32)
    with DistillClient(metered.target, timeout=10) as client:
        for _ in range(3):
            client.compute_total_loss(layers, [t], [t])
        client.compute_layer_loss(layers, 0, t, t)
        with pytest.raises(EmptyInput):
            client.compute_total_loss(layers, [np.ones(0)], [np.ones(0)])
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
    assert m['distill_received_bytes_total{rpc="ComputeTotalLoss"}'] > 3 * 2 * 400  # three calls of 2 x 400 bytes
    assert m["distill_requests_in_flight"] == 0
    assert m['distill_device_info{description="cpu (numpy ' + np.__version__ + ')",device="cpu"}'] == 1
