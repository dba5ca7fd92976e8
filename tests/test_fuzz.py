"""Fuzzing every RPC of one real server with generated and mutated requests.

Each test sends a few thousand requests (raw bytes over a real channel:
``channel.unary_unary(path)`` without serializers sends them as they are)
and holds every answer to the contract:

- the status is one the service documents: OK, INVALID_ARGUMENT,
  OUT_OF_RANGE, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, NOT_FOUND (a
  shared-memory region, file or ticket this server does not hold; the health
  of an unknown service), PERMISSION_DENIED only for a refused shared-memory
  file, UNIMPLEMENTED only for unknown methods.
  Never UNKNOWN or INTERNAL (a handler that raised), never a deadline;
- an OK answer parses, its losses are finite, its totals add up, its
  gradients are well-formed tensors; a stream answers every step in order
  and a failed step carries a documented code;
- afterwards the server is alive, healthy, computes a known loss exactly
  and has logged no ERROR and no traceback.

The examples are derandomized (the same inputs on every run, for CI) and
kept few enough for the whole module to take under a minute. For a longer
run, ``make fuzz`` (``DISTILL_FUZZ_EXAMPLES`` examples per test;
``DISTILL_FUZZ_RANDOM=1`` draws new inputs each run, and a failure prints
the ``@reproduce_failure`` blob that replays it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from distill.v1 import distill_pb2 as pb
from tests import fuzzing
from tests.servers import ServerProcess

EXAMPLES = int(os.environ.get("DISTILL_FUZZ_EXAMPLES") or 0)
"""Examples per test; 0: each test's default (the whole module in well under a minute)."""

CALL_TIMEOUT = 20.0
"""Seconds per call: the largest fuzz request computes in milliseconds, so
only a hung server reaches it (and DEADLINE_EXCEEDED fails the test)."""

pytestmark = [
    pytest.mark.fuzz,
    pytest.mark.timeout(max(300, EXAMPLES // 10)),
    # A failing input of a few hundred kB is reported all the same.
    pytest.mark.filterwarnings("ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning"),
]

SERVICE = "/distill.v1.DistillService/"
LAYER_LOSS = SERVICE + "ComputeLayerLoss"
TOTAL_LOSS = SERVICE + "ComputeTotalLoss"
STREAM = SERVICE + "StreamLosses"
SERVER_INFO = SERVICE + "GetServerInfo"
HEALTH = "/grpc.health.v1.Health/"
REFLECTION_V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"

Code = grpc.StatusCode
ALLOWED = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.OUT_OF_RANGE,
        Code.RESOURCE_EXHAUSTED,
        Code.FAILED_PRECONDITION,
        Code.NOT_FOUND,  # a tensor in shared memory that names no region of this server
    }
)
"""The statuses the service documents for a request, whatever its bytes."""
STEP_CODES = frozenset(code.value[0] for code in ALLOWED - {Code.OK})
"""The codes a failed stream step may carry in its ``error``."""
HEALTH_CHECK_ALLOWED = ALLOWED | {Code.NOT_FOUND}
HEALTH_LIST_ALLOWED = ALLOWED | {Code.UNIMPLEMENTED}
"""grpc.health.v1.Health/List is in the health proto the server registers,
but grpcio-health-checking's asyncio servicer does not implement it.
UNIMPLEMENTED, what a server without List answers, is accepted there and
nowhere else; like every answer, it must not log an error."""

SERVING = health_pb2.HealthCheckResponse.SERVING


def fuzz_settings(default: int) -> settings:
    """``default`` examples (or ``DISTILL_FUZZ_EXAMPLES``), the same ones every run.

    The default run reports the first failing input as it is: shrinking it
    can take minutes of calls. The long run shrinks it to a small one.
    """
    phases = tuple(Phase) if EXAMPLES else (Phase.explicit, Phase.reuse, Phase.generate, Phase.target)
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        derandomize=os.environ.get("DISTILL_FUZZ_RANDOM") != "1",
        database=None,
        phases=phases,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


# ------------------------------------------------------------------ the server


