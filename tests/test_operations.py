"""What operators rely on: limits, configuration from the environment, logs,
health during a drain, and many replicas behind one client."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distill_client import DistillClient, DistilLoss, LimitExceeded, TeacherStudentMismatch
from distill_server.config import ServerConfig
from distill_server.logs import native_record, relay
from tests.proxy import StallingProxy
from tests.scraping import scrape
from tests.servers import InProcessServer, ServerProcess

MSE = [(1.0, DistilLoss.mse())]


def test_layer_and_element_limits(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--max-layers", "3", "--max-elements", "1000"])
    t = np.ones(100, np.float32)
    with DistillClient(proc.target, timeout=10) as client:
        assert client.compute_total_loss(MSE * 3, [t] * 3, [t] * 3).total == 0.0
        with pytest.raises(LimitExceeded) as info:
            client.compute_total_loss(MSE * 4, [t] * 4, [t] * 4)
        assert (info.value.limit, info.value.got) == (3, 4) and "--max-layers" in info.value.message
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        big = np.ones(501, np.float32)
        with pytest.raises(LimitExceeded) as info:
            client.compute_layer_loss(MSE, 0, big, big)
        assert (info.value.limit, info.value.got) == (1000, 1002) and "--max-elements" in info.value.message
        with pytest.raises(LimitExceeded), client.stream(MSE) as session:
            session.step([big], [big])


def test_concurrent_call_and_stream_limits(start_server: type[ServerProcess]) -> None:
    proc = start_server(
        ["--device", "cpu", "--max-concurrent-calls", "1", "--max-concurrent-streams", "1", "--log-level", "DEBUG"]
    )
    with DistillClient(proc.target, timeout=30) as client:
        session = client.stream(MSE)  # holds the only stream slot while it is open
        session.step([np.ones(3)], [np.ones(3)])
        with pytest.raises(LimitExceeded) as info, client.stream(MSE) as second:
            second.step([np.ones(3)], [np.ones(3)])
        assert (info.value.limit, info.value.got) == (1, 2) and "--max-concurrent-streams" in info.value.message
        assert client.compute_total_loss(MSE, [np.ones(3)], [np.zeros(3)]).total == 1.0  # unary slots are apart
        session.close()
        proc.wait_for_lines("stream ended", 2)
        # An upload stalled half way holds the only unary slot until the receive timeout.
        proxy = StallingProxy(proc.port, 1024 * 1024)
        stalled = grpc.insecure_channel(f"127.0.0.1:{proxy.port}")
        upload = stalled.unary_unary("/distill.v1.DistillService/ComputeTotalLoss").future(b"\0" * (4 << 20))
        try:
            proc.wait_for_lines("call started: rpc=ComputeTotalLoss", 2)
            with pytest.raises(LimitExceeded) as info:
                client.compute_total_loss(MSE, [np.ones(3)], [np.ones(3)])
            assert (info.value.limit, info.value.got) == (1, 2) and "--max-concurrent-calls" in info.value.message
        finally:
            proxy.close()
            upload.cancel()
            stalled.close()


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``distill-server`` with extra environment variables."""
    return subprocess.run(
        [sys.executable, "-m", "distill_server", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "DISTILL_DEVICE": "cpu", "DISTILL_PORT": "0", **env},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [
        ("DISTILL_WORKERS", "many", "$DISTILL_WORKERS='many': invalid literal"),
        (
            "DISTILL_LOG_LEVEL",
            "verbose",
            "$DISTILL_LOG_LEVEL='verbose': expected one of DEBUG",
        ),  # any case of a level is fine
    ],
)
def test_bad_environment_values_are_refused(variable: str, value: str, complaint: str) -> None:
    result = run_cli(**{variable: value})
    assert result.returncode == 2 and complaint in result.stderr


