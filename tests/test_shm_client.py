"""The client's shared-memory machinery, without a server: region files,
layout, the pool, zero-copy detection and the transport choice.

Registration goes to a fake channel that does what the contract says the
server does: it opens the file by name at registration (checking it is a
private regular file of this user) and then reads and writes it through
that descriptor only.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from distill.v1 import distill_pb2 as pb
from distill_client import (
    DistillClient,
    Internal,
    RegionNotFound,
    RegionRefused,
    SharedMemoryDisabled,
    SharedMemoryInfo,
    Unavailable,
)
from distill_client import shared_memory as shm
from distill_client.shared_memory import (
    ALIGNMENT,
    MIN_REGION_BYTES,
    SHM_THRESHOLD_BYTES,
    Batch,
    Region,
    RegionPool,
    SharedMemory,
    create_region,
    layout,
    region_size,
    shared_range,
)
from distill_core import rpc
from distill_core.errors import Cancelled
from distill_core.losses import LayerLoss
from distill_core.tensors import DTYPES

PREFIX = "distill-"


class FakeLease:
    """A registration call: cancelled, or ended by the server (``end``)."""

    def __init__(self, response: Any = None) -> None:
        self.response = response
        self.cancelled = False
        self.ended = False

    def __iter__(self) -> FakeLease:
        return self

    def __next__(self) -> Any:
        return self.response

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def done(self) -> bool:
        return self.cancelled or self.ended


class FakeServer:
    """A channel whose RegisterSharedMemory opens the file as the server
    does and keeps its descriptor; ``read``/``write`` are the server's
    ``pread``/``pwrite`` on it."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.fds: dict[str, int] = {}
        self.leases: dict[str, FakeLease] = {}
        self.metadata: list[Any] = []
        self.lock = threading.Lock()

    def unary_stream(self, path: str, **_: Any) -> Any:
        assert path == rpc.RPCS["RegisterSharedMemory"].path
        return self.register

    def register(self, request: bytes, metadata: Any = None) -> FakeLease:
        memory = pb.RegisterSharedMemoryRequest.FromString(request).system
        assert memory.key.startswith(PREFIX) and len(memory.key) > len(PREFIX)
        fd = os.open(os.path.join(self.directory, memory.key), os.O_RDWR | os.O_NOFOLLOW)
        info = os.fstat(fd)
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.getuid() and info.st_size >= memory.byte_size > 0
        with self.lock:
            handle = f"region-{len(self.fds)}"
            self.fds[handle] = fd
            self.metadata.append(metadata)
            lease = self.leases[handle] = FakeLease(
                pb.RegisterSharedMemoryResponse(region=handle, byte_size=memory.byte_size)
            )
        return lease

    def read(self, ref: pb.SharedMemoryRef) -> bytes:
        return os.pread(self.fds[ref.region], ref.byte_size, ref.offset)

    def write(self, ref: pb.SharedMemoryRef, data: bytes) -> None:
        assert len(data) == ref.byte_size
        os.pwrite(self.fds[ref.region], data, ref.offset)

    def tensor(self, message: pb.Tensor) -> np.ndarray:
        """What the server reads for a Tensor that references shared memory."""
        assert message.HasField("shared_memory") and not message.data
        return np.frombuffer(self.read(message.shared_memory), DTYPES[message.dtype]).reshape(message.shape)

    def live(self) -> list[str]:
        return [handle for handle, lease in self.leases.items() if not lease.done()]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


@pytest.fixture
def server(tmp_path: Any) -> Iterator[FakeServer]:
    fake = FakeServer(str(tmp_path))
    yield fake
    fake.close()


class Probe:
    """GetServerInfo's shared-memory part, counting the calls."""

    def __init__(self, info: SharedMemoryInfo | None) -> None:
        self.info = info
        self.calls = 0

    def __call__(self) -> SharedMemoryInfo | None:
        self.calls += 1
        return self.info


def enabled(directory: str, max_bytes: int = 1 << 30) -> SharedMemoryInfo:
    return SharedMemoryInfo(True, directory, PREFIX, max_bytes, 16)