class Fuzz:
    """One server, one channel, and the checks every test ends with."""

    def __init__(self, process: ServerProcess, channel: grpc.Channel) -> None:
        self.process = process
        self.channel = channel
        listing = self.reflect([reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()])[0]
        services = reflection_pb2.ServerReflectionResponse.FromString(listing).list_services_response.service
        self.services = {service.name for service in services}

    def unary(self, path: str, payload: bytes) -> tuple[Code, bytes | None, str]:
        try:
            return Code.OK, self.channel.unary_unary(path)(payload, timeout=CALL_TIMEOUT), ""
        except grpc.RpcError as error:
            self.assert_alive(f"{path} with {show(payload)}")
            return error.code(), None, error.details() or ""

    def assert_alive(self, after: str) -> None:
        """Fail at once, with the log's end, if the server has exited."""
        if self.process.process.poll() is not None:
            status, log = self.process.process.returncode, self.process.text()[-5000:]
            pytest.fail(f"the server exited ({status}) after {after}:\n{log}")

    def reflect(self, messages: Sequence[bytes], path: str = REFLECTION_V1ALPHA) -> list[bytes]:
        return list(self.channel.stream_stream(path)(iter(messages), timeout=CALL_TIMEOUT))

    def run(self, check: Callable[[], None]) -> None:
        """Run a Hypothesis test, then check that the server survived it."""
        start = len(self.process.log)
        check()
        self.assert_alive("the test")
        self.assert_computes()
        assert_clean_log(self.process.log[start:])

    def assert_computes(self) -> None:
        """A known loss, exactly; the server healthy."""
        request = pb.ComputeLayerLossRequest(
            layers=[pb.Layer(weight=2.0, loss=pb.Loss(mse=pb.Loss.Mse()), name="known")],
            teacher=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], data=np.float32([1, 2, 3]).tobytes()),
            student=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], data=np.float32([1, 2, 5]).tobytes()),
        )
        code, answer, details = self.unary(LAYER_LOSS, request.SerializeToString())
        assert code is Code.OK, f"the known computation failed: {code.name} {details}"
        result = pb.ComputeLayerLossResponse.FromString(answer or b"").layer_loss
        assert (result.name, result.loss, result.weighted_loss) == ("known", 4 / 3, 8 / 3)
        code, answer, details = self.unary(HEALTH + "Check", b"")
        assert code is Code.OK, f"health check failed: {code.name} {details}"
        assert health_pb2.HealthCheckResponse.FromString(answer or b"").status == SERVING


def assert_clean_log(lines: Sequence[str]) -> None:
    errors = fuzzing.log_errors(lines)
    assert not errors, errors


@pytest.fixture(scope="module")
def fuzz() -> Iterator[Fuzz]:
    """One server with small limits, so that the fuzz requests reach them."""
    process = ServerProcess(
        [
            "--device",
            "cpu",
            "--workers",
            "2",
            "--max-message-mb",
            "4",
            "--max-layers",
            "64",
            "--max-elements",
            "100000",
        ]
    )
    try:
        with grpc.insecure_channel(process.target) as channel:
            yield Fuzz(process, channel)
    finally:
        process.stop()
    assert process.process.returncode == 0, process.text()[-5000:]
    assert_clean_log(process.log)


# ------------------------------------------------------------------ the checks


def show(payload: bytes) -> str:
    """A request's bytes, for the failure message (long ones shortened)."""
    text = payload.hex()
    if len(text) > 1200:
        text = f"{text[:600]}...{text[-200:]}"
    return f"{len(payload)} bytes: {text}"


def allowed(path: str, code: Code, details: str, request: str, codes: frozenset[Code] = ALLOWED) -> None:
    """``code`` is one of ``codes``; ``request`` describes what was sent."""
    assert code in codes, f"{path} answered {code.name} ({details!r}) to {request}"


def parse(message_type: type[Message], payload: bytes) -> Any:
    try:
        return message_type.FromString(payload)
    except DecodeError:
        return None


def check_gradient(tensor: pb.Tensor, where: str) -> None:
    dtype = fuzzing.DTYPES.get(tensor.dtype)
    assert dtype is not None, f"{where}: gradient of dtype {tensor.dtype}"
    assert all(d >= 0 for d in tensor.shape), f"{where}: gradient shape {list(tensor.shape)}"
    assert len(tensor.data) == math.prod(tensor.shape) * dtype.itemsize, f"{where}: gradient data length"


