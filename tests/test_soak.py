"""Soak: minutes of mixed load against one real server, then its memory,
threads, health and log.

Skipped unless ``DISTILL_SOAK=1`` (``make soak``): the default run shows it
as skipped with the reason. ``DISTILL_SOAK_SECONDS`` sets the measured
duration (default 60 s), after a warm-up of half of it, at most 30 s (the
server's memory settles within about a minute of this load).

Eight client threads run at once:

- small unary calls (one to three layers of every loss kind, up to 4096
  elements), their values checked against NumPy;
- large unary calls (1 to 4 MiB tensors, gradients sometimes), computed in
  the server's worker threads, their values checked;
- two threads of streams that run a few steps and then end normally, stop
  sending early, or are cancelled in the middle;
- bad requests (garbage bytes, NaN, mismatched counts, unknown dtypes);
- large calls with deadlines of 1 to 20 ms, which expire in flight;
- connection churn: a new channel per call to GetServerInfo and health.

Every answer must be one the operation allows (DEADLINE_EXCEEDED only for
the tiny deadlines, CANCELLED only for the streams the client cancelled).
At the end the server must be alive, compute a known loss exactly, have
logged no ERROR or traceback, and its resident memory and thread count must
not have grown past the bounds below since the warm-up.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from distill.v1 import distill_pb2 as pb
from tests.fuzzing import log_errors
from tests.servers import ServerProcess

DURATION = float(os.environ.get("DISTILL_SOAK_SECONDS") or 60)
WARM_UP = min(30.0, DURATION / 2)

RSS_GROWTH_BOUND = 64 * 1024 * 1024
"""The median resident memory of the run's last quarter may exceed that of
the warm-up's second half by at most 64 MiB. The warm-up has already run
every kind of call at its largest (a 4 MiB tensor pair is some 40 MiB of
request, float64 work arrays and gradient at once, and two such calls can
be in flight), so what remains is allocator noise: glibc keeps freed blocks
in per-thread arenas, and RSS swings by 50 to 150 MiB within seconds under
this load, which the medians smooth. A leak of one large call's tensors
each time (~900 calls in the default minute on two cores), or of a few kB
per call or stream (~25 000 a minute), passes 64 MiB."""

THREAD_GROWTH_BOUND = 4
"""Threads may grow by at most 4 after the warm-up: the worker pool
(``--workers``), gRPC's pollers and the default executor are all started by
then; a thread per stream or per connection that is never reaped is not."""

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(os.environ.get("DISTILL_SOAK") != "1", reason="soak test: set DISTILL_SOAK=1 (make soak)"),
    pytest.mark.timeout(DURATION + WARM_UP + 240),
]

SERVICE = "/distill.v1.DistillService/"
Code = grpc.StatusCode
CALL_TIMEOUT = 60.0


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def rss_bytes(pid: int) -> int:
    value, unit = proc_status(pid)["VmRSS"].split()
    assert unit == "kB"
    return int(value) * 1024


def thread_count(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=array.shape, data=array.astype("<f4").tobytes())


MSE = pb.Loss(mse=pb.Loss.Mse())
LOSSES = [
    MSE,
    pb.Loss(cosine=pb.Loss.Cosine()),
    pb.Loss(kl_divergence=pb.Loss.KlDivergence(temperature=2.0)),
    pb.Loss(combined_kl_mse=pb.Loss.CombinedKlMse(kl_weight=0.3, mse_weight=0.7, temperature=4.0)),
    pb.Loss(kl_divergence=pb.Loss.KlDivergence(temperature=1.0), reduction=pb.REDUCTION_PER_ROW),
]


def mse(t: np.ndarray, s: np.ndarray) -> float:
    return float(np.mean((t.astype(np.float64) - s.astype(np.float64)) ** 2))


class Load:
    """The client threads, their counts and what they found wrong."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.stop = threading.Event()
        self.counts: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []
        self.lock = threading.Lock()
        self.channels = [grpc.insecure_channel(target) for _ in range(2)]

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.problems) < 100:
                self.problems.append(text)

    def expect(self, what: str, code: Code, allowed: set[Code], details: str = "") -> None:
        self.count(f"{what} {code.name}")
        if code not in allowed:
            self.problem(f"{what}: {code.name} ({details})")

    def unary(
        self, channel: grpc.Channel, method: str, payload: bytes, timeout: float = CALL_TIMEOUT
    ) -> tuple[Code, bytes, str]:
        """The status, the answer (empty on error) and the error's details."""
        try:
            return Code.OK, channel.unary_unary(SERVICE + method)(payload, timeout=timeout), ""
        except grpc.RpcError as error:
            return error.code(), b"", error.details() or ""

    def loop(self, name: str, seed: int, body: Callable[[np.random.Generator], None]) -> threading.Thread:
        def run() -> None:
            rng = np.random.default_rng(seed)
            while not self.stop.is_set():
                try:
                    body(rng)
                except Exception as exc:  # a bug in the test or an unexpected answer
                    self.problem(f"{name}: {type(exc).__name__}: {exc}")
                    time.sleep(0.1)

        thread = threading.Thread(target=run, name=f"soak-{name}", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------ the operations

    def small_unary(self, rng: np.random.Generator) -> None:
        count = int(rng.integers(1, 4))
        size = int(rng.integers(1, 4097))
        losses = [LOSSES[int(i)] for i in rng.integers(0, len(LOSSES), count)]
        teachers = [rng.standard_normal((4, size // 4 + 1)).astype(np.float32) for _ in range(count)]
        students = [t + rng.standard_normal(t.shape).astype(np.float32) for t in teachers]
        request = pb.ComputeTotalLossRequest(
            layers=[pb.Layer(weight=0.5, loss=loss, name=f"l{i}") for i, loss in enumerate(losses)],
            teachers=[tensor(t) for t in teachers],
            students=[tensor(s) for s in students],
        )
        code, answer, details = self.unary(self.channels[0], "ComputeTotalLoss", request.SerializeToString())
        self.expect("small", code, {Code.OK}, details)
        if code is not Code.OK:
            return
        response = pb.ComputeTotalLossResponse.FromString(answer)
        assert len(response.layer_losses) == count
        assert math.isclose(response.total_loss, sum(r.weighted_loss for r in response.layer_losses), rel_tol=1e-9)
        for loss, t, s, result in zip(losses, teachers, students, response.layer_losses, strict=True):
            assert math.isfinite(result.loss)
            if loss is MSE:
                assert math.isclose(result.loss, mse(t, s), rel_tol=1e-6), (result.loss, mse(t, s))

    def large_request(self, rng: np.random.Generator) -> tuple[pb.ComputeLayerLossRequest, float]:
        size = int(rng.integers(256 * 1024, 1024 * 1024))
        teacher = rng.standard_normal(size).astype(np.float32)
        student = (teacher + rng.standard_normal(size).astype(np.float32)).astype(np.float32)
        request = pb.ComputeLayerLossRequest(
            layers=[pb.Layer(weight=2.0, loss=MSE)],
            teacher=tensor(teacher),
            student=tensor(student),
            return_gradients=bool(rng.integers(0, 2)),
        )
        return request, mse(teacher, student)

    def large_unary(self, rng: np.random.Generator) -> None:
        request, expected = self.large_request(rng)
        code, answer, details = self.unary(self.channels[1], "ComputeLayerLoss", request.SerializeToString())
        self.expect("large", code, {Code.OK}, details)
        if code is not Code.OK:
            return
        result = pb.ComputeLayerLossResponse.FromString(answer).layer_loss
        assert math.isclose(result.loss, expected, rel_tol=1e-6), (result.loss, expected)
        assert result.HasField("student_gradient") == request.return_gradients

    def stream(self, rng: np.random.Generator) -> None:
        steps = int(rng.integers(1, 20))
        ending = ["complete", "half-close", "cancel"][int(rng.integers(0, 3))]
        stop_after = int(rng.integers(0, steps))
        config = pb.StreamLossesRequest(config=pb.StreamConfig(layers=[pb.Layer(weight=1.0, loss=MSE)]))
        width = int(rng.integers(1, 512))
        data = [rng.standard_normal((2, width)).astype(np.float32) for _ in range(steps + 1)]

        def messages() -> Iterator[bytes]:
            yield config.SerializeToString()
            for i in range(steps):
                if ending == "half-close" and i == stop_after:
                    return
                step = pb.StreamLossesRequest(step_id=i, teachers=[tensor(data[i])], students=[tensor(data[i + 1])])
                yield step.SerializeToString()

        call = self.channels[int(rng.integers(0, 2))].stream_stream(SERVICE + "StreamLosses")(
            messages(), timeout=CALL_TIMEOUT
        )
        received = 0
        try:
            for answer in call:
                response = pb.StreamLossesResponse.FromString(answer)
                assert response.step_id == received and not response.HasField("error"), response
                assert math.isclose(response.total_loss, mse(data[received], data[received + 1]), rel_tol=1e-6)
                received += 1
                if ending == "cancel" and received > stop_after:
                    call.cancel()
                    break
        except grpc.RpcError as error:
            self.expect(f"stream {ending}", error.code(), {Code.CANCELLED} if ending == "cancel" else set())
            return
        if ending == "cancel":
            self.count("stream cancel CANCELLED")
            return
        expected = stop_after if ending == "half-close" else steps
        assert received == expected, f"stream {ending}: {received} answers, expected {expected}"
        self.count(f"stream {ending} OK")

    def bad(self, rng: np.random.Generator) -> None:
        kind = int(rng.integers(0, 4))
        t = tensor(np.ones(8, np.float32))
        if kind == 0:
            payload = rng.bytes(int(rng.integers(1, 64)))
        elif kind == 1:
            nan = tensor(np.array([np.nan] * 8, np.float32))
            payload = pb.ComputeTotalLossRequest(layers=[pb.Layer(weight=1, loss=MSE)], teachers=[nan], students=[t])
            payload = payload.SerializeToString()
        elif kind == 2:
            payload = pb.ComputeTotalLossRequest(layers=[pb.Layer(weight=1, loss=MSE)] * 2, teachers=[t], students=[t])
            payload = payload.SerializeToString()
        else:
            odd = pb.Tensor(dtype=77, shape=[8], data=bytes(32))
            payload = pb.ComputeTotalLossRequest(layers=[pb.Layer(weight=1, loss=MSE)], teachers=[odd], students=[t])
            payload = payload.SerializeToString()
        code, _, details = self.unary(self.channels[0], "ComputeTotalLoss", payload)
        # random bytes may happen to be a valid message with zero layers: a total of 0
        allowed = {Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE, Code.RESOURCE_EXHAUSTED} | (
            {Code.OK} if kind == 0 else set()
        )
        self.expect(f"bad{kind}", code, allowed, details)

    def deadline(self, rng: np.random.Generator) -> None:
        request, _ = self.large_request(rng)
        timeout = float(rng.uniform(0.001, 0.02))
        code, _, details = self.unary(self.channels[1], "ComputeLayerLoss", request.SerializeToString(), timeout)
        self.expect("deadline", code, {Code.OK, Code.DEADLINE_EXCEEDED}, details)

    def churn(self, rng: np.random.Generator) -> None:
        with grpc.insecure_channel(self.target) as channel:
            info = pb.GetServerInfoResponse.FromString(
                channel.unary_unary(SERVICE + "GetServerInfo")(b"", timeout=CALL_TIMEOUT)
            )
            assert info.device == "cpu"
            health = channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=CALL_TIMEOUT)
            assert health_pb2.HealthCheckResponse.FromString(health).status == health_pb2.HealthCheckResponse.SERVING
        self.count("churn OK")

    def start(self) -> list[threading.Thread]:
        plan: list[tuple[str, Callable[[np.random.Generator], None]]] = [
            ("small-0", self.small_unary),
            ("small-1", self.small_unary),
            ("large", self.large_unary),
            ("stream-0", self.stream),
            ("stream-1", self.stream),
            ("bad", self.bad),
            ("deadline", self.deadline),
            ("churn", self.churn),
        ]
        return [self.loop(name, seed, body) for seed, (name, body) in enumerate(plan)]


def known_loss(target: str) -> float:
    request = pb.ComputeLayerLossRequest(
        layers=[pb.Layer(weight=2.0, loss=MSE)],
        teacher=tensor(np.float32([1, 2, 3])),
        student=tensor(np.float32([1, 2, 5])),
    )
    with grpc.insecure_channel(target) as channel:
        answer = channel.unary_unary(SERVICE + "ComputeLayerLoss")(request.SerializeToString(), timeout=30)
    return float(pb.ComputeLayerLossResponse.FromString(answer).layer_loss.weighted_loss)


def median(values: list[int]) -> int:
    return sorted(values)[len(values) // 2]


def test_soak() -> None:
    process = ServerProcess(["--device", "cpu", "--workers", "4", "--max-message-mb", "16"])
    pid = process.process.pid
    load = Load(process.target)
    samples: list[tuple[float, int, int]] = []  # (seconds, RSS in MiB, threads), once a second
    failures: list[str] = []
    try:
        threads = load.start()
        start = time.monotonic()

        def sample() -> None:
            try:
                rss, count = rss_bytes(pid), thread_count(pid)
            except (KeyError, OSError):  # a dead process has no VmRSS, then no /proc entry
                rss = count = -1
            if rss < 0 or process.process.poll() is not None:
                process.process.wait(10)
                pytest.fail(
                    f"the server exited ({process.process.returncode}) after {time.monotonic() - start:.1f} s; "
                    f"calls: {dict(load.counts)}; log:\n{process.text()[-3000:]}"
                )
            samples.append((round(time.monotonic() - start, 1), rss // 2**20, count))

        while time.monotonic() - start < WARM_UP + DURATION:
            time.sleep(1)
            sample()
        load.stop.set()
        for thread in threads:
            thread.join(CALL_TIMEOUT + 10)

        # RSS swings by tens of MiB from one second to the next with the calls
        # in flight: compare medians under load, the end of the warm-up with
        # the last quarter of the run. A leak moves the median with time.
        warm = [sample for sample in samples if WARM_UP / 2 <= sample[0] <= WARM_UP]
        last = [sample for sample in samples if sample[0] >= WARM_UP + DURATION * 3 / 4]
        warm_rss, last_rss = median([rss for _, rss, _ in warm]), median([rss for _, rss, _ in last])
        warm_threads, last_threads = max(t for _, _, t in warm), max(t for _, _, t in last)
        summary = (
            f"median RSS {warm_rss} MiB after the warm-up, {last_rss} MiB in the last quarter; threads "
            f"{warm_threads} then {last_threads}; samples (s, MiB, threads): {samples}; calls: {dict(load.counts)}"
        )
        print(summary)
        if load.problems:
            failures.append(f"{len(load.problems)} unexpected answers, the first:\n" + "\n".join(load.problems[:10]))
        if known_loss(process.target) != 8 / 3:
            failures.append("the known loss is wrong after the soak")
        if (last_rss - warm_rss) * 2**20 > RSS_GROWTH_BOUND:
            failures.append(f"resident memory grew by {last_rss - warm_rss} MiB: {summary}")
        if last_threads - warm_threads > THREAD_GROWTH_BOUND:
            failures.append(f"threads grew from {warm_threads} to {last_threads}: {summary}")
        for kind in ("small OK", "large OK", "stream complete OK", "stream cancel CANCELLED", "churn OK"):
            if not load.counts[kind]:
                failures.append(f"no {kind!r} call: {summary}")
    finally:
        load.stop.set()
        for channel in load.channels:
            channel.close()
        process.stop()
    if process.process.returncode != 0:
        failures.append(f"exit status {process.process.returncode}:\n{process.text()[-3000:]}")
    errors = log_errors(process.log)
    if errors:
        failures.append(errors)
    assert not failures, "\n\n".join(failures)
