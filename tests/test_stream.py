"""StreamLosses: a training loop's steps over one stream, against a real server."""

from __future__ import annotations

import gc
import math
import signal
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from distill.v1 import distill_pb2 as pb
from distill_client import (
    DeadlineExceeded,
    DimensionMismatch,
    DistillClient,
    DistilLoss,
    InvalidArgument,
    NonFiniteInput,
    Reduction,
    RemoteFeatureDistiller,
    Unavailable,
)
from distill_core import wire
from distill_core.errors import Cancelled, DistillError, from_rpc_error
from distill_server.config import ServerConfig
from tests.reference import reference
from tests.servers import InProcessServer, ServerProcess, eventually

LAYERS = [(0.5, DistilLoss.mse()), (2.0, DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW))]


def step_data(step: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(step)
    teachers = [rng.normal(size=(3, 7)).astype(np.float32) for _ in LAYERS]
    return teachers, [t + rng.normal(size=t.shape).astype(np.float32) for t in teachers]


def reference_total(teachers: list[np.ndarray], students: list[np.ndarray]) -> float:
    """The total of :data:`LAYERS` in float64: MSE, and the mean of the rows' KL."""
    (mse_weight, mse), (kl_weight, per_row) = LAYERS
    flat = DistilLoss.kl_divergence(per_row.temperature)
    rows = [reference(flat, t, s) for t, s in zip(teachers[1], students[1], strict=True)]
    return mse_weight * reference(mse, teachers[0], students[0]) + kl_weight * math.fsum(rows) / len(rows)


def test_hundreds_of_steps_with_a_bad_one_in_the_middle(client: DistillClient) -> None:
    with client.stream(LAYERS) as session:
        for step in range(300):
            teachers, students = step_data(step)
            if step == 150:
                with pytest.raises(DimensionMismatch) as info:
                    session.step(teachers, students[:1])
                assert (info.value.expected, info.value.got) == (2, 1)
                continue
            if step == 151:
                students[1][2, 3] = np.nan
                with pytest.raises(NonFiniteInput) as nan_info:
                    session.step(teachers, students)
                assert (nan_info.value.layer, nan_info.value.index) == (1, 17)
                continue
            result = session.step(teachers, students)
            assert result.step_id == step
            expected = 0.5 * reference(LAYERS[0][1], teachers[0], students[0])
            assert result.layers[0].weighted_loss == pytest.approx(expected, rel=1e-12)
            assert result.total == pytest.approx(math_sum(result), rel=1e-15)
            assert result.total == pytest.approx(reference_total(teachers, students), rel=1e-11)


def math_sum(result: object) -> float:
    return sum(layer.weighted_loss for layer in result.layers)  # type: ignore[attr-defined]


def test_stream_gradients_equal_unary_gradients(client: DistillClient) -> None:
    teachers, students = step_data(7)
    unary = client.compute_total_loss(LAYERS, teachers, students, gradients=True)
    with client.stream(LAYERS, gradients=True) as session:
        streamed = session.step(teachers, students, step_id=1234)
    assert streamed.step_id == 1234
    assert streamed.total == unary.total
    for a, b in zip(streamed.layers, unary.layers, strict=True):
        assert a.gradient is not None and b.gradient is not None
        assert a.gradient.dtype == np.float32 and a.gradient.shape == (3, 7)
        np.testing.assert_array_equal(a.gradient, b.gradient)


def test_closing_a_stream_frees_it_and_the_server_goes_on(
    start_in_process: Callable[[ServerConfig], InProcessServer],
) -> None:
    server = start_in_process(ServerConfig(port=0, device="cpu", workers=1))

    def streams_open() -> float:
        return server.sample("distill_requests_in_flight", rpc="StreamLosses")

    def received() -> float:
        return server.sample("distill_received_bytes_total", rpc="StreamLosses")

    with DistillClient(server.target, timeout=30, transport="grpc") as client:  # steps through the socket
        session = client.stream(LAYERS)
        for step in range(5):
            session.step(*step_data(step))
        assert streams_open() == 1
        session.close()
        eventually(lambda: streams_open() == 0, what="the server letting the closed stream go")
        assert server.sample("distill_stream_steps_total", code="OK") == 5
        with pytest.raises(Unavailable):
            session.step(*step_data(0))
        # A stream closed from another thread with a large step in flight is
        # released too, and the step reports the cancellation. The server's one
        # worker is held, so the step cannot be answered before the close.
        cancelled = client.stream(LAYERS)
        cancelled.step(*step_data(0))
        release = threading.Event()
        held = server.server.executor.submit(release.wait, 60)
        big = [np.ones((4096, 1024), np.float32)] * 2  # 2 x 2 x 16 MiB: computed in the worker, not inline
        before = received()
        outcome: list[BaseException] = []

        def run_step() -> None:
            try:
                cancelled.step(big, big)
            except DistillError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run_step)
        thread.start()
        try:
            eventually(lambda: received() > before + 4 * big[0].nbytes, what="the server receiving the large step")
            cancelled.close()
            thread.join(30)
            assert len(outcome) == 1 and type(outcome[0]) is Cancelled
            eventually(lambda: streams_open() == 0, what="the server letting the cancelled stream go")
        finally:
            release.set()
            held.result(30)
            thread.join(30)
        teachers, students = step_data(1)
        total = client.compute_total_loss(LAYERS, teachers, students).total
        assert total == pytest.approx(reference_total(teachers, students), rel=1e-11)