def check_layer_loss(result: pb.LayerLoss, gradients: bool | None, where: str) -> None:
    assert math.isfinite(result.loss), f"{where}: loss {result.loss} answered OK"
    assert math.isfinite(result.weighted_loss), f"{where}: weighted loss {result.weighted_loss} answered OK"
    if gradients is not None:
        assert result.HasField("student_gradient") == gradients, f"{where}: gradient presence"
    if result.HasField("student_gradient"):
        check_gradient(result.student_gradient, where)


def check_total(total: float, results: Sequence[pb.LayerLoss], where: str) -> None:
    weighted = [r.weighted_loss for r in results]
    assert math.isfinite(total), f"{where}: total {total} answered OK"
    assert [r.layer_index for r in results] == list(range(len(results))), f"{where}: layer order"
    try:
        expected = math.fsum(weighted)
    except OverflowError:  # a total past float64 is LOSS_OVERFLOW, not OK
        expected = math.inf
    tolerance = 1e-12 * len(weighted) * max(map(abs, weighted), default=0.0)
    assert math.isclose(total, expected, rel_tol=1e-12, abs_tol=tolerance), f"{where}: total {total} != {expected}"


def check_layer_loss_answer(payload: bytes, answer: bytes) -> None:
    where = f"ComputeLayerLoss OK for {show(payload)}"
    result = pb.ComputeLayerLossResponse.FromString(answer).layer_loss
    request = parse(pb.ComputeLayerLossRequest, payload)
    check_layer_loss(result, None if request is None else request.return_gradients, where)
    if request is not None:
        assert 0 <= request.layer_index < len(request.layers), where
        assert result.layer_index == request.layer_index, where
        assert result.name == request.layers[request.layer_index].name, where


def check_total_loss_answer(payload: bytes, answer: bytes) -> None:
    where = f"ComputeTotalLoss OK for {show(payload)}"
    response = pb.ComputeTotalLossResponse.FromString(answer)
    request = parse(pb.ComputeTotalLossRequest, payload)
    gradients = None if request is None else request.return_gradients
    for result in response.layer_losses:
        check_layer_loss(result, gradients, where)
    check_total(response.total_loss, response.layer_losses, where)
    if request is not None:
        assert len(response.layer_losses) == len(request.layers), where
        assert [r.name for r in response.layer_losses] == [layer.name for layer in request.layers], where


# ------------------------------------------------------------------ known failures
# Inputs that broke the server once, run first on every run (Hypothesis's
# explicit examples) whatever the generators draw.


def _tensor(values: list[float]) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[len(values)], data=np.float32(values).tobytes())


def _layer(loss: pb.Loss) -> pb.Layer:
    return pb.Layer(weight=1.0, loss=loss)


NO_TERM = pb.Loss(combined_kl_mse=pb.Loss.CombinedKlMse(kl_weight=0.0, mse_weight=0.0, temperature=0.5))
"""A combined loss with both factors 0: its gradient was never assigned (INTERNAL)."""
HOT_KL = pb.Loss(kl_divergence=pb.Loss.KlDivergence(temperature=1e155))
"""tau**2 overflowed Python's float power (INTERNAL OverflowError)."""
T, S = _tensor([1, 2, 3]), _tensor([1, 2, 5])
MSE_CONFIG = pb.StreamLossesRequest(config=pb.StreamConfig(layers=[_layer(pb.Loss(mse=pb.Loss.Mse()))]))
STEP = pb.StreamLossesRequest(step_id=7, teachers=[T], students=[S])
NO_TERM_CONFIG = pb.StreamLossesRequest(config=pb.StreamConfig(layers=[_layer(NO_TERM)], return_gradients=True))


def _bytes(*messages: Message) -> list[bytes]:
    return [message.SerializeToString() for message in messages]


# ------------------------------------------------------------------ the tests


