"""Shared memory through the protocol itself, as a client in any language
speaks it: a file in /dev/shm registered with RegisterSharedMemory (the
call is the lease), tensors and gradients as SharedMemoryRef ranges, and
every way a client can get it wrong, with the server alive after each."""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from distill.v1 import distill_pb2 as pb
from distill_client import DistilLoss, Reduction
from distill_core import errors, rpc, tensors, wire
from distill_core.errors import DistillError, from_rpc_error
from distill_server.config import ServerConfig
from distill_server.shared_memory import SealedSocket
from tests.reference import LOSSES_BOTH_REDUCTIONS, WIRE_DTYPES, reference
from tests.servers import InProcessServer, ServerProcess, eventually

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs /dev/shm")

LOSSES, DTYPES = LOSSES_BOTH_REDUCTIONS, WIRE_DTYPES


class Shm:
    """A shared-memory file of the test's own, mapped."""

    def __init__(self, size: int, mode: int = 0o600) -> None:
        self.key = f"distill-test-{secrets.token_hex(8)}"
        self.path = SHM / self.key
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
        try:
            os.fchmod(fd, mode)  # whatever the umask
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size

    def put(self, array: np.ndarray, offset: int) -> int:
        """Copy ``array`` in at ``offset``; the offset after it, 64-aligned."""
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self.map[offset : offset + raw.nbytes] = raw.tobytes()
        return offset + (raw.nbytes + 63) // 64 * 64

    def get(self, dtype: Any, shape: tuple[int, ...], offset: int) -> np.ndarray:
        count = math.prod(shape)
        return np.frombuffer(self.map, dtype=dtype, count=count, offset=offset).reshape(shape).copy()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture
def shm() -> Iterator[Callable[..., Shm]]:
    made: list[Shm] = []

    def make(size: int, mode: int = 0o600) -> Shm:
        made.append(Shm(size, mode))
        return made[-1]

    yield make
    for region in made:
        region.remove()
        region.map.close()