def test_help_names_every_variable_and_its_value() -> None:
    help_text = " ".join(run_cli("--help", DISTILL_MAX_LAYERS="7").stdout.split())
    assert "[env DISTILL_MAX_LAYERS; default 7]" in help_text
    for flag in ("--metrics-port", "--tls-cert", "--tls-client-ca", "--auth-token-file", "--max-concurrent-calls"):
        assert flag in help_text


def test_env_and_flag_precedence_on_a_running_server(
    start_server: type[ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILL_MAX_MESSAGE_MB", "3")
    monkeypatch.setenv("DISTILL_MAX_LAYERS", "2")
    proc = start_server(["--device", "cpu", "--max-layers", "5"])
    with DistillClient(proc.target, timeout=10) as client:
        assert client.server_info().max_message_bytes == 3 * 1024 * 1024  # from the environment
        client.compute_total_loss(MSE * 5, [np.ones(2)] * 5, [np.ones(2)] * 5)  # the flag won


def test_json_logs_one_line_per_failed_call(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--log-format", "json"])
    with DistillClient(proc.target, timeout=10) as client:
        with pytest.raises(TeacherStudentMismatch):
            client.compute_total_loss(MSE, [np.ones(3)], [np.ones(4)])
    proc.wait_for_lines("TEACHER_STUDENT_MISMATCH", 1, timeout=10)
    lines = [json.loads(line) for line in proc.text().splitlines() if line.startswith("{")]
    failed = [line for line in lines if line.get("reason") == "TEACHER_STUDENT_MISMATCH"]
    assert len(failed) == 1
    entry = failed[0]
    assert entry["rpc"] == "ComputeTotalLoss" and entry["code"] == "INVALID_ARGUMENT"
    assert entry["peer"].startswith("ipv4:127.0.0.1:") and entry["level"] == "WARNING"
    assert "3 elements" in entry["error"]


@pytest.mark.parametrize("processes", [1, 2])
def test_json_logs_carry_grpc_cores_own_lines(
    start_server: type[ServerProcess], monkeypatch: pytest.MonkeyPatch, processes: int
) -> None:
    monkeypatch.setenv("GRPC_VERBOSITY", "info")  # the core then warns at start that INFO is not for production
    proc = start_server(["--device", "cpu", "--log-format", "json", "--processes", str(processes)])
    proc.wait_for_lines("ready on", processes, timeout=60)  # each process has started gRPC
    with DistillClient(proc.target, timeout=10) as client:
        assert client.compute_total_loss(MSE, [np.ones(3)], [np.zeros(3)]).total == 1.0
    proc.stop()
    assert not proc._reader.is_alive()  # the relay ended with the server: the log reached its end
    lines = [json.loads(line) for line in proc.text().splitlines()]  # every line is JSON
    core = [line for line in lines if line["logger"] == "grpc" and "not suitable for production" in line["message"]]
    assert len(core) == processes  # one from each serving process, through the one relay
    assert core[0]["level"] == "WARNING" and core[0]["source"].startswith("log.cc:")
    assert sum(line["message"] == "stopped" for line in lines) == processes  # the drain is still logged


def test_native_lines_become_records() -> None:
    record = native_record("E1130 13:11:02.321801   26035 chttp2_transport.cc:1234] frame too large")
    assert (record.name, record.levelname, record.getMessage()) == ("grpc", "ERROR", "frame too large")
    assert record.source == "chttp2_transport.cc:1234"  # type: ignore[attr-defined]
    assert native_record("F1130 13:11:02.3 7 a.cc:1] gone").levelname == "CRITICAL"
    other = native_record("Fatal Python error: Aborted")
    assert (other.name, other.levelname, other.getMessage()) == ("stderr", "WARNING", "Fatal Python error: Aborted")
    sink = io.StringIO()
    relay(io.BytesIO(b'{"already": "json"}\nI1130 13:11:02.3 7 a.cc:1] hello\n\n{"cut": "by another w{"x": 1}\n'), sink)
    first, second, third = (json.loads(line) for line in sink.getvalue().splitlines())
    assert first == {"already": "json"} and (second["level"], second["message"]) == ("INFO", "hello")
    assert third["logger"] == "stderr" and third["message"].startswith('{"cut"')  # interleaved: wrapped, still JSON


def test_health_goes_not_serving_when_draining(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--grace", "5"])
    seen: list[int] = []
    with grpc.insecure_channel(proc.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)

        def follow() -> None:
            try:
                for response in watch:
                    seen.append(response.status)
            except grpc.RpcError:
                pass

        thread = threading.Thread(target=follow)
        thread.start()
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        thread.join(30)
    assert seen[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen[1:]


def test_round_robin_over_replicas_survives_a_dead_one(start_server: type[ServerProcess]) -> None:
    replicas = [start_server(["--device", "cpu", "--metrics-port", "0"]) for _ in range(3)]
    targets = [r.target for r in replicas]
    t = np.ones(64, np.float32)
    with DistillClient(targets, timeout=30) as client:
        for _ in range(60):
            assert client.compute_total_loss(MSE, [t], [t + 1]).total == 1.0
        counts = [scrape(r).get('distill_requests_total{code="OK",rpc="ComputeTotalLoss"}', 0) for r in replicas]
        # Spread over all three (20 each once every connection is up; the first
        # calls may go to whichever server answered first).
        assert sum(counts) == 60 and all(c >= 10 for c in counts), counts
        replicas[0].process.kill()  # no drain: connections drop
        replicas[0].process.wait()
        for _ in range(30):  # gRPC retries UNAVAILABLE on the survivors
            assert client.compute_total_loss(MSE, [t], [t + 1]).total == 1.0
    later = [scrape(r).get('distill_requests_total{code="OK",rpc="ComputeTotalLoss"}', 0) for r in replicas[1:]]
    assert sum(later) - sum(counts[1:]) == 30


def test_several_processes_share_one_port(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--processes", "2", "--metrics-port", "0"])
    proc.wait_for_lines("ready on", 2)
    t = np.ones(16, np.float32)
    for _ in range(30):  # each new connection goes to one of the processes
        with DistillClient(proc.target, timeout=10) as client:
            assert client.compute_total_loss(MSE, [t], [t]).total == 0.0
    proc.wait_for_lines(f"2 processes on 127.0.0.1:{proc.port}", 1)
    ports = proc.metrics_ports()
    served = [scrape(proc, port).get('distill_requests_total{code="OK",rpc="ComputeTotalLoss"}', 0) for port in ports]
    assert len(ports) == 2 and sum(served) == 30 and min(served) > 0, served
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert proc.text().count("stopped") == 2


def test_connections_are_renewed_after_max_connection_age(
    start_in_process: Callable[[ServerConfig], InProcessServer],
) -> None:
    """GOAWAY once a connection is older than --max-connection-age: the
    channel leaves READY and connects anew (re-resolving its target), while
    a stream opened on the old connection goes on."""
    running = start_in_process(ServerConfig(port=0, device="cpu", max_connection_age_seconds=0.5))
    states: list[grpc.ChannelConnectivity] = []
    renewed = threading.Event()

    def watch(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if state is grpc.ChannelConnectivity.IDLE and grpc.ChannelConnectivity.READY in states:
            renewed.set()

    t = np.linspace(-1, 1, 64, dtype=np.float32)
    with DistillClient(running.target, timeout=10) as client:
        with client.stream(MSE) as session:
            assert session.step([t], [t + 1]).total == pytest.approx(1.0)
            with grpc.insecure_channel(running.target) as channel:
                channel.subscribe(watch, try_to_connect=True)
                health = health_pb2_grpc.HealthStub(channel)
                assert (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
                assert renewed.wait(10), states  # READY, then IDLE: the server asked it to go
                assert (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
                channel.unsubscribe(watch)
            # The stream began before the age ran out on the client's connection; it still steps.
            assert session.step([t], [t - 2]).total == pytest.approx(4.0)