def test_compute_layer_loss(fuzz: Fuzz) -> None:
    @fuzz_settings(450)
    @given(fuzzing.layer_loss_payloads())
    @example(_bytes(pb.ComputeLayerLossRequest(layers=[_layer(NO_TERM)], teacher=T, student=S, return_gradients=True)))
    @example(_bytes(pb.ComputeLayerLossRequest(layers=[_layer(HOT_KL)], teacher=T, student=T)))
    def check(payloads: list[bytes]) -> None:
        for payload in payloads:
            code, answer, details = fuzz.unary(LAYER_LOSS, payload)
            allowed(LAYER_LOSS, code, details, show(payload))
            if answer is not None:
                check_layer_loss_answer(payload, answer)

    fuzz.run(check)


def test_compute_total_loss(fuzz: Fuzz) -> None:
    @fuzz_settings(350)
    @given(fuzzing.total_loss_payloads())
    @example(
        _bytes(pb.ComputeTotalLossRequest(layers=[_layer(NO_TERM)], teachers=[T], students=[S], return_gradients=True))
    )
    @example(_bytes(pb.ComputeTotalLossRequest(layers=[_layer(HOT_KL)], teachers=[T], students=[S])))
    def check(payloads: list[bytes]) -> None:
        for payload in payloads:
            code, answer, details = fuzz.unary(TOTAL_LOSS, payload)
            allowed(TOTAL_LOSS, code, details, show(payload))
            if answer is not None:
                check_total_loss_answer(payload, answer)

    fuzz.run(check)


def test_stream_losses(fuzz: Fuzz) -> None:
    @fuzz_settings(350)
    @given(fuzzing.stream_scripts())
    # An empty step ended the stream (OK, later steps unanswered).
    @example((_bytes(MSE_CONFIG, pb.StreamLossesRequest(), STEP), [False] * 3, None))
    # Cancelled with steps queued: the server crashed (SIGSEGV), not every time.
    @example((_bytes(MSE_CONFIG, *[STEP] * 30), [False] * 31, 1))
    @example((_bytes(MSE_CONFIG, *[STEP] * 30), [False] * 31, 2))
    @example((_bytes(MSE_CONFIG, *[STEP] * 30), [False] * 31, 3))
    @example((_bytes(MSE_CONFIG, *[STEP] * 30), [False] * 31, 5))
    @example((_bytes(NO_TERM_CONFIG, STEP), [False] * 2, None))
    def check(script: tuple[list[bytes], list[bool], int | None]) -> None:
        messages, changed, cancel_after = script
        described = "stream of " + ", ".join(show(m) for m in messages)
        call = fuzz.channel.stream_stream(STREAM)(iter(messages), timeout=CALL_TIMEOUT)
        responses: list[bytes] = []
        code = Code.OK
        try:
            if cancel_after == 0:
                call.cancel()
            for response in call:
                responses.append(response)
                if cancel_after is not None and len(responses) >= cancel_after:
                    call.cancel()
                    break
        except grpc.RpcError as error:
            fuzz.assert_alive(described)
            code = error.code()
            if cancel_after is None:
                allowed(STREAM, code, error.details() or "", described)
        assert code is not Code.OK or cancel_after is not None or len(responses) == max(0, len(messages) - 1), (
            f"StreamLosses ended OK after {len(responses)} answers to {len(messages) - 1} steps: {described}"
        )
        for i, answer in enumerate(responses):
            step = messages[i + 1]
            where = f"StreamLosses step {i} of {described}"
            response = pb.StreamLossesResponse.FromString(answer)
            request = parse(pb.StreamLossesRequest, step)
            if response.HasField("error"):
                assert response.error.code in STEP_CODES, f"{where}: step error {response.error}"
                assert not response.layer_losses and response.total_loss == 0, where
                expected_ids = {0} if request is None else {0, request.step_id}
                if not changed[i + 1]:
                    expected_ids = {request.step_id}
                assert response.step_id in expected_ids, where
                continue
            assert request is not None, f"{where}: OK for bytes protobuf does not parse"
            assert response.step_id == request.step_id, where
            for result in response.layer_losses:
                check_layer_loss(result, None, where)
            check_total(response.total_loss, response.layer_losses, where)

    fuzz.run(check)


