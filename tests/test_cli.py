"""The ``distill-server`` command: flags, start-up, limits, signals and shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from distill_client import DistillClient, DistilLoss, MessageTooLarge, Unavailable
from tests.certs import Authority
from tests.devices import CUDA
from tests.reference import reference
from tests.servers import InProcessServer, ServerProcess


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distill_server", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_every_flag() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--host", "--port", "--device", "--workers", "--max-message-mb", "--grace", "--log-level"):
        assert flag in result.stdout


def test_ready_line_names_address_and_device(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu"])
    assert f"ready on 127.0.0.1:{proc.port} (pid {proc.process.pid}, device cpu" in proc.text()


def test_busy_port_fails_loudly(server: InProcessServer) -> None:
    result = run_cli("--host", "127.0.0.1", "--port", str(server.port), "--device", "cpu")
    assert result.returncode == 1
    assert f"cannot serve on 127.0.0.1:{server.port}" in result.stderr


@pytest.mark.parametrize("device", ["tpu", "cuda:x"])
def test_unknown_device_is_refused(device: str) -> None:
    result = run_cli("--port", "0", "--device", device)
    assert result.returncode == 2
    assert f"cannot use device {device!r}" in result.stderr


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_refused() -> None:
    result = run_cli("--port", "0", "--device", "cuda")
    assert result.returncode == 2
    assert "cannot use device 'cuda'" in result.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-message-mb", "0"),
        ("--max-message-mb", "4096"),
        ("--workers", "0"),
        ("--port", "70000"),
        ("--port", "-1"),
        ("--metrics-port", "65536"),
    ],
)
def test_out_of_range_flags_are_refused(flag: str, value: str) -> None:
    result = run_cli(flag, value)
    assert result.returncode == 2
    assert flag in result.stderr


def test_an_unreadable_token_file_is_one_line(tmp_path: Path) -> None:
    result = run_cli("--auth-token-file", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"--auth-token-file {tmp_path / 'missing'}: No such file or directory" in result.stderr


def test_a_tls_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    authority = Authority(tmp_path, "ca")
    one, other = authority.issue("one", server=True), authority.issue("other", server=True)
    result = run_cli("--tls-cert", str(one.cert), "--tls-key", str(other.key))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "the key does not match the certificate" in result.stderr
    missing = run_cli("--tls-cert", str(one.cert), "--tls-key", str(tmp_path / "nope.key"))
    assert missing.returncode == 2 and "No such file or directory" in missing.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_calls_in_flight_and_exits_zero(start_server: type[ServerProcess], sig: int) -> None:
    # One worker and four calls: when the fourth call has reached the server,
    # at least one computation is still queued, so the signal finds calls in flight.
    proc = start_server(["--device", "cpu", "--workers", "1", "--grace", "30", "--log-level", "DEBUG"])
    rng = np.random.default_rng(0)
    t = rng.normal(size=8 * 1024 * 1024).astype(np.float32)  # 2 x 32 MiB per call
    s = t + rng.normal(size=t.size).astype(np.float32)
    loss = DistilLoss.kl_divergence(2.0)
    expected = reference(loss, t, s)
    results: list[tuple[float, float]] = []
    failures: list[BaseException] = []
    client = DistillClient(proc.target, timeout=120, transport="grpc")  # the log counts these calls only

    def call() -> None:
        try:
            value = client.compute_layer_loss([(1.0, loss)], 0, t, s).loss
            results.append((value, time.monotonic()))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        proc.wait_for_lines("call started", 4)
        signalled = time.monotonic()
        proc.signal(sig)
        for thread in threads:
            thread.join(120)
        assert proc.wait(60) == 0
    finally:
        client.close()
    assert not failures, failures
    assert len(results) == 4
    assert all(value == pytest.approx(expected, rel=1e-10) for value, _ in results)
    assert max(done for _, done in results) > signalled, "no call was in flight at the signal"
    assert "draining" in proc.text()
    with DistillClient(proc.target, timeout=5) as late, pytest.raises(Unavailable):
        late.server_info()


def test_request_over_the_server_limit(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--max-message-mb", "1"])
    big = np.ones(300_000, np.float32)  # 2 x 1.2 MB
    with DistillClient(proc.target, timeout=30) as client:
        with pytest.raises(MessageTooLarge) as info:
            client.compute_layer_loss([(1.0, DistilLoss.mse())], 0, big, big)
        assert "--max-message-mb" in info.value.message
        assert client.server_info().max_message_bytes == 1024 * 1024


def test_request_over_the_client_limit(server: InProcessServer) -> None:
    big = np.ones(300_000, np.float32)
    with DistillClient(server.target, max_message_bytes=1024 * 1024, timeout=30, transport="grpc") as client:
        with pytest.raises(MessageTooLarge) as info:
            client.compute_layer_loss([(1.0, DistilLoss.mse())], 0, big, big)
    assert "max_message_bytes" in info.value.message


def test_unreachable_server_is_unavailable() -> None:
    with DistillClient("127.0.0.1:1", timeout=5) as client, pytest.raises(Unavailable):
        client.server_info()


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("3", "3")])
def test_the_server_keeps_blas_to_one_thread_unless_told(given: str | None, expected: str) -> None:
    """Set before NumPy loads its BLAS, whose threads would compete with the workers."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    code = "import distill_server.cli, os, sys; print(os.environ['OPENBLAS_NUM_THREADS'], 'numpy' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == [expected, "True"], done.stderr


def test_version_and_help_answer_whatever_the_environment_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILL_MAX_LAYERS", "lots")
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("distill-server ")
    assert run_cli("--help").returncode == 0
    refused = run_cli("--port", "0")  # anything else: the bad value is an error, in one line
    assert refused.returncode == 2 and "$DISTILL_MAX_LAYERS='lots'" in refused.stderr


def test_choices_take_any_case_from_flags_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from distill_server.cli import parse_args

    monkeypatch.setenv("DISTILL_LOG_LEVEL", "debug")
    monkeypatch.setenv("DISTILL_LOG_FORMAT", "JSON")
    _, args = parse_args([])
    assert (args.log_level, args.log_format) == ("DEBUG", "json")
    _, args = parse_args(["--log-level", "Warning"])
    assert args.log_level == "WARNING"


def test_probe_help_has_no_markup() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "distill_server.probe", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "distill-probe: exit 0" in result.stdout and "``" not in result.stdout