@pytest.fixture
def channel(server: InProcessServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        yield channel


def call(channel: grpc.Channel, name: str, request: Any, metadata: Any = None) -> Any:
    """One unary call by the RPC table; a failure as its DistillError."""
    method = rpc.RPCS[name]
    stub = channel.unary_unary(method.path, response_deserializer=method.response.FromString)
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    try:
        return stub(payload, timeout=30, metadata=metadata)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


class Lease:
    """An open RegisterSharedMemory call: the region lives while it does."""

    def __init__(self, channel: grpc.Channel, request: pb.RegisterSharedMemoryRequest, metadata: Any = None) -> None:
        method = rpc.RPCS["RegisterSharedMemory"]
        register = channel.unary_stream(method.path, response_deserializer=method.response.FromString)
        self.call = register(request.SerializeToString(), metadata=metadata)
        try:
            self.handle = next(self.call).region
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def ended(self) -> grpc.StatusCode | None:
        """How the call ended, once it has; None while it is open."""
        return self.call.code() if not self.call.running() and self.call.done() else None

    def close(self) -> None:
        self.call.cancel()


def system(key: str, size: int) -> pb.RegisterSharedMemoryRequest:
    return pb.RegisterSharedMemoryRequest(system=pb.SystemSharedMemory(key=key, byte_size=size))


def sealed_request(ticket: str, size: int) -> pb.RegisterSharedMemoryRequest:
    return pb.RegisterSharedMemoryRequest(sealed=pb.SealedSharedMemory(ticket=ticket, byte_size=size))


def register(channel: grpc.Channel, region: Shm, size: int | None = None) -> Lease:
    return Lease(channel, system(region.key, region.size if size is None else size))


def ref(lease: Lease, offset: int, nbytes: int) -> pb.SharedMemoryRef:
    return pb.SharedMemoryRef(region=lease.handle, offset=offset, byte_size=nbytes)


def shared(lease: Lease, array: np.ndarray, offset: int) -> pb.Tensor:
    code, wired = tensors.to_wire(array)
    return pb.Tensor(dtype=code, shape=wired.shape, shared_memory=ref(lease, offset, wired.nbytes))


def expected_loss(loss: DistilLoss, t: np.ndarray, s: np.ndarray) -> float:
    """The float64 reference, per row where the loss is."""
    if loss.reduction is Reduction.PER_ROW:
        flat = DistilLoss(loss.kind, loss.temperature, loss.kl_weight, loss.mse_weight)
        return float(np.mean([reference(flat, a, b) for a, b in zip(t, s, strict=True)]))
    return reference(loss, t, s)


def layers(loss: DistilLoss, count: int = 1) -> list[pb.Layer]:
    return [pb.Layer(weight=0.5 + i, loss=loss.to_proto(), name=f"l{i}") for i in range(count)]


def features(dtype: Any, seed: int = 0, shape: tuple[int, ...] = (3, 40)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(dtype), rng.normal(size=shape).astype(dtype)


# ------------------------------------------------------------------ the numbers


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_losses_and_gradients_over_shared_memory_equal_inline(
    channel: grpc.Channel, shm: Callable[..., Shm], loss: DistilLoss, dtype: Any
) -> None:
    teachers, students = zip(*(features(dtype, seed) for seed in range(2)), strict=True)
    region = shm(1 << 16)
    offset, refs = 0, []
    for array in (*teachers, *students):
        refs.append(offset)
        offset = region.put(array, offset)
    outputs = [offset, region.put(students[0], offset)]  # room for the gradients, same sizes
    lease = register(channel, region)
    try:
        inline = call(
            channel,
            "ComputeTotalLoss",
            wire.build(
                pb.ComputeTotalLossRequest(layers=layers(loss, 2), return_gradients=True),
                teachers=teachers,
                students=students,
            ),
        )
        request = pb.ComputeTotalLossRequest(
            layers=layers(loss, 2),
            return_gradients=True,
            teachers=[shared(lease, t, o) for t, o in zip(teachers, refs[:2], strict=True)],
            students=[shared(lease, s, o) for s, o in zip(students, refs[2:], strict=True)],
            gradient_outputs=[ref(lease, o, students[0].nbytes) for o in outputs],
        )
        over_shm = call(channel, "ComputeTotalLoss", request)
    finally:
        lease.close()
    assert over_shm.total_loss == inline.total_loss  # the same bytes, the same computation
    for i, (mine, theirs) in enumerate(zip(over_shm.layer_losses, inline.layer_losses, strict=True)):
        assert (mine.loss, mine.weighted_loss, mine.name) == (theirs.loss, theirs.weighted_loss, theirs.name)
        gradient = mine.student_gradient
        assert not gradient.data and gradient.shared_memory == request.gradient_outputs[i]
        assert (gradient.dtype, tuple(gradient.shape)) == (theirs.student_gradient.dtype, students[i].shape)
        np.testing.assert_array_equal(
            region.get(dtype, students[i].shape, outputs[i]), tensors.decode(theirs.student_gradient)
        )
    expected = sum((0.5 + i) * expected_loss(loss, teachers[i], students[i]) for i in range(2))
    assert over_shm.total_loss == pytest.approx(expected, rel=1e-9)


def test_a_request_mixes_inline_and_shared_tensors(channel: grpc.Channel, shm: Callable[..., Shm]) -> None:
    (t0, s0), (t1, s1) = features(np.float32, 1), features(np.float32, 2)
    region = shm(1 << 16)
    offset_s1 = region.put(t0, 0)
    region.put(s1, offset_s1)
    lease = register(channel, region)
    try:
        mixed = wire.build(
            pb.ComputeTotalLossRequest(layers=layers(DistilLoss.cosine(), 2)),
            teachers=[shared(lease, t0, 0), t1],  # shared, then inline; the students the other way round
            students=[s0, shared(lease, s1, offset_s1)],
        )
        answer = call(channel, "ComputeTotalLoss", mixed)
    finally:
        lease.close()
    inline = call(
        channel,
        "ComputeTotalLoss",
        wire.build(
            pb.ComputeTotalLossRequest(layers=layers(DistilLoss.cosine(), 2)), teachers=[t0, t1], students=[s0, s1]
        ),
    )
    assert answer == inline


def test_layer_loss_and_stream_over_shared_memory(channel: grpc.Channel, shm: Callable[..., Shm]) -> None:
    t, s = features(np.float32, 3)
    region = shm(1 << 16)
    offset_s = region.put(t, 0)
    offset_g = region.put(s, offset_s)
    lease = register(channel, region)
    try:
        response = call(
            channel,
            "ComputeLayerLoss",
            pb.ComputeLayerLossRequest(
                layers=layers(DistilLoss.kl_divergence(2.0), 2),
                layer_index=1,
                teacher=shared(lease, t, 0),
                student=shared(lease, s, offset_s),
                return_gradients=True,
                gradient_output=ref(lease, offset_g, s.nbytes),
            ),
        )
        expected = 1.5 * reference(DistilLoss.kl_divergence(2.0), t, s)
        assert response.layer_loss.weighted_loss == pytest.approx(expected, rel=1e-6)
        gradient = region.get(np.float32, s.shape, offset_g)
        inline = call(
            channel,
            "ComputeLayerLoss",
            wire.build(
                pb.ComputeLayerLossRequest(
                    layers=layers(DistilLoss.kl_divergence(2.0), 2), layer_index=1, return_gradients=True
                ),
                teacher=t,
                student=s,
            ),
        )
        np.testing.assert_array_equal(gradient, tensors.decode(inline.layer_loss.student_gradient))

        method = rpc.STREAM_LOSSES
        stream = channel.stream_stream(method.path, response_deserializer=method.response.FromString)
        config = pb.StreamLossesRequest(config=pb.StreamConfig(layers=layers(DistilLoss.mse()), return_gradients=True))
        steps = [
            config.SerializeToString(),
            pb.StreamLossesRequest(
                step_id=7,
                teachers=[shared(lease, t, 0)],
                students=[shared(lease, s, offset_s)],
                gradient_outputs=[ref(lease, offset_g, s.nbytes)],
            ).SerializeToString(),
        ]
        (answer,) = list(stream(iter(steps), timeout=30))
        assert not answer.HasField("error"), answer.error
        assert (answer.step_id, answer.total_loss) == (7, pytest.approx(0.5 * float(np.mean((t - s) ** 2)), rel=1e-6))
        np.testing.assert_allclose(region.get(np.float32, s.shape, offset_g), 0.5 * 2 * (s - t) / s.size, rtol=1e-5)
    finally:
        lease.close()


# ------------------------------------------------------------------ registration


def test_server_info_says_how_it_shares_memory(channel: grpc.Channel) -> None:
    info = call(channel, "GetServerInfo", pb.GetServerInfoRequest()).shared_memory
    assert (info.enabled, info.directory, info.key_prefix) == (True, "/dev/shm", "distill-")
    assert (info.max_bytes, info.max_regions) == (4096 * 1024 * 1024, 64)


def refused(channel: grpc.Channel, key: str, size: int) -> DistillError:
    with pytest.raises(DistillError) as info:
        Lease(channel, system(key, size))
    return info.value


def test_registration_refuses_what_the_client_cannot_name(
    channel: grpc.Channel, shm: Callable[..., Shm], tmp_path: Path
) -> None:
    region = shm(4096)
    cases: list[tuple[str, int, type[DistillError], str]] = [
        ("other-prefix", 4096, errors.InvalidArgument, "must be 'distill-'"),
        ("distill-../etc/passwd", 4096, errors.InvalidArgument, "must be 'distill-'"),
        ("distill-", 4096, errors.InvalidArgument, "must be 'distill-'"),
        (region.key, 0, errors.InvalidArgument, "byte_size is 0"),
        (region.key, -1, errors.InvalidArgument, "byte_size is -1"),
        (f"distill-absent-{secrets.token_hex(8)}", 4096, errors.RegionNotFound, "no file"),
        (region.key, 4097, errors.RegionOutOfBounds, "holds 4096 bytes; the region needs 4097"),
    ]
    for key, size, kind, text in cases:
        error = refused(channel, key, size)
        assert type(error) is kind and text in error.message, (key, size, error)
    assert errors.RegionNotFound.code is grpc.StatusCode.NOT_FOUND
    assert errors.RegionOutOfBounds.code is grpc.StatusCode.OUT_OF_RANGE


def test_registration_refuses_links_fifos_and_files_open_to_others(
    channel: grpc.Channel, shm: Callable[..., Shm], tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 4096)
    secret.chmod(0o600)
    link = SHM / f"distill-link-{secrets.token_hex(8)}"
    fifo = SHM / f"distill-fifo-{secrets.token_hex(8)}"
    os.symlink(secret, link)
    os.mkfifo(fifo, 0o600)
    try:
        for path, text in ((link, "cannot be opened"), (fifo, "is not a regular file")):
            error = refused(channel, path.name, 16)
            assert isinstance(error, errors.RegionRefused) and text in error.message, error
            assert error.code is grpc.StatusCode.PERMISSION_DENIED
            assert str(secret) not in error.message  # nothing of what lies behind
        open_to_all = shm(4096, mode=0o644)
        error = refused(channel, open_to_all.key, 4096)
        assert isinstance(error, errors.RegionRefused) and "mode 644" in error.message
    finally:
        link.unlink()
        fifo.unlink()
    assert call(channel, "GetServerInfo", pb.GetServerInfoRequest()).version  # alive


def test_the_call_is_the_lease(server: InProcessServer, channel: grpc.Channel, shm: Callable[..., Shm]) -> None:
    region = shm(1 << 16)
    region.remove()  # the name may go at once: the server holds the file
    with pytest.raises(errors.RegionNotFound):
        register(channel, region)  # ... but only once it has opened it
    region = shm(1 << 16)
    first, second = register(channel, region), register(channel, region)
    region.remove()
    status = call(channel, "GetSharedMemoryStatus", pb.GetSharedMemoryStatusRequest(regions=[second.handle]))
    assert [(r.region, r.key, r.byte_size) for r in status.regions] == [(second.handle, region.key, 1 << 16)]
    assert server.sample("distill_shared_memory_regions") == 2
    t, s = features(np.float32)
    region.put(t, 0)
    region.put(s, 4096)
    request = pb.ComputeTotalLossRequest(
        layers=layers(DistilLoss.mse()), teachers=[shared(first, t, 0)], students=[shared(first, s, 4096)]
    )
    assert call(channel, "ComputeTotalLoss", request).total_loss == pytest.approx(
        0.5 * reference(DistilLoss.mse(), t, s)
    )

    call(channel, "UnregisterSharedMemory", pb.UnregisterSharedMemoryRequest(region=first.handle))
    eventually(lambda: first.ended() is grpc.StatusCode.OK, what="the lease ended with OK")
    second.close()  # a client that cancels, or goes away
    eventually(lambda: server.sample("distill_shared_memory_regions") == 0, what="both regions released")
    assert server.sample("distill_shared_memory_bytes") == 0
    for handle in (first.handle, second.handle):
        with pytest.raises(errors.RegionNotFound):
            call(channel, "ComputeTotalLoss", request)
        with pytest.raises(errors.RegionNotFound):
            call(channel, "UnregisterSharedMemory", pb.UnregisterSharedMemoryRequest(region=handle))
        with pytest.raises(errors.RegionNotFound) as info:
            call(channel, "GetSharedMemoryStatus", pb.GetSharedMemoryStatusRequest(regions=[handle]))
        assert info.value.field == "regions[0]" and handle not in info.value.message


def test_regions_are_bounded_in_number_and_bytes(
    start_in_process: Callable[[ServerConfig], InProcessServer], shm: Callable[..., Shm]
) -> None:
    from distill_server.config import Limits

    limits = Limits(max_shared_memory_bytes=1 << 20, max_shared_memory_regions=2)
    running = start_in_process(ServerConfig(port=0, device="cpu", limits=limits))
    with grpc.insecure_channel(running.target) as channel:
        big = shm(1 << 20)
        error = refused(channel, big.key, (1 << 20) + 1)  # more than the file, and than the limit
        assert isinstance(error, errors.LimitExceeded) and (error.limit, error.got) == (1 << 20, (1 << 20) + 1)
        small = shm(4096)
        leases = [register(channel, small), register(channel, small)]
        error = refused(channel, small.key, 4096)
        assert isinstance(error, errors.LimitExceeded) and (error.limit, error.got) == (2, 3)
        leases.pop().close()
        eventually(lambda: running.sample("distill_shared_memory_regions") == 1)
        leases.append(register(channel, small))  # room again
        for lease in leases:
            lease.close()


def test_a_server_without_shared_memory_says_so(
    start_in_process: Callable[[ServerConfig], InProcessServer], shm: Callable[..., Shm]
) -> None:
    running = start_in_process(ServerConfig(port=0, device="cpu", shared_memory_dir=None))
    with grpc.insecure_channel(running.target) as channel:
        assert not call(channel, "GetServerInfo", pb.GetServerInfoRequest()).shared_memory.enabled
        error = refused(channel, shm(4096).key, 4096)
        assert isinstance(error, errors.SharedMemoryDisabled) and error.code is grpc.StatusCode.FAILED_PRECONDITION


def test_registration_needs_the_token(
    start_in_process: Callable[[ServerConfig], InProcessServer], shm: Callable[..., Shm]
) -> None:
    running = start_in_process(ServerConfig(port=0, device="cpu", auth_token="s3cret"))
    region = shm(4096)
    with grpc.insecure_channel(running.target) as channel:
        assert isinstance(refused(channel, region.key, 4096), errors.Unauthenticated)
        for name, request in (
            ("UnregisterSharedMemory", pb.UnregisterSharedMemoryRequest(region="x")),
            ("GetSharedMemoryStatus", pb.GetSharedMemoryStatusRequest(regions=["x"])),
        ):
            with pytest.raises(errors.Unauthenticated):
                call(channel, name, request)
        lease = Lease(channel, system(region.key, 4096), metadata=[("authorization", "Bearer s3cret")])
        lease.close()


# ------------------------------------------------------------------ bad ranges


@pytest.fixture
def lease(channel: grpc.Channel, shm: Callable[..., Shm]) -> Iterator[tuple[Lease, Shm]]:
    region = shm(1 << 16)
    held = register(channel, region)
    yield held, region
    held.close()


def loss_call(channel: grpc.Channel, teacher: pb.Tensor, student: Any, **fields: Any) -> Any:
    request = pb.ComputeLayerLossRequest(layers=layers(DistilLoss.mse()), **fields)
    return call(channel, "ComputeLayerLoss", wire.build(request, teacher=teacher, student=student))


def test_bad_ranges_are_typed_errors(channel: grpc.Channel, lease: tuple[Lease, Shm]) -> None:
    held, _ = lease
    t = np.ones(16, np.float32)

    def tensor(region: str = held.handle, offset: int = 0, nbytes: int = 64, data: bytes = b"") -> pb.Tensor:
        shared_ref = pb.SharedMemoryRef(region=region, offset=offset, byte_size=nbytes)
        return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[16], data=data, shared_memory=shared_ref)

    cases: list[tuple[pb.Tensor, type[DistillError], str]] = [
        (tensor(region="0" * 32), errors.RegionNotFound, "teacher.shared_memory.region"),
        (tensor(offset=(1 << 16) - 63), errors.RegionOutOfBounds, "teacher.shared_memory"),
        (tensor(offset=2**64 - 1), errors.RegionOutOfBounds, "teacher.shared_memory"),
        (tensor(nbytes=2**64 - 1), errors.MessageTooLarge, ""),
        (tensor(nbytes=60), errors.InvalidArgument, "teacher.data"),
        (tensor(data=b"\0" * 64), errors.InvalidArgument, "teacher"),
    ]
    for teacher, kind, field in cases:
        with pytest.raises(DistillError) as info:
            loss_call(channel, teacher, t)
        assert type(info.value) is kind and info.value.field == (field or info.value.field), info.value
    with pytest.raises(errors.InvalidArgument) as info:
        loss_call(channel, tensor(), t, gradient_output=pb.SharedMemoryRef(region=held.handle, byte_size=64))
    assert "no gradients are asked for" in info.value.message
    with pytest.raises(errors.InvalidArgument) as info:
        output = pb.SharedMemoryRef(region=held.handle, offset=128, byte_size=32)
        loss_call(channel, tensor(), t, return_gradients=True, gradient_output=output)
    assert info.value.field == "gradient_output.byte_size"
    assert loss_call(channel, tensor(), t).layer_loss.loss == 1.0  # zeros against ones: alive, and right


def test_a_region_cut_shorter_is_an_error_of_its_call_only(channel: grpc.Channel, lease: tuple[Lease, Shm]) -> None:
    held, region = lease
    t = np.ones(1024, np.float32)
    teacher = shared(held, t, 8192)
    region.put(t, 8192)
    assert loss_call(channel, teacher, t).layer_loss.loss == 0.0
    os.truncate(region.path, 8192 + 100)  # the client cuts its file after registering it
    with pytest.raises(errors.RegionTruncated) as info:
        loss_call(channel, teacher, t)
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION and info.value.field == "teacher.shared_memory"
    output = pb.SharedMemoryRef(region=held.handle, offset=8192, byte_size=t.nbytes)
    with pytest.raises(errors.RegionTruncated):
        loss_call(channel, shared(held, t, 0), t, return_gradients=True, gradient_output=output)
    assert os.stat(region.path).st_size == 8192 + 100  # a gradient never grows the file
    assert call(channel, "GetServerInfo", pb.GetServerInfoRequest()).version


def test_truncating_regions_during_calls_never_crashes_the_server(
    start_server: type[ServerProcess], shm: Callable[..., Shm]
) -> None:
    """A server that mapped client files would die of SIGBUS here; this one
    reads by descriptor, so every call ends with its loss or REGION_TRUNCATED."""
    proc = start_server(["--device", "cpu", "--workers", "2"])
    size = 16 << 20
    t = np.random.default_rng(0).normal(size=size // 8).astype(np.float32)
    outcomes: dict[str, int] = {}
    with grpc.insecure_channel(proc.target) as channel:
        for round in range(6):
            region = shm(size)
            region.put(t, 0)
            region.put(t, size // 2)
            held = register(channel, region)
            # The cut lands at a different point of the calls each round.
            cutter = threading.Timer(0.002 * round, os.truncate, (region.path, 4096))
            cutter.start()
            for _ in range(3):
                try:
                    loss_call(channel, shared(held, t, 0), shared(held, t, size // 2))
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                except errors.RegionTruncated:
                    outcomes["truncated"] = outcomes.get("truncated", 0) + 1
            cutter.join()
            held.close()
        assert call(channel, "GetServerInfo", pb.GetServerInfoRequest()).version
    assert proc.process.poll() is None, proc.text()
    assert outcomes.get("truncated", 0) >= 6  # every round ends truncated


def test_a_client_that_dies_releases_its_regions(server: InProcessServer, shm: Callable[..., Shm]) -> None:
    region = shm(1 << 16)
    script = f"""
import sys, grpc
from distill.v1 import distill_pb2 as pb
from distill_core import rpc
channel = grpc.insecure_channel({server.target!r})
method = rpc.RPCS["RegisterSharedMemory"]
lease = channel.unary_stream(method.path, response_deserializer=method.response.FromString)(
    pb.RegisterSharedMemoryRequest(system=pb.SystemSharedMemory(key={region.key!r}, byte_size=4096)).SerializeToString()
)
print(next(lease).region, flush=True)
sys.stdin.read()
"""
    before = server.sample("distill_shared_memory_regions")
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None and len(child.stdout.readline().strip()) == 32
            assert server.sample("distill_shared_memory_regions") == before + 1
        finally:
            child.kill()  # no unregistering, no cancelling: its connection just closes
    eventually(
        lambda: server.sample("distill_shared_memory_regions") == before, what="the dead client's region released"
    )


# ------------------------------------------------------------------ sealed memory files


def hand_over(path: str, fds: list[int], payload: bytes = b"\0") -> str:
    """Send ``fds`` to the server's socket; its one-line answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(10)
        connection.connect(path)
        socket.send_fds(connection, [payload], fds)
        return connection.makefile().readline().strip()


class Sealed:
    """A memory file sealed against shrinking, mapped, handed to the server."""

    def __init__(self, channel: grpc.Channel, socket_path: str, size: int, seals: int = fcntl.F_SEAL_SHRINK) -> None:
        self.fd = os.memfd_create("distill-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        if seals:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, seals)
        self.size = size
        self.ticket = hand_over(socket_path, [self.fd])
        self.channel = channel

    def register(self, size: int | None = None) -> Lease:
        return Lease(self.channel, sealed_request(self.ticket, self.size if size is None else size))

    def put(self, array: np.ndarray, offset: int) -> int:
        return Shm.put(self, array, offset)  # type: ignore[arg-type]

    def get(self, dtype: Any, shape: tuple[int, ...], offset: int) -> np.ndarray:
        return Shm.get(self, dtype, shape, offset)  # type: ignore[arg-type]


@pytest.fixture
def socket_path(channel: grpc.Channel) -> str:
    path = call(channel, "GetServerInfo", pb.GetServerInfoRequest()).shared_memory.socket
    assert path.startswith("/dev/shm/distill-server-") and os.stat(path).st_mode & 0o777 == 0o600
    return path


@pytest.mark.parametrize("loss", LOSSES[:4], ids=repr)
def test_sealed_regions_give_the_inline_numbers_in_place(
    channel: grpc.Channel, socket_path: str, loss: DistilLoss
) -> None:
    sealed = Sealed(channel, socket_path, 1 << 16)
    with pytest.raises(PermissionError):
        os.ftruncate(sealed.fd, 4096)  # the seal: nobody can take pages from under the server
    t, s = features(np.float32, 5)
    offset_s = sealed.put(t, 0)
    offset_g = sealed.put(s, offset_s)
    lease = sealed.register()
    try:
        request = pb.ComputeTotalLossRequest(
            layers=layers(loss),
            return_gradients=True,
            teachers=[shared(lease, t, 0)],
            students=[shared(lease, s, offset_s)],
            gradient_outputs=[ref(lease, offset_g, s.nbytes)],
        )
        answer = call(channel, "ComputeTotalLoss", request)
    finally:
        lease.close()
    inline = call(
        channel,
        "ComputeTotalLoss",
        wire.build(pb.ComputeTotalLossRequest(layers=layers(loss), return_gradients=True), teachers=[t], students=[s]),
    )
    assert answer.total_loss == inline.total_loss
    np.testing.assert_array_equal(
        sealed.get(np.float32, s.shape, offset_g), tensors.decode(inline.layer_losses[0].student_gradient)
    )


def test_the_socket_takes_only_sealed_memory_files(
    channel: grpc.Channel, socket_path: str, shm: Callable[..., Shm], tmp_path: Path
) -> None:
    unsealed = Sealed(channel, socket_path, 4096, seals=0)
    error = refused_lease(lambda: unsealed.register())
    assert isinstance(error, errors.RegionRefused) and "F_SEAL_SHRINK" in error.message
    plain = os.open(shm(4096).path, os.O_RDWR)
    try:
        ticket = hand_over(socket_path, [plain])
    finally:
        os.close(plain)
    error = refused_lease(lambda: Lease(channel, sealed_request(ticket, 4096)))
    assert isinstance(error, errors.RegionRefused), error  # a file that cannot be sealed
    sealed = Sealed(channel, socket_path, 4096)
    assert isinstance(refused_lease(lambda: sealed.register(8192)), errors.RegionOutOfBounds)
    for ticket in (sealed.ticket, "0" * 32, ""):  # each ticket registers once: that one was spent just now
        assert isinstance(
            refused_lease(lambda t=ticket: Lease(channel, sealed_request(t, 4096))), errors.RegionNotFound
        )
    two = [os.memfd_create("a"), os.memfd_create("b")]
    try:
        assert hand_over(socket_path, two).startswith("error: send exactly one descriptor")
        assert hand_over(socket_path, []).startswith("error: send exactly one descriptor")
    finally:
        for fd in two:
            os.close(fd)
    assert call(channel, "GetServerInfo", pb.GetServerInfoRequest()).version


def refused_lease(register: Callable[[], Lease]) -> DistillError:
    with pytest.raises(DistillError) as info:
        register()
    return info.value


def test_a_stopping_server_ends_leases_once_the_calls_using_them_are_done(
    shm: Callable[..., Shm],
) -> None:
    running = InProcessServer(ServerConfig(port=0, device="cpu", grace_seconds=60)).start()
    stopped = False
    try:
        region = shm(1 << 16)
        with grpc.insecure_channel(running.target) as channel:
            lease = register(channel, region)
            running.stop()  # a lease is no call in flight: the grace is not waited out
            stopped = True
            eventually(lambda: lease.ended() is not None, what="the lease ended")
            assert lease.ended() is grpc.StatusCode.OK
    finally:
        if not stopped:
            running.stop()


def test_sockets_of_dead_servers_are_removed() -> None:
    dead = SHM / f"distill-server-0-{secrets.token_hex(4)}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(dead))  # a server killed before it could remove its socket
    assert dead.exists()
    with InProcessServer(ServerConfig(port=0, device="cpu")) as running:
        assert not dead.exists()
        with grpc.insecure_channel(running.target) as channel:
            path = Path(call(channel, "GetServerInfo", pb.GetServerInfoRequest()).shared_memory.socket)
        assert path.exists()  # a live server's socket answers, and stays
    assert not path.exists()


def test_silent_socket_clients_cannot_lock_others_out(tmp_path: Path) -> None:
    """Four connections are served side by side, a fifth is told the socket is
    busy: three clients that connect and say nothing leave a slot to the
    others. (The socket's own, with a handler timeout far above any stall of
    a loaded machine: the slots here are freed by closing, not by time.)"""
    sealed_socket = SealedSocket(Path("/dev/shm") / f"distill-test-{secrets.token_hex(4)}.sock", 4, 60.0, timeout=60.0)
    path = str(sealed_socket.path)
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    crowd = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    fd = os.memfd_create("distill-test", os.MFD_CLOEXEC)
    try:
        for connection in silent:
            connection.connect(path)  # and say nothing
        ticket = hand_over(path, [fd])  # served meanwhile
        taken = sealed_socket.take(ticket)
        assert len(ticket) == 32 and taken is not None
        os.close(taken)
        for connection in silent:  # still waiting for their answer: served side by side, not in turn
            with pytest.raises(BlockingIOError):
                connection.recv(1, socket.MSG_DONTWAIT)
        for connection in crowd:
            connection.connect(path)
        answers = [connection.makefile().readline() for connection in crowd[1:]]
        assert answers == ["error: the socket is busy; retry\n"]  # four at a time; the fifth is told so
    finally:
        for connection in silent + crowd:
            connection.close()
        os.close(fd)
        sealed_socket.close()


def test_a_lease_is_no_call_in_flight(server: InProcessServer, channel: grpc.Channel, shm: Callable[..., Shm]) -> None:
    """The autoscaler follows calls in flight; a region held open is not one."""
    lease = register(channel, shm(4096))
    try:
        assert server.sample("distill_requests_in_flight", rpc="RegisterSharedMemory") == 0
        assert server.sample("distill_shared_memory_regions") >= 1
    finally:
        lease.close()