def test_get_server_info(fuzz: Fuzz) -> None:
    @fuzz_settings(500)
    @given(fuzzing.server_info_payloads())
    @example([b"\x00", b"\xff"])  # undecodable: UNKNOWN
    def check(payloads: list[bytes]) -> None:
        for payload in payloads:
            code, answer, details = fuzz.unary(SERVER_INFO, payload)
            allowed(SERVER_INFO, code, details, show(payload))
            if answer is not None:
                info = pb.GetServerInfoResponse.FromString(answer)
                assert info.device == "cpu" and info.max_message_bytes == 4 * 1024 * 1024

    fuzz.run(check)


SHARED_MEMORY_ALLOWED = ALLOWED | {Code.PERMISSION_DENIED}
"""Registrations name files, which may be refused (PERMISSION_DENIED)."""


@pytest.fixture
def shm_key() -> Iterator[str]:
    """A file a client may register: in /dev/shm, mode 0600, 4096 bytes."""
    path = Path("/dev/shm") / f"distill-fuzz-{os.getpid()}"
    path.touch(0o600)
    os.truncate(path, 4096)
    yield path.name
    path.unlink()


def test_shared_memory(fuzz: Fuzz, shm_key: str) -> None:
    register, unregister, status = (
        SERVICE + name for name in ("RegisterSharedMemory", "UnregisterSharedMemory", "GetSharedMemoryStatus")
    )

    @fuzz_settings(300)
    @given(fuzzing.registration_payloads([shm_key]), fuzzing.handle_payloads())
    @example([b"\x00", b"\x0a\x01\xff"], [b"\x00"])  # undecodable
    def check(registrations: list[bytes], handles: list[bytes]) -> None:
        for payload in registrations:
            lease = fuzz.channel.unary_stream(register)(payload, timeout=CALL_TIMEOUT)
            try:
                region = pb.RegisterSharedMemoryResponse.FromString(next(lease))
                asked = pb.RegisterSharedMemoryRequest.FromString(payload).system
                assert (asked.key, region.byte_size) == (shm_key, asked.byte_size) and 0 < asked.byte_size <= 4096
                code, answer, details = fuzz.unary(
                    status, pb.GetSharedMemoryStatusRequest(regions=[region.region]).SerializeToString()
                )
                assert code is Code.OK and answer is not None, details
                (held,) = pb.GetSharedMemoryStatusResponse.FromString(answer).regions
                assert (held.region, held.key, held.byte_size) == (region.region, shm_key, asked.byte_size)
            except grpc.RpcError as error:
                fuzz.assert_alive(f"{register} with {show(payload)}")
                allowed(register, error.code(), error.details() or "", show(payload), SHARED_MEMORY_ALLOWED)
            finally:
                lease.cancel()
        for payload in handles:
            for path in (unregister, status):
                code, _, details = fuzz.unary(path, payload)
                allowed(path, code, details, show(payload), SHARED_MEMORY_ALLOWED)

    fuzz.run(check)


def test_health(fuzz: Fuzz) -> None:
    known = {"", "distill.v1.DistillService"}

    @fuzz_settings(300)
    @given(fuzzing.health_payloads())
    @example([b"\x00", b"\x0a\x01\xff"])  # undecodable, a service name that is not UTF-8: UNKNOWN
    def check(payloads: list[bytes]) -> None:
        for payload in payloads:
            code, answer, details = fuzz.unary(HEALTH + "Check", payload)
            allowed(HEALTH + "Check", code, details, show(payload), HEALTH_CHECK_ALLOWED)
            request = parse(health_pb2.HealthCheckRequest, payload)
            if request is not None and code in (Code.OK, Code.NOT_FOUND):
                assert (code is Code.OK) == (request.service in known), f"{code.name} for {request.service!r}"
            if answer is not None:
                assert health_pb2.HealthCheckResponse.FromString(answer).status == SERVING
            code, answer, details = fuzz.unary(HEALTH + "List", payload)
            allowed(HEALTH + "List", code, details, show(payload), HEALTH_LIST_ALLOWED)
        # Watch answers at once, then streams changes: read the first answer, cancel.
        watch = fuzz.channel.unary_stream(HEALTH + "Watch")(payloads[-1], timeout=CALL_TIMEOUT)
        try:
            first = next(watch)
            health_pb2.HealthCheckResponse.FromString(first)
        except grpc.RpcError as error:
            fuzz.assert_alive(f"Watch with {show(payloads[-1])}")
            allowed(HEALTH + "Watch", error.code(), error.details() or "", show(payloads[-1]))
        finally:
            watch.cancel()

    fuzz.run(check)