def sharing(server: FakeServer, transport: Any = "shm", info: SharedMemoryInfo | None = None) -> SharedMemory:
    return SharedMemory(
        transport,
        server,  # type: ignore[arg-type]
        (("authorization", "Bearer t"),),
        5.0,
        Probe(info or enabled(server.directory)),
        "test-server",
    )


def anonymous(size: int, handle: str = "h") -> Region:
    return Region.open(-1, size, handle, FakeLease())


def owner(array: np.ndarray) -> Any:
    """The object whose memory ``array`` views."""
    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


# -- layout -------------------------------------------------------------------


def test_layout_puts_every_range_at_an_aligned_offset_after_the_previous() -> None:
    offsets, total = layout([10, 64, 0, 1, 200])
    assert offsets == [0, 64, 128, 128, 192]
    assert total == 392
    assert all(offset % ALIGNMENT == 0 for offset in offsets)
    assert layout([]) == ([], 0)


def test_region_sizes_are_quarters_of_powers_of_two_of_at_least_a_mebibyte() -> None:
    mib = MIN_REGION_BYTES
    assert region_size(0) == region_size(1) == region_size(mib) == mib
    assert region_size(mib + 1) == mib + mib // 4
    assert region_size(5 * mib) == 5 * mib
    assert region_size(5 * mib + 1) == 6 * mib
    assert region_size(192 * mib + 1) == 224 * mib
    for nbytes in range(1, 1 << 30, 9_999_991):
        assert nbytes <= region_size(nbytes) <= max(mib, nbytes * 5 // 4 + 1)
    # Never rounded over the server's budget when the bytes fit in it.
    assert region_size(5 * mib + 1, max_bytes=11 * mib // 2) == 5 * mib + 1
    assert region_size(100, max_bytes=1000) == 100


# -- region files -------------------------------------------------------------


def test_a_region_file_is_private_while_registered_and_gone_after(tmp_path: Any) -> None:
    seen: list[tuple[str, int, int]] = []
    lease = FakeLease()

    def register(key: str, size: int) -> tuple[str, FakeLease]:
        info = os.lstat(tmp_path / key)
        seen.append((key, info.st_mode, info.st_size))
        return "handle", lease

    old = os.umask(0o022)
    try:
        region = create_region(str(tmp_path), PREFIX, 3000, register)
    finally:
        os.umask(old)
    [(key, mode, size)] = seen
    assert key.startswith(PREFIX) and len(key) == len(PREFIX) + 32
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600 and size == 3000
    assert os.listdir(tmp_path) == []  # unlinked once the server holds it
    assert (region.handle, len(region)) == ("handle", 3000)
    region[:4] = b"abcd"
    assert region.alive and not lease.cancelled
    region.free()
    assert lease.cancelled and not region.alive


def test_a_region_file_is_removed_when_registration_fails(tmp_path: Any) -> None:
    def refuse(key: str, size: int) -> tuple[str, FakeLease]:
        raise RegionRefused("not yours")

    with pytest.raises(RegionRefused):
        create_region(str(tmp_path), PREFIX, 100, refuse)
    assert os.listdir(tmp_path) == []


def test_an_existing_name_is_never_opened_or_removed(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm.secrets, "token_hex", lambda n: "0" * 2 * n)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    planted = tmp_path / (PREFIX + "0" * 32)
    planted.symlink_to(victim)
    with pytest.raises(SharedMemoryDisabled, match="cannot create"):
        create_region(str(tmp_path), PREFIX, 100, lambda key, size: pytest.fail("registered"))
    assert planted.is_symlink() and victim.read_bytes() == b"keep"


def test_a_directory_that_is_not_there_disables_shared_memory(tmp_path: Any) -> None:
    with pytest.raises(SharedMemoryDisabled):
        create_region(str(tmp_path / "absent"), PREFIX, 100, lambda key, size: pytest.fail("registered"))


def test_a_region_is_released_when_its_last_array_goes() -> None:
    lease = FakeLease()
    region = Region.open(-1, 4096, "h", lease)
    array = region.array((4,), np.dtype(np.float32), 64)
    del region
    gc.collect()
    assert not lease.cancelled  # the array keeps it
    array[:] = 1
    del array
    gc.collect()
    assert lease.cancelled


def test_freeing_a_region_with_arrays_still_on_it_only_releases_it() -> None:
    region = anonymous(4096)
    array = region.array((4,), np.dtype(np.float32), 0)
    region.free()  # BufferError inside: left to the garbage collector
    assert not region.alive
    array[:] = 2  # still mapped
    assert array.sum() == 8


# -- zero copy ----------------------------------------------------------------


def test_arrays_inside_a_region_are_found_with_their_offset() -> None:
    region, other = anonymous(1 << 16, "a"), anonymous(1 << 16, "b")
    array = region.array((16, 32), np.dtype(np.float32), 256)
    assert shared_range(array, [other, region]) == (region, 256)
    assert shared_range(array[3:5], [region]) == (region, 256 + 3 * 32 * 4)
    assert shared_range(np.asarray(torch.from_numpy(array)), [region]) == (region, 256)
    half = region.array((8,), np.dtype(ml_dtypes.bfloat16), 64)
    assert shared_range(half, [region]) == (region, 64)
    assert shared_range(np.zeros((16, 32), np.float32), [region]) is None
    assert shared_range(array, [other]) is None


def test_arrays_the_server_could_not_read_as_they_lie_are_not_shared() -> None:
    region = anonymous(1 << 16)
    array = region.array((16, 32), np.dtype(np.float32), 0)
    assert shared_range(array[:, 1:3], [region]) is None  # not C-contiguous
    assert shared_range(array.T, [region]) is None
    assert shared_range(array.view(">f4"), [region]) is None  # big-endian
    assert shared_range(array.view(np.int32), [region]) is None  # not a wire dtype
    assert shared_range(array[:0], [region]) is None  # empty


# -- pool ---------------------------------------------------------------------


class Regions:
    """A pool's ``create``: anonymous regions with fake leases."""

    def __init__(self) -> None:
        self.made: list[Region] = []

    def __call__(self, size: int) -> Region:
        region = anonymous(size, f"r{len(self.made)}")
        self.made.append(region)
        return region


def test_the_pool_reuses_the_smallest_idle_region_that_fits() -> None:
    regions = Regions()
    pool = RegionPool(regions)
    small = pool.acquire(1000)
    big = pool.acquire(3 * MIN_REGION_BYTES)  # the first is in use: a new one
    assert (len(small), len(big)) == (MIN_REGION_BYTES, 3 * MIN_REGION_BYTES)
    pool.release(big)
    pool.release(small)
    assert pool.acquire(10) is small
    assert pool.acquire(2 * MIN_REGION_BYTES) is big
    assert len(regions.made) == 2


def test_the_pool_keeps_a_few_idle_regions_and_drops_dead_ones() -> None:
    regions = Regions()
    pool = RegionPool(regions, idle=2)
    taken = [pool.acquire(n * MIN_REGION_BYTES) for n in (1, 2, 4)]
    for region in taken:
        pool.release(region)
    assert not taken[0].alive and taken[1].alive and taken[2].alive  # the smallest went
    taken[1]._lease.ended = True  # type: ignore[attr-defined]  # the server let it go (restarted)
    assert pool.acquire(100) is taken[2]
    assert not taken[1].alive
    fresh = pool.acquire(100)
    assert fresh is regions.made[-1] and len(regions.made) == 4


def test_the_pool_gives_a_region_to_one_call_at_a_time() -> None:
    pool = RegionPool(Regions())
    in_use: set[str] = set()
    lock = threading.Lock()
    clashes: list[str] = []

    def work() -> None:
        for _ in range(200):
            region = pool.acquire(100)
            with lock:
                if region.handle in in_use:
                    clashes.append(region.handle)
                in_use.add(region.handle)
            with lock:
                in_use.discard(region.handle)
            pool.release(region)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert clashes == []


def test_closing_the_pool_releases_every_region() -> None:
    regions = Regions()
    pool = RegionPool(regions)
    idle, busy = pool.acquire(1), pool.acquire(1)
    pool.release(idle)
    pool.close()
    assert not idle.alive and not busy.alive
    pool.release(busy)
    with pytest.raises(Cancelled):
        pool.acquire(1)


# -- a call's tensors ---------------------------------------------------------


def test_shm_copies_every_tensor_and_reserves_gradient_outputs(server: FakeServer) -> None:
    sharing_ = sharing(server)
    teachers: list[Any] = [np.arange(12, dtype=np.float32).reshape(3, 4), [1.0, 2.0]]
    students: list[Any] = [
        np.arange(24, dtype=">f4").reshape(3, 8)[:, ::2],  # big-endian, not contiguous
        np.array([3, 4], np.float16),
    ]
    with sharing_.batch(teachers, students, gradients=True) as batch:
        assert os.listdir(server.directory) == []
        assert len(server.live()) == 1
        assert server.metadata == [(("authorization", "Bearer t"),)]
        sent = [*batch.teachers, *batch.students]
        assert all(isinstance(t, pb.Tensor) for t in sent)
        for message, value in zip(sent, [*teachers, *students], strict=True):
            expected = np.asarray(value, dtype=DTYPES[message.dtype])
            assert message.shared_memory.offset % ALIGNMENT == 0
            np.testing.assert_array_equal(server.tensor(message), expected)
        assert [t.dtype for t in sent] == [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16]
        outputs = batch.gradient_outputs
        assert [o.byte_size for o in outputs] == [48, 4]
        ranges = sorted((r.offset, r.offset + r.byte_size) for r in [*(t.shared_memory for t in sent), *outputs])
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(ranges))  # no overlap
        # The server writes each gradient into its output and answers with the range.
        gradients = [np.full((3, 4), 0.5, np.float32), np.array([7, 8], np.float16)]
        answers = []
        for index, (gradient, output) in enumerate(zip(gradients, outputs, strict=True)):
            server.write(output, gradient.tobytes())
            answers.append(
                pb.LayerLoss(
                    layer_index=index,
                    name=f"l{index}",
                    loss=1.0,
                    weighted_loss=2.0,
                    student_gradient=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=gradient.shape, shared_memory=output),
                )
            )
        results = batch.layers(answers)
    assert [r.name for r in results] == ["l0", "l1"]
    for result, gradient in zip(results, gradients, strict=True):
        assert result.gradient is not None and result.gradient.flags.writeable and result.gradient.flags.owndata
        assert result.gradient.dtype == gradient.dtype and result.gradient.shape == gradient.shape
        np.testing.assert_array_equal(result.gradient, gradient)
    with sharing_.batch([np.ones(3, np.float32)], [np.ones(3, np.float32)], gradients=False) as again:
        assert isinstance(again.teachers[0], pb.Tensor) and again.gradient_outputs == []
    assert len(server.leases) == 1  # the region went back to the pool and served again
    sharing_.close()
    assert server.live() == []


