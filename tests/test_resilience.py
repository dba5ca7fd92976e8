"""One client must never crash, lock out or exhaust the server.

Every test runs a real ``distill-server`` process and plays a careless or
hostile client against it: cancelling mid-call, going silent, sending many
small or one huge message, asking for answers over a limit. Memory is read
from the server's peak RSS (``VmHWM``); no test asserts a duration.
"""

from __future__ import annotations

import asyncio
import datetime
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from distill.v1 import distill_pb2 as pb
from distill_client import DistillClient, DistilLoss, LimitExceeded, MessageTooLarge, Reduction
from distill_core import wire
from distill_core.errors import DeadlineExceeded, Unavailable, from_rich_status
from distill_server import __version__
from distill_server.admission import Budget, Work
from tests.proxy import StallingProxy
from tests.scraping import scrape
from tests.servers import InProcessServer, ServerProcess, eventually

MIB = 1024 * 1024
SERVICE = "/distill.v1.DistillService/"
MSE = [(1.0, DistilLoss.mse())]


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` value (kB for sizes)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_mib(proc: ServerProcess) -> float:
    return status_kib(proc.process.pid, "VmHWM") / 1024


def cpu_seconds(proc: ServerProcess) -> float:
    with open(f"/proc/{proc.process.pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime in clock ticks (USER_HZ = 100)


def raw_call(target: str, method: str, payload: bytes, timeout: float = 30, **options: int) -> tuple[object, bytes]:
    """One unary call with raw bytes; returns (status code, answer)."""
    opts = [("grpc.max_send_message_length", 512 * MIB), ("grpc.max_receive_message_length", 512 * MIB)]
    with grpc.insecure_channel(target, options=opts + list(options.items())) as channel:
        try:
            return grpc.StatusCode.OK, channel.unary_unary(method)(payload, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code(), (exc.details() or "").encode()


def _log_time(proc: ServerProcess, text: str) -> float:
    """When the server logged ``text``, in seconds (from its own timestamps)."""
    line = next(line for line in proc.log if text in line)
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def alive(proc: ServerProcess) -> None:
    """The server is running and computes correctly."""
    assert proc.process.poll() is None, proc.text()
    with DistillClient(proc.target, timeout=30) as client:
        assert client.compute_total_loss(MSE, [np.ones(4)], [np.zeros(4)]).total == 1.0


def stream_call(target: str) -> tuple[grpc.Channel, object]:
    channel = grpc.insecure_channel(target)
    return channel, channel.stream_stream(
        SERVICE + "StreamLosses", response_deserializer=pb.StreamLossesResponse.FromString
    )


def config(layers: int = 1, gradients: bool = False, name: str = "") -> bytes:
    layer = pb.Layer(weight=1.0, loss=DistilLoss.mse().to_proto(), name=name)
    return pb.StreamLossesRequest(
        config=pb.StreamConfig(layers=[layer] * layers, return_gradients=gradients)
    ).SerializeToString()


def step(teachers: list[np.ndarray], students: list[np.ndarray], step_id: int = 0) -> bytes:
    return wire.build(pb.StreamLossesRequest(step_id=step_id), teachers=teachers, students=students)


# ------------------------------------------------------------------ crashes


def test_stream_cancelled_mid_step_does_not_crash(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu"])
    big = np.random.default_rng(0).standard_normal(2_000_000).astype(np.float32)

    def messages(sent: threading.Event) -> Iterator[bytes]:
        yield config()
        yield step([big], [big])
        yield step([big], [big], 1)
        sent.set()
        time.sleep(5)

    for _ in range(10):
        channel, method = stream_call(proc.target)
        with channel:
            sent = threading.Event()
            call = method(messages(sent))
            assert next(call).total_loss == 0.0  # type: ignore[call-overload]
            sent.wait(10)
            call.cancel()  # type: ignore[attr-defined]  # the second step is in flight
    with DistillClient(proc.target, timeout=30) as client:  # the bridge's close, in ordinary use
        session = client.stream(MSE)
        session.step([big], [big])
        session.close()
    alive(proc)
    assert "Fatal Python error" not in proc.text()


def test_sigterm_with_a_dead_streams_client_exits_cleanly(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--grace", "1"])
    channel, method = stream_call(proc.target)
    call = method(iter([config(), step([np.ones(3)], [np.ones(3)])]))
    next(call)  # type: ignore[call-overload]
    channel.close()  # the client dies with its stream open
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.text()


def test_stream_answer_over_the_message_limit_is_a_step_error(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--max-message-mb", "1", "--max-layers", "5000"])
    layers = 4000
    channel, method = stream_call(proc.target)
    one, zero = [np.ones(1)] * layers, [np.zeros(1)] * layers  # a step of 120 kB, its answer 1.08 MB
    with channel:
        call = method(iter([config(layers, gradients=True, name="n" * 230), step(one, zero, 7), step(one, zero, 8)]))
        for step_id in (7, 8):  # the stream goes on after a step that failed
            answer = next(call)  # type: ignore[call-overload]
            assert answer.step_id == step_id
            error = from_rich_status(answer.error)
            assert isinstance(error, MessageTooLarge), error
            assert "--max-message-mb" in error.message
    alive(proc)


# ------------------------------------------------------------------ cost proportional to what is admitted


def test_millions_of_empty_tensors_are_refused_before_they_are_built(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--max-message-mb", "16"])
    before = peak_mib(proc)
    request = pb.ComputeTotalLossRequest(layers=[pb.Layer(weight=1.0, loss=DistilLoss.mse().to_proto())])
    payload = request.SerializeToString() + b"\x12\x00" * 8_000_000  # 16 MB of empty teachers
    code, details = raw_call(proc.target, SERVICE + "ComputeTotalLoss", payload)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert b"--max-layers" in details
    code, details = raw_call(proc.target, SERVICE + "ComputeTotalLoss", b"\x28\x01" * 8_000_000)  # unknown fields
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    # The request itself is held three times at most (gRPC's buffer, the bytes, the reservation's estimate).
    assert peak_mib(proc) - before < 100
    alive(proc)


def test_ranks_and_error_texts_are_bounded(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu"])
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 10_000, data=b"\0" * 4)
    payload = pb.ComputeLayerLossRequest(
        layers=[pb.Layer(weight=1.0, loss=DistilLoss.mse().to_proto())], teacher=tensor, student=tensor
    ).SerializeToString()
    code, details = raw_call(proc.target, SERVICE + "ComputeLayerLoss", payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert b"10000 dimensions; expected at most 32" in details
    name = "x" * 10_000
    payload = pb.ComputeTotalLossRequest(
        layers=[pb.Layer(weight=1.0, loss=DistilLoss.mse().to_proto(), name=name)]
    ).SerializeToString()
    code, details = raw_call(proc.target, SERVICE + "ComputeTotalLoss", payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and b"expected at most 256" in details
    huge = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[7] * 32, data=b"\0" * (7 * MIB))
    payload = pb.ComputeLayerLossRequest(
        layers=[pb.Layer(weight=1.0, loss=DistilLoss.mse().to_proto())], teacher=huge, student=huge
    ).SerializeToString()
    code, details = raw_call(proc.target, SERVICE + "ComputeLayerLoss", payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) <= 1024
    proc.wait_for_lines("call failed: rpc=Compute", 3)
    alive(proc)
    assert max(len(line) for line in proc.log) < 4096


def test_unauthenticated_calls_are_refused_without_reading_them(start_server: type[ServerProcess], tmp_path) -> None:  # type: ignore[no-untyped-def]
    token = tmp_path / "token"
    token.write_text("s3cret")
    proc = start_server(["--device", "cpu", "--auth-token-file", str(token)])
    before = peak_mib(proc)
    payload = b"\0" * (200 * MIB)
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda _: raw_call(proc.target, SERVICE + "ComputeTotalLoss", payload)[0], range(12)))
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 12
    assert peak_mib(proc) - before < 64  # twelve reads would be 2.4 GB (7 GB with the copies)
    assert proc.process.poll() is None


def test_stalled_uploads_hold_at_most_the_budget_and_time_out(start_server: type[ServerProcess]) -> None:
    proc = start_server(
        ["--device", "cpu", "--max-message-mb", "32", "--max-inflight-mb", "256", "--receive-timeout", "2"]
    )
    before = peak_mib(proc)
    proxies = [StallingProxy(proc.port, 24 * MIB) for _ in range(20)]  # each stalls at 24 of 30 MB
    channels = [
        grpc.insecure_channel(f"127.0.0.1:{p.port}", options=[("grpc.max_send_message_length", 64 * MIB)])
        for p in proxies
    ]
    try:
        calls = [c.unary_unary(SERVICE + "ComputeTotalLoss").future(b"\0" * (30 * MIB)) for c in channels]
        # The stalled client hears nothing (its own socket is stuck): the server's log tells.
        proc.wait_for_lines("call failed: rpc=ComputeTotalLoss", 20)
        failures = [line for line in proc.log if "call failed: rpc=ComputeTotalLoss" in line]
        peak = peak_mib(proc) - before
    finally:
        for proxy in proxies:  # first: a channel stuck in a write closes once its socket is gone
            proxy.close()
        for call, channel in zip(calls, channels, strict=True):
            call.cancel()
            channel.close()
    # Stalled mid-message: the receive timeout; waiting for room meanwhile: the budget.
    assert all("--receive-timeout" in line or "--max-inflight-mb" in line for line in failures), failures
    assert any("--receive-timeout" in line for line in failures)
    # The budget (256 MiB: two reads of 3 x 32 MiB at once, here stalled at 24 MiB each) and the flow-control
    # windows of the calls waiting for it; without the budget, 20 x 24 MiB = 480 MiB.
    assert peak < 256 + 64, peak
    alive(proc)


def test_answers_not_taken_are_dropped_after_the_receive_timeout(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--receive-timeout", "2", "--metrics-port", "0"])
    proxy = StallingProxy(proc.port, None, download=1 << 20)  # the 32 MB gradient never gets through
    channel = grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=[("grpc.max_receive_message_length", 64 * MIB)])
    x = np.ones(8 * MIB, np.float32)
    payload = wire.build(
        pb.ComputeTotalLossRequest(
            layers=[pb.Layer(weight=1.0, loss=DistilLoss.mse().to_proto())], return_gradients=True
        ),
        teachers=[x],
        students=[x * 0],
    )
    call = channel.unary_unary(SERVICE + "ComputeTotalLoss").future(payload)
    try:
        proc.wait_for_lines("the answer was not taken within 2 s (--receive-timeout)", 1)
        # The call is over on the server: its reservation is back.
        metrics = scrape(proc)
        assert metrics["distill_inflight_bytes"] == 0.0
        assert metrics['distill_requests_total{code="DEADLINE_EXCEEDED",rpc="ComputeTotalLoss"}'] == 1.0
    finally:
        proxy.close()
        call.cancel()
        channel.close()
    alive(proc)


def test_a_call_without_a_request_is_invalid_argument(server: InProcessServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        for rpc in ("ComputeLayerLoss", "ComputeTotalLoss", "GetServerInfo"):
            with pytest.raises(grpc.RpcError) as info:
                list(channel.stream_stream(SERVICE + rpc)(iter([]), timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, info.value)
            assert "without a request message" in (info.value.details() or "")


def test_budget_bounds_memory_of_concurrent_large_calls(start_server: type[ServerProcess]) -> None:
    proc = start_server(
        ["--device", "cpu", "--max-message-mb", "64", "--max-inflight-mb", "256", "--receive-timeout", "300"]
    )
    before = peak_mib(proc)
    x = np.random.default_rng(1).standard_normal(7 * MIB).astype(np.float32)  # 2 x 28 MiB a call
    with DistillClient(proc.target, timeout=120) as client, ThreadPoolExecutor(12) as pool:
        totals = list(pool.map(lambda _: client.compute_total_loss(MSE, [x], [x * 0]).total, range(12)))
    expected = float(np.mean(x.astype(np.float64) ** 2))
    assert totals == pytest.approx([expected] * 12, rel=1e-12)
    # The budget bounds the bytes alive: 256 MiB (two reads of 64 MiB at once and the 128 MiB kept for the
    # copy gRPC is making). RSS also keeps what glibc retains of gRPC's freed receive buffers, up to about
    # as much again. Without the budget the twelve calls are received at once: about 940 MiB here.
    growth = peak_mib(proc) - before
    assert growth < 2 * 256, growth
    alive(proc)


# ------------------------------------------------------------------ silent and idle clients


def test_silent_streams_cannot_lock_out_other_calls(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--max-concurrent-streams", "4", "--receive-timeout", "5"])
    channel, method = stream_call(proc.target)
    with channel:
        silent = threading.Event()

        def nothing() -> Iterator[bytes]:
            silent.wait(30)
            return
            yield

        calls = [method(nothing()) for _ in range(16)]
        # All sixteen have reached the server once twelve were refused: four hold every stream slot.
        proc.wait_for_lines("call failed: rpc=StreamLosses code=RESOURCE_EXHAUSTED", 12)
        with DistillClient(proc.target, timeout=30) as client:  # unary calls have slots of their own
            assert client.server_info().version == __version__
            assert client.compute_total_loss(MSE, [np.ones(4)], [np.zeros(4)]).total == 1.0
        codes = []
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                next(call)  # type: ignore[call-overload]
            codes.append(info.value.code())
        silent.set()
    # Four were admitted and timed out waiting for their first message; the rest found no slot.
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 4, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 12, codes
    alive(proc)


def test_calls_per_connection_are_limited(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--max-streams-per-connection", "2", "--log-level", "DEBUG"])
    channel, method = stream_call(proc.target)
    with channel:
        release = [threading.Event() for _ in range(3)]

        def wait_for(event: threading.Event) -> Iterator[bytes]:
            yield config()
            event.wait(30)

        calls = [method(wait_for(event)) for event in release]
        proc.wait_for_lines("call started: rpc=StreamLosses", 2)
        time.sleep(0.5)
        assert proc.text().count("call started: rpc=StreamLosses") == 2  # the third waits at the client
        release[0].set()
        proc.wait_for_lines("call started: rpc=StreamLosses", 3)  # admitted once the first is over
        for event in release:
            event.set()
        for call in calls:
            assert list(call) == []  # type: ignore[call-overload]
    alive(proc)


def test_an_idle_stream_is_ended(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--stream-idle-timeout", "1"])
    with DistillClient(proc.target, timeout=30) as client:
        session = client.stream(MSE)
        assert session.step([np.ones(3)], [np.zeros(3)]).total == 1.0
        proc.wait_for_lines("call failed: rpc=StreamLosses code=DEADLINE_EXCEEDED", 1)  # the server ended it
        with pytest.raises(DeadlineExceeded) as info:
            session.step([np.ones(3)], [np.zeros(3)])
    assert "--stream-idle-timeout" in info.value.message
    alive(proc)


# ------------------------------------------------------------------ abandoned work


@pytest.mark.parametrize(
    ("transport", "loss", "shapes"),
    [
        ("grpc", DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW), [(4, 4 * MIB)] * 2),  # 64 MiB a tensor
        ("shm", DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW), [(4, 4 * MIB)] * 2),
        ("grpc", DistilLoss.similarity_preserving(), [(2048, 4096), (2048, 2048)]),  # Gram matrices in blocks
    ],
    ids=["grpc", "shm", "grpc-gram"],
)
def test_cancelled_calls_stop_computing(
    start_server: type[ServerProcess], transport: str, loss: DistilLoss, shapes: list[tuple[int, int]]
) -> None:
    proc = start_server(["--device", "cpu", "--workers", "2"])
    rng = np.random.default_rng(2)
    t, s = (rng.standard_normal(shape).astype(np.float32) for shape in shapes)
    layers = [(1.0, loss)]
    with DistillClient(proc.target, timeout=120, transport=transport) as client:
        client.compute_total_loss(layers, [t], [s], gradients=True)  # regions and pools in place
        start, began = cpu_seconds(proc), time.perf_counter()
        client.compute_total_loss(layers, [t], [s], gradients=True)
        full, wall = cpu_seconds(proc) - start, time.perf_counter() - began
        start = cpu_seconds(proc)
        for _ in range(6):  # each cancelled by its deadline a quarter of the way through
            with pytest.raises(DeadlineExceeded):
                client.compute_total_loss(layers, [t], [s], gradients=True, timeout=wall / 4)
        time.sleep(1.0)
        abandoned = cpu_seconds(proc) - start
    assert abandoned < 6 * full / 2, (abandoned, full)
    alive(proc)


def test_drain_drops_queued_work_with_unavailable_within_grace(start_server: type[ServerProcess]) -> None:
    # An upload stalled mid-message holds the whole budget (32 MB: 96 less the two messages gRPC may be
    # copying), so six calls wait for room and make no progress, however fast the machine: all are still
    # waiting when the grace period ends, as is the stalled upload and a stream idle between steps.
    budget = ["--max-message-mb", "32", "--max-inflight-mb", "96", "--metrics-port", "0"]
    proc = start_server(["--device", "cpu", "--grace", "1", "--log-level", "DEBUG", *budget])
    proxy = StallingProxy(proc.port, 1 * MIB)
    channel = grpc.insecure_channel(f"127.0.0.1:{proxy.port}")
    stalled = channel.unary_unary(SERVICE + "ComputeTotalLoss").future(b"\0" * (2 * MIB))
    streaming = DistillClient(proc.target, timeout=120, retries=0)
    errors: list[BaseException] = []

    def call() -> None:
        with DistillClient(proc.target, timeout=120, retries=0) as client:
            try:
                client.compute_total_loss(MSE, [np.ones(3)], [np.zeros(3)])
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(6)]
    try:
        eventually(lambda: scrape(proc)["distill_inflight_bytes"] == 32 * MIB, what="the stalled upload's reservation")
        session = streaming.stream(MSE)
        assert session.step([np.ones(3)], [np.zeros(3)]).total == 1.0
        for thread in threads:
            thread.start()
        proc.wait_for_lines("call started: rpc=ComputeTotalLoss", 7)
        proc.signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert proc.wait(30) == 0, proc.text()
        exited = time.monotonic() - stopped
        for thread in threads:
            thread.join(30)
        with pytest.raises(Unavailable) as info:
            session.step([np.ones(3)], [np.zeros(3)])
        errors.append(info.value)
    finally:
        proxy.close()
        stalled.cancel()
        channel.close()
        streaming.close()
    assert len(errors) == 7 and all(isinstance(error, Unavailable) for error in errors), errors
    assert all("--grace" in str(error) for error in errors), [str(e) for e in errors if "--grace" not in str(e)]
    # The stalled client hears nothing (its socket is stuck): the server's log tells.
    dropped = [line for line in proc.log if "call failed: rpc=ComputeTotalLoss code=UNAVAILABLE" in line]
    assert len(dropped) == 7, proc.text()
    assert exited < 10
    # From the drain's start to the process's end: the grace period, the half second before gRPC cancels
    # what is left, and the exit.
    drained = [_log_time(proc, "draining:"), _log_time(proc, "INFO distill_server: stopped")]
    assert drained[1] - drained[0] < 1 + 1.0, (drained, exited)


# ------------------------------------------------------------------ malformed bytes on every RPC


@pytest.fixture(scope="module")
def metered() -> Iterator[ServerProcess]:
    """A server with metrics, for the malformed-bytes tests."""
    proc = ServerProcess(["--device", "cpu", "--metrics-port", "0"])
    yield proc
    proc.stop()
    assert proc.process.returncode == 0, proc.text()
    assert "Traceback" not in proc.text() and " ERROR " not in proc.text()


@pytest.mark.parametrize(
    ("method", "rpc"),
    [
        (SERVICE + "GetServerInfo", "GetServerInfo"),
        ("/grpc.health.v1.Health/Check", "Check"),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "ServerReflectionInfo"),
    ],
)
def test_malformed_bytes_are_invalid_argument(metered: ServerProcess, method: str, rpc: str) -> None:
    garbage = b"\xff\xff\xff\xff"
    counted = f'distill_requests_total{{code="INVALID_ARGUMENT",rpc="{rpc}"}}'
    before = scrape(metered).get(counted, 0.0)
    with grpc.insecure_channel(metered.target) as channel:
        if "Reflection" in method:
            call = channel.stream_stream(method)(iter([garbage]), timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                list(call)
        else:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(method)(garbage, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert "malformed request" in (info.value.details() or "")
    assert scrape(metered)[counted] == before + 1
    metered.wait_for_lines(f"call failed: rpc={rpc} code=INVALID_ARGUMENT", 1)
    assert "Traceback" not in metered.text() and " ERROR " not in metered.text()
    with grpc.insecure_channel(metered.target) as channel:  # still answers the well-formed
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check", response_deserializer=health_pb2.HealthCheckResponse.FromString
        )
        assert check(health_pb2.HealthCheckRequest().SerializeToString(), timeout=10).status == 1


def test_per_row_losses_hold_a_few_times_their_request(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu"])
    before = peak_mib(proc)
    rng = np.random.default_rng(4)
    t = rng.standard_normal((2, 8_000_000)).astype(np.float16)  # rows wider than any block; 64 MB a request
    loss = [(1.0, DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW))]
    with DistillClient(proc.target, timeout=120) as client:
        result = client.compute_total_loss(loss, [t], [t[::-1]], gradients=True)
    assert result.layers[0].gradient.dtype == np.float16
    # gRPC's three copies while handing the request over, the gradient and the answer holding it:
    # about 5 x 64 MB (16 x before the engine worked on rows in column chunks).
    assert peak_mib(proc) - before < 6 * 64, peak_mib(proc) - before


def test_huge_temperature_is_an_error_not_internal(client: DistillClient) -> None:
    x = np.linspace(-1, 1, 64)
    for loss in (DistilLoss.kl_divergence(1e200), DistilLoss.combined(0.5, 0.5, 1e200)):
        try:
            client.compute_total_loss([(1.0, loss)], [x], [x[::-1]], gradients=True)
        except Exception as exc:
            assert getattr(exc, "code", None) in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT), exc


# ------------------------------------------------------------------ the budget itself


def test_budget_serves_in_order_and_times_out() -> None:
    async def scenario() -> None:
        budget = Budget(100, "--max-inflight-mb")
        first = await budget.reserve(60, 1)
        order: list[str] = []

        async def take(name: str, nbytes: int) -> None:
            reservation = await budget.reserve(nbytes, 5)
            order.append(name)
            await asyncio.sleep(0.01)
            reservation.release()

        waiting = [asyncio.ensure_future(take("big", 80)), asyncio.ensure_future(take("small", 10))]
        await asyncio.sleep(0.01)
        assert budget.waiting == 2  # the small one waits behind the big one: no starvation
        with pytest.raises(LimitExceeded):
            await budget.reserve(50, 0.01)
        first.release()
        await asyncio.gather(*waiting)
        assert order == ["big", "small"]
        assert budget.used == 0 and budget.waiting == 0
        with pytest.raises(LimitExceeded, match="at most 100"):
            await budget.reserve(101, 1)
        held = await budget.reserve(90, 1)
        held.shrink(95)  # never grows
        assert budget.used == 90
        held.shrink(5)
        assert budget.used == 5
        held.release()
        held.release()
        assert budget.used == 0

    asyncio.run(scenario())


def test_cancelled_wait_gives_nothing_away() -> None:
    async def scenario() -> None:
        budget = Budget(10, "--max-inflight-mb")
        held = await budget.reserve(10, 1)
        waiter = asyncio.ensure_future(budget.reserve(5, 5))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        held.release()
        assert budget.used == 0 and budget.waiting == 0

    asyncio.run(scenario())


def test_work_raises_its_first_error() -> None:
    work = Work()
    work.check()
    work.abandon(Unavailable("first"))
    work.abandon(Unavailable("second"))
    with pytest.raises(Unavailable, match="first"):
        work.check()