def raw_stream(server: InProcessServer, messages: list[bytes]) -> list[pb.StreamLossesResponse]:
    with grpc.insecure_channel(server.target) as channel:
        method = channel.stream_stream(
            "/distill.v1.DistillService/StreamLosses", response_deserializer=pb.StreamLossesResponse.FromString
        )
        return list(method(iter(messages), timeout=30))


def test_a_stream_must_start_with_its_config(server: InProcessServer) -> None:
    step = wire.build(pb.StreamLossesRequest(step_id=1), teachers=[np.ones(3)], students=[np.ones(3)])
    with pytest.raises(grpc.RpcError) as info:
        raw_stream(server, [step])
    error = from_rpc_error(info.value)
    assert type(error) is InvalidArgument and error.field == "config"


def test_the_first_message_carries_no_labels(server: InProcessServer) -> None:
    loss = DistilLoss.response(DistilLoss.mse(), 1.0, 0.0)
    config = pb.StreamConfig(layers=[pb.Layer(weight=1.0, loss=loss.to_proto())])
    first = pb.StreamLossesRequest(config=config, labels={0: pb.Labels(classes=[1])})
    with pytest.raises(grpc.RpcError) as info:
        raw_stream(server, [first.SerializeToString()])
    error = from_rpc_error(info.value)
    assert type(error) is InvalidArgument and error.field == "config" and "only config" in error.message


def test_config_in_a_later_message_fails_that_step_only(server: InProcessServer) -> None:
    config = pb.StreamConfig(layers=[pb.Layer(weight=1.0, loss=DistilLoss.mse().to_proto())])
    good = wire.build(pb.StreamLossesRequest(step_id=2), teachers=[np.ones(3)], students=[np.zeros(3)])
    responses = raw_stream(
        server,
        [
            pb.StreamLossesRequest(config=config).SerializeToString(),
            pb.StreamLossesRequest(step_id=1, config=config).SerializeToString(),
            good,
        ],
    )
    assert [r.step_id for r in responses] == [1, 2]
    assert responses[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not responses[1].HasField("error") and responses[1].total_loss == 1.0


def test_the_distiller_opens_a_session_with_its_layers(client: DistillClient) -> None:
    distiller = RemoteFeatureDistiller([(w, loss) for w, loss in LAYERS], client=client)
    teachers, students = step_data(3)
    with distiller.stream(gradients=True) as session:
        result = session.step(teachers, students)
    assert result.total == pytest.approx(distiller.compute_total_loss(teachers, students), rel=1e-15)
    assert all(layer.gradient is not None for layer in result.layers)


@pytest.mark.parametrize("bound", ["step_timeout", "client timeout"])
def test_a_step_without_an_answer_ends_the_stream_at_its_step_timeout(
    start_server: type[ServerProcess], bound: str
) -> None:
    """A paused server answers nothing: the step raises DeadlineExceeded
    after its bound instead of waiting as long as the stream lasts."""
    proc = start_server(["--device", "cpu"])
    t = np.ones((2, 8), np.float32)
    timeout, step_timeout = (60.0, 1.0) if bound == "step_timeout" else (1.0, None)
    with DistillClient(proc.target, timeout=timeout) as client:
        session = client.stream(LAYERS, step_timeout=step_timeout)
        assert session.step([t, t], [t, t]).total == 0.0
        proc.process.send_signal(signal.SIGSTOP)
        try:
            began = time.monotonic()
            with pytest.raises(DeadlineExceeded, match=r"step 1 got no answer within 1 s \(step_timeout\)"):
                session.step([t, t], [t, t])
            assert 1.0 <= time.monotonic() - began < 4.0  # at its bound, not at the stream's
            assert session.closed
        finally:
            proc.process.send_signal(signal.SIGCONT)
        # The server, resumed, serves the client's next stream.
        with client.stream(LAYERS) as again:
            assert again.step([t, t], [t * 2, t * 2]).total > 0.0


def _watchdogs() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "distill-step-watchdog"]


def test_a_session_bounds_its_steps_with_one_thread(client: DistillClient) -> None:
    # Not a timer a step: starting a thread cost about 0.1 ms of each step's latency.
    t = np.ones((2, 8), np.float32)
    before = set(_watchdogs())
    with client.stream(LAYERS, step_timeout=30.0) as session:
        threads = threading.active_count()
        for _ in range(20):
            assert session.step([t, t], [t, t]).total == 0.0
            assert threading.active_count() == threads
        (watchdog,) = set(_watchdogs()) - before
    watchdog.join(timeout=5)
    assert not watchdog.is_alive()  # closing the session ends it


def test_a_session_dropped_unclosed_ends_its_stream_and_watchdog(client: DistillClient) -> None:
    t = np.ones((2, 8), np.float32)
    before = set(_watchdogs())
    session = client.stream(LAYERS, step_timeout=30.0)
    assert session.step([t, t], [t, t]).total == 0.0
    (watchdog,) = set(_watchdogs()) - before
    call = session._responses
    del session
    gc.collect()
    watchdog.join(timeout=5)
    assert not watchdog.is_alive()
    assert call.cancelled()  # type: ignore[attr-defined]  # the server's side is freed too


@pytest.mark.parametrize("bound", [0.0, -1.0, math.nan])
def test_a_step_bound_must_be_positive(client: DistillClient, bound: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        client.stream(LAYERS, step_timeout=bound)
    with DistillClient(client.target, timeout=bound) as zero, pytest.raises(ValueError, match="client's timeout"):
        zero.stream(LAYERS)