def test_a_gradient_outside_the_given_output_is_an_error(server: FakeServer) -> None:
    sharing_ = sharing(server)
    with sharing_.batch([np.ones(4, np.float32)], [np.ones(4, np.float32)], gradients=True) as batch:
        wrong = pb.SharedMemoryRef(region=batch.gradient_outputs[0].region, offset=0, byte_size=16)
        answer = pb.LayerLoss(student_gradient=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], shared_memory=wrong))
        with pytest.raises(Internal):
            batch.layers([answer])
        # Inline gradients (a server that ignored the outputs) still decode.
        inline = pb.LayerLoss(student_gradient=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1], data=b"\0\0\x80?"))
        assert batch.layers([inline])[0].gradient.tolist() == [1.0]  # type: ignore[union-attr]
    sharing_.close()


def test_auto_sends_small_calls_inline_without_asking_the_server(server: FakeServer) -> None:
    sharing_ = sharing(server, "auto")
    tiny = np.ones(4, np.float32)
    half = np.ones(SHM_THRESHOLD_BYTES // 8, np.float32)  # half the threshold's bytes
    with sharing_.batch([tiny], [half], gradients=False) as batch:
        assert batch.teachers[0] is tiny and batch.students[0] is half and not batch.shared
    assert sharing_._server_info.calls == 0  # type: ignore[attr-defined]
    with sharing_.batch([half], [half], gradients=False) as batch:
        assert isinstance(batch.teachers[0], pb.Tensor) and isinstance(batch.students[0], pb.Tensor)
    # Gradients count: they would be copied too.
    with sharing_.batch([tiny], [half], gradients=True) as batch:
        assert batch.shared and len(batch.gradient_outputs) == 1
    assert sharing_._server_info.calls == 1  # type: ignore[attr-defined]
    sharing_.close()


@pytest.mark.parametrize(
    "info, why",
    [
        (None, "shares no memory"),
        (SharedMemoryInfo(False, "", "", 0, 0), "shares no memory"),
        (SharedMemoryInfo(True, "/no/such/directory", PREFIX, 1 << 30, 4), "not on this host"),
    ],
)
def test_a_server_that_cannot_share_memory(
    server: FakeServer, info: SharedMemoryInfo | None, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    big = np.ones(SHM_THRESHOLD_BYTES, np.float32)
    strict = SharedMemory("shm", server, None, 5.0, Probe(info), "test-server")  # type: ignore[arg-type]
    with pytest.raises(SharedMemoryDisabled, match=why) as refused:
        strict.batch([big], [big], gradients=False)
    assert "transport='grpc'" in str(refused.value)
    with pytest.raises(SharedMemoryDisabled, match=why):
        strict.shared_arrays([4], np.float32)
    probe = Probe(info)
    auto = SharedMemory("auto", server, None, 5.0, probe, "test-server")  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG, logger=shm.__name__):
        for _ in range(3):
            with auto.batch([big], [big], gradients=True) as batch:
                assert batch.teachers[0] is big and batch.gradient_outputs == []
    assert probe.calls == 1 and why in caplog.text
    [plain] = auto.shared_arrays([4], np.float32)
    assert not isinstance(owner(plain), Region)
    assert server.leases == {}


def test_a_registration_the_server_refuses_turns_auto_off(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: bytes, metadata: Any = None) -> FakeLease:
        raise RegionRefused("open to other users")

    monkeypatch.setattr(server, "register", refuse)
    big = np.ones(SHM_THRESHOLD_BYTES, np.float32)
    auto = sharing(server, "auto")
    with auto.batch([big], [big], gradients=False) as batch:
        assert batch.teachers[0] is big
    assert os.listdir(server.directory) == []
    strict = sharing(server, "shm")
    with pytest.raises(SharedMemoryDisabled, match="open to other users"):
        strict.batch([big], [big], gradients=False)


def test_grpc_never_touches_shared_memory(server: FakeServer) -> None:
    probe = Probe(enabled(server.directory))
    grpc_only = SharedMemory("grpc", server, None, 5.0, probe, "test-server")  # type: ignore[arg-type]
    values: list[Any] = [[1.0, 2.0], np.ones(1 << 20, np.float32)]
    with grpc_only.batch(values, values, gradients=True) as batch:
        assert batch.teachers == values and batch.gradient_outputs == []
    [plain] = grpc_only.shared_arrays([(2, 3)], np.float32)
    assert plain.shape == (2, 3) and not plain.any()
    assert probe.calls == 0 and server.leases == {}


def test_an_unknown_transport_is_refused(server: FakeServer) -> None:
    with pytest.raises(ValueError, match="transport"):
        SharedMemory("tcp", server, None, 5.0, Probe(None), "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'auto', 'shm', 'grpc'"):
        DistillClient("127.0.0.1:1", transport="tcp")  # type: ignore[arg-type]


# -- zero copy, end to end of the client --------------------------------------


def test_shared_arrays_go_by_reference_with_no_copy(server: FakeServer) -> None:
    sharing_ = sharing(server, "auto")
    teacher, student = sharing_.shared_arrays([(4, 8), 32], np.float32)
    assert isinstance(owner(teacher), Region) and owner(teacher) is owner(student)
    assert teacher.shape == (4, 8) and student.shape == (32,) and not teacher.any()
    assert len(server.leases) == 1
    teacher[...] = 3.0
    torch.from_numpy(student)[:] = 5.0  # torch views the same memory
    with sharing_.batch([torch.from_numpy(teacher)], [student[:16]], gradients=False) as batch:
        t, s = batch.teachers[0], batch.students[0]
        assert t.shared_memory.region == s.shared_memory.region == "region-0"
        assert (t.shared_memory.offset, s.shared_memory.offset) == (0, 128)
        assert server.tensor(t).tolist() == teacher.tolist() and server.tensor(s).tolist() == [5.0] * 16
    assert len(server.leases) == 1  # nothing copied: no pooled region
    # A view the server cannot read as it lies is copied (inline here: small).
    with sharing_.batch([teacher[:, ::2]], [student[:16]], gradients=False) as batch:
        assert isinstance(batch.teachers[0], np.ndarray) and isinstance(batch.students[0], pb.Tensor)
    del teacher, student, t, s, batch
    gc.collect()
    assert server.live() == []  # the arrays went, and their region with them


def test_closing_releases_shared_arrays_which_stay_usable(server: FakeServer) -> None:
    sharing_ = sharing(server, "shm")
    [array] = sharing_.shared_arrays([16], ml_dtypes.bfloat16)
    sharing_.close()
    assert server.live() == []
    array[:] = 1  # still memory, no longer shared
    with sharing_.batch([array], [array], gradients=False) as batch:  # closed: the channel says the rest
        assert batch.teachers[0] is not None
    with pytest.raises(ValueError, match="dtype"):
        sharing(server).shared_arrays([4], np.int32)


def test_the_region_of_a_failed_call_is_never_reused(server: FakeServer) -> None:
    sharing_ = sharing(server)
    tensor = np.ones(8, np.float32)

    def cancelled(batch: Batch) -> None:
        raise Cancelled("the call was cancelled; the server may still be reading")

    with pytest.raises(Cancelled):
        sharing_.exchange([tensor], [tensor], True, cancelled)
    assert server.live() == []
    sharing_.exchange([tensor], [tensor], True, lambda batch: None)
    assert server.live() == ["region-1"]
    sharing_.close()


def test_auto_resends_inline_when_the_server_does_not_know_the_region(server: FakeServer) -> None:
    sharing_ = sharing(server, "auto")
    big = np.ones(SHM_THRESHOLD_BYTES, np.float32)
    sent: list[Batch] = []

    def send(batch: Batch) -> list[LayerLoss]:
        sent.append(batch)
        if batch.shared:
            raise RegionNotFound("no such region: another replica")
        return []

    sharing_.exchange([big], [big], False, send)
    assert [b.shared for b in sent] == [True, False]
    with sharing_.batch([big], [big], gradients=False) as batch:
        assert not batch.shared  # off for good
    assert server.live() == []  # and the pool released
    strict = sharing(server, "shm")
    with pytest.raises(RegionNotFound):
        strict.exchange([big], [big], False, send)


# -- the client ---------------------------------------------------------------


def test_shm_against_no_server_says_so() -> None:
    big: Sequence[Any] = [np.ones(1000, np.float32)]
    with DistillClient("127.0.0.1:1", transport="shm", timeout=5, retries=0) as client:
        assert client.transport == "shm"
        with pytest.raises(Unavailable):
            client.compute_total_loss([], big, big)


def test_the_client_defaults_to_auto_and_shares_nothing_with_grpc() -> None:
    with DistillClient("127.0.0.1:1", timeout=5, retries=0) as client:
        assert client.transport == "auto"
    with DistillClient("127.0.0.1:1", transport="grpc", timeout=5, retries=0) as client:
        [array] = client.shared_arrays([3])
        assert array.dtype == np.float32 and not isinstance(owner(array), Region)