def test_reflection(fuzz: Fuzz) -> None:
    paths = [REFLECTION_V1ALPHA] + ([REFLECTION_V1] if "grpc.reflection.v1.ServerReflection" in fuzz.services else [])

    @fuzz_settings(500)
    @given(fuzzing.reflection_streams(), st.sampled_from(paths))
    @example([b"\x00"], REFLECTION_V1ALPHA)  # undecodable: UNKNOWN
    @example([b"\x1a\x01\xff"], REFLECTION_V1ALPHA)  # a file name that is not UTF-8: UNKNOWN
    def check(messages: list[bytes], path: str) -> None:
        described = "stream of " + ", ".join(show(m) for m in messages)
        try:
            responses = fuzz.reflect(messages, path)
        except grpc.RpcError as error:
            fuzz.assert_alive(described)
            allowed(path, error.code(), error.details() or "", described)
            return
        assert len(responses) == len(messages), f"{path}: {len(responses)} answers to {described}"
        for answer in responses:
            response = reflection_pb2.ServerReflectionResponse.FromString(answer)
            if response.HasField("error_response"):
                error = response.error_response.error_code
                assert error not in (Code.UNKNOWN.value[0], Code.INTERNAL.value[0]), f"{path}: {error} for {described}"

    fuzz.run(check)


def test_unknown_methods(fuzz: Fuzz) -> None:
    known = frozenset(
        [
            *(SERVICE + name for name in fuzzing.RPC_METHOD_NAMES),
            *(HEALTH + name for name in ("Check", "List", "Watch")),
            REFLECTION_V1ALPHA,
            *([REFLECTION_V1] if "grpc.reflection.v1.ServerReflection" in fuzz.services else []),
        ]
    )

    @fuzz_settings(300)
    @given(fuzzing.method_names(known), st.binary(max_size=64))
    def check(path: str, payload: bytes) -> None:
        code, _, details = fuzz.unary(path, payload)
        assert code is Code.UNIMPLEMENTED, f"{path} answered {code.name} ({details!r}) to {show(payload)}"

    fuzz.run(check)


def test_messages_over_the_limit(fuzz: Fuzz) -> None:
    """Every RPC refuses a well-formed message past ``--max-message-mb`` (4 MiB)
    with RESOURCE_EXHAUSTED (a few explicit calls: each moves 4 MiB)."""
    count = (4 * 1024 * 1024) // 4 + 256
    big = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[count], data=bytes(4 * count))
    small = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1], data=bytes(4))
    layers = [pb.Layer(weight=1.0, loss=pb.Loss(mse=pb.Loss.Mse()))]
    padding = fuzzing.varint(1000 << 3 | 2) + fuzzing.varint(4 * count) + bytes(4 * count)  # an unknown field
    unary = {
        LAYER_LOSS: pb.ComputeLayerLossRequest(layers=layers, teacher=small, student=big).SerializeToString(),
        TOTAL_LOSS: pb.ComputeTotalLossRequest(layers=layers, teachers=[big], students=[small]).SerializeToString(),
        SERVER_INFO: padding,
        HEALTH + "Check": padding,
        HEALTH + "List": padding,
    }

    def check() -> None:
        for path, payload in unary.items():
            code, _, details = fuzz.unary(path, payload)
            assert code is Code.RESOURCE_EXHAUSTED, f"{path}: {code.name} ({details})"
        config = pb.StreamLossesRequest(config=pb.StreamConfig(layers=layers)).SerializeToString()
        step = pb.StreamLossesRequest(step_id=1, teachers=[big], students=[small]).SerializeToString()
        streams = {STREAM: [[config + padding], [config, step]], REFLECTION_V1ALPHA: [[padding]]}
        for path, conversations in streams.items():
            for messages in conversations:
                with pytest.raises(grpc.RpcError) as info:
                    list(fuzz.channel.stream_stream(path)(iter(messages), timeout=CALL_TIMEOUT))
                assert info.value.code() is Code.RESOURCE_EXHAUSTED, f"{path}: {info.value}"

    fuzz.run(check)
