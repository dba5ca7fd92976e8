"""Large layers on several threads: the cores' bookkeeping, and the engine's
results split over threads against the same computation on one."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distill_client import DistilLoss
from distill_core.errors import LossOverflow
from distill_core.losses import LossKind, Reduction
from distill_server import backend, engine, interruption, parallel
from distill_server.cli import parse_args
from distill_server.config import ServerConfig
from distill_server.engine import Layer
from tests import seed
from tests.servers import InProcessServer
from tests.test_edges import EVERY_LOSS

ROW = Reduction.PER_ROW


# ---------------------------------------------------------------- the cores


def test_a_claim_gets_the_free_cores_and_at_least_its_own() -> None:
    cores = parallel.Cores(4)
    with cores.claim(8) as first:
        assert (first.threads, cores.busy) == (4, 4)
        with cores.claim(3) as second:  # nothing free: its own thread only
            assert (second.threads, cores.busy) == (1, 5)
    assert cores.busy == 0
    with cores.claim(2) as small, cores.claim(8) as rest:
        assert (small.threads, rest.threads) == (2, 2)
    with cores.claim(1) as one:  # a small computation: not counted
        assert cores.busy == 0 and one.map(abs, [-1, -2]) == [1, 2]
    cores.resize(1)
    with cores.claim(8) as only:
        assert only.threads == 1


def test_map_runs_at_once_in_order_with_the_callers_check() -> None:
    cores = parallel.Cores(3)
    barrier = threading.Barrier(3, timeout=10)  # passes only if all three run at the same time
    seen: set[int] = set()

    def check() -> None:
        seen.add(threading.get_ident())

    def work(item: int) -> int:
        if item < 3:
            barrier.wait()
        interruption.check()  # the check installed around the map, in every thread
        return item * item

    with interruption.interruptible(check), cores.claim(3) as share:
        assert share.map(work, [0, 1, 2, 3, 4]) == [0, 1, 4, 9, 16]
    assert len(seen) == 3


def test_a_helper_gives_its_core_back_when_another_computation_starts() -> None:
    # Both cores are held by one computation when another starts: the helper
    # finishes the item it has and leaves; the caller takes the rest.
    cores = parallel.Cores(2)
    caller = threading.get_ident()
    helper_items: list[int] = []
    helper_started, other_started, other_done = threading.Event(), threading.Event(), threading.Event()

    def other() -> None:
        with cores.claim(2) as share:
            assert share.threads == 1
            other_started.set()
            other_done.wait(10)

    def work(item: int) -> int:
        if threading.get_ident() == caller:
            helper_started.wait(10)  # let the helper take an item first
        else:
            helper_items.append(item)
            if len(helper_items) == 1:
                threading.Thread(target=other).start()
                other_started.wait(10)
            helper_started.set()
        return item

    with cores.claim(2) as share:
        assert share.map(work, list(range(6))) == list(range(6))
        assert len(helper_items) == 1 and share.threads == 1
        assert cores.busy == 2  # this computation's core and the other's
    other_done.set()


def test_map_waits_for_every_thread_before_raising() -> None:
    cores = parallel.Cores(2)
    caller = threading.get_ident()
    started, failing, finished = threading.Event(), threading.Event(), threading.Event()
    taken: list[int] = []

    def work(item: int) -> None:
        taken.append(item)
        if threading.get_ident() == caller:  # fails once the helper is busy with its item
            started.wait(10)
            failing.set()
            raise ValueError("the caller's item fails")
        started.set()
        failing.wait(10)
        time.sleep(0.2)  # still computing when the error is raised
        finished.set()

    with cores.claim(2) as share, pytest.raises(ValueError, match="the caller's item fails"):
        share.map(work, [0, 1, 2, 3])
    assert finished.is_set()  # no helper still writes into shared arrays after the error
    assert len(taken) == 2  # and nothing more was started after it


def test_cores_beyond_the_items_are_given_back() -> None:
    cores = parallel.Cores(8)
    seen: list[int] = []
    with cores.claim(8) as share:
        assert share.threads == 8
        share.map(lambda item: seen.append(cores.busy), [0, 1])
        assert share.threads == 2 and cores.busy == 2
    assert seen == [2, 2] and cores.busy == 0


def _host(tmp_path: Path, cgroup: str, mounts: list[tuple[str, str, str, str]], files: dict[str, str]) -> None:
    """A ``/proc/self`` (``cgroup``, and ``mountinfo`` of ``(root, mount point, type, options)``
    with mount points under ``tmp_path``) and the cgroup files ``files`` (paths under ``tmp_path``)."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    lines = [
        f"{30 + i} 23 0:{28 + i} {root} {tmp_path}{point} rw,nosuid - {kind} {kind} {options}"
        for i, (root, point, kind, options) in enumerate(mounts)
    ]
    (proc / "mountinfo").write_text("\n".join(["22 1 8:1 / / rw - ext4 /dev/sda1 rw", *lines]) + "\n")
    for name, text in files.items():
        (tmp_path / name.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name.lstrip("/")).write_text(text)


V2 = [("/", "/sys/fs/cgroup", "cgroup2", "rw")]
V1 = [
    ("/", "/sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"),
    ("/", "/sys/fs/cgroup/cpuset", "cgroup", "rw,cpuset"),
]
V1_CPU = "/sys/fs/cgroup/cpu,cpuacct"
POD = "/kubepods/burstable/pod1"


@pytest.mark.parametrize(
    ("cgroup", "mounts", "files", "expected"),
    [
        ("0::/\n", V2, {"/sys/fs/cgroup/cpu.max": "200000 100000\n"}, 2),  # a cgroup namespace: its own root
        ("0::/\n", V2, {"/sys/fs/cgroup/cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: two threads, part-time
        ("0::/\n", V2, {"/sys/fs/cgroup/cpu.max": "50000 100000\n"}, 1),
        ("0::/\n", V2, {"/sys/fs/cgroup/cpu.max": "max 100000\n"}, None),
        # No cgroup namespace: the pod's limit, above the container's cgroup, which has none.
        (
            f"0::{POD}/ctr\n",
            V2,
            {f"/sys/fs/cgroup{POD}/cpu.max": "300000 100000\n", f"/sys/fs/cgroup{POD}/ctr/cpu.max": "max 100000\n"},
            3,
        ),
        # Limits at two levels: the smaller applies, wherever it is.
        (
            f"0::{POD}/ctr\n",
            V2,
            {f"/sys/fs/cgroup{POD}/cpu.max": "400000 100000\n", f"/sys/fs/cgroup{POD}/ctr/cpu.max": "100000 100000\n"},
            1,
        ),
        (
            f"0::{POD}/ctr\n",
            V2,
            {f"/sys/fs/cgroup{POD}/cpu.max": "100000 100000\n", f"/sys/fs/cgroup{POD}/ctr/cpu.max": "400000 100000\n"},
            1,
        ),
        # No mount shows the process's cgroup (a namespace hides its path): the mount stands for it.
        (
            "0::/elsewhere\n",
            [(POD, "/sys/fs/cgroup", "cgroup2", "rw")],
            {"/sys/fs/cgroup/cpu.max": "300000 100000\n"},
            3,
        ),
        # Another container's cgroup, bind-mounted: its limit is not this process's.
        (
            "0::/user.slice\n",
            [*V2, ("/kubepods/pod9/ctr", "/mnt/other", "cgroup2", "rw")],
            {"/mnt/other/cpu.max": "50000 100000\n"},
            None,
        ),
        # A cgroup2 mount line a field short (an empty source or options): cgroup2 needs only its type.
        ("0::/\n", [("/", "/sys/fs/cgroup", "cgroup2", "")], {"/sys/fs/cgroup/cpu.max": "200000 100000\n"}, 2),
        # cgroup v1, the cpu controller mounted with cpuacct: a container's view (its cgroup is the mount's root).
        (
            "5:cpuset:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n",
            [("/docker/abc", V1_CPU, "cgroup", "rw,cpu,cpuacct")],
            {f"{V1_CPU}/cpu.cfs_quota_us": "300000\n", f"{V1_CPU}/cpu.cfs_period_us": "100000\n"},
            3,
        ),
        # cgroup v1 seen from the host's hierarchy: the container's directory, and a limit above it.
        (
            "4:cpu,cpuacct:/docker/abc\n",
            V1,
            {
                f"{V1_CPU}/docker/abc/cpu.cfs_quota_us": "-1\n",
                f"{V1_CPU}/docker/abc/cpu.cfs_period_us": "100000\n",
                f"{V1_CPU}/docker/cpu.cfs_quota_us": "250000\n",
                f"{V1_CPU}/docker/cpu.cfs_period_us": "100000\n",
            },
            3,
        ),
        (
            "4:cpu,cpuacct:/\n",
            V1,
            {f"{V1_CPU}/cpu.cfs_quota_us": "-1\n", f"{V1_CPU}/cpu.cfs_period_us": "100000\n"},
            None,
        ),
        ("0::/\n", V2, {}, None),  # no limit files
        ("", [], {}, None),  # no cgroups at all
    ],
    ids=[
        "v2-2",
        "v2-1.5",
        "v2-0.5",
        "v2-none",
        "v2-pod-limit-above",
        "v2-container-smaller",
        "v2-pod-smaller",
        "v2-hidden-path",
        "v2-other-cgroup-mounted",
        "v2-no-source",
        "v1-namespace",
        "v1-host-view-parent-limit",
        "v1-none",
        "v2-no-files",
        "no-cgroup",
    ],
)
def test_available_cpus_follow_the_smallest_quota_above_the_process(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cgroup: str,
    mounts: list[tuple[str, str, str, str]],
    files: dict[str, str],
    expected: int | None,
) -> None:
    _host(tmp_path, cgroup, mounts, files)
    monkeypatch.setattr(parallel, "_PROC", tmp_path / "proc")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert parallel.available() == (8 if expected is None else expected)


def test_mount_points_that_are_not_utf8_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _host(tmp_path, "0::/\n", V2, {"/sys/fs/cgroup/cpu.max": "300000 100000\n"})
    with (tmp_path / "proc" / "mountinfo").open("ab") as mounts:
        mounts.write(b"99 23 0:99 / /media/Donn\xe9es rw - vfat /dev/sdb1 rw\n")
    monkeypatch.setattr(parallel, "_PROC", tmp_path / "proc")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert parallel.available() == 3


def test_a_mount_point_with_a_space_is_read() -> None:
    assert parallel._unescape("/sys/fs/cgroup/my\\040cgroup") == "/sys/fs/cgroup/my cgroup"


def test_available_cpus_without_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "_PROC", tmp_path / "absent")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert parallel.available() == 3


# ---------------------------------------------------------------- the engine


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Blocks of 64 elements, so small tensors split over threads."""
    monkeypatch.setattr(backend, "CPU_BLOCK", 64)
    yield


class _Meeting:
    """An interruption check that records the threads running blocks and
    holds the first one until a second arrives (at most ``timeout`` s): a
    layer split over threads shows two, however fast each part is."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.threads: set[int] = set()
        self._lock = threading.Lock()
        self._met = threading.Event()
        self._timeout = timeout

    def __call__(self) -> None:
        with self._lock:
            self.threads.add(threading.get_ident())
            if len(self.threads) >= 2:
                self._met.set()
        self._met.wait(self._timeout)


def _on_cores(
    monkeypatch: pytest.MonkeyPatch, count: int, loss: DistilLoss, t: Any, s: Any, split: bool = True
) -> tuple[Any, int]:
    """``evaluate`` with a gradient on ``count`` cores, and how many threads
    ran its blocks (waiting for a second one where a ``split`` is expected)."""
    monkeypatch.setattr(parallel, "cores", parallel.Cores(count))
    meeting = _Meeting(timeout=10.0 if split and count > 1 else 0.0)
    with interruption.interruptible(meeting):
        result = engine.evaluate(loss, t, s, 0.75)
    return result, len(meeting.threads)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("loss", EVERY_LOSS, ids=repr)
@pytest.mark.parametrize("gap", [1e-9, 0.5])
def test_threads_agree_with_one(monkeypatch: pytest.MonkeyPatch, loss: DistilLoss, dtype: Any, gap: float) -> None:
    # 7 rows of 300: per-row losses split their rows, flattened ones their one row's columns.
    # Small gaps take KL's accurate form, whose sums must merge across threads too.
    rng = np.random.default_rng(41)
    t = rng.normal(size=(7, 300)).astype(dtype)
    s = (t + gap * rng.normal(size=t.shape)).astype(dtype)
    (value, grad), one = _on_cores(monkeypatch, 1, loss, t, s)
    (split, split_grad), three = _on_cores(monkeypatch, 3, loss, t, s)
    assert one == 1 and three >= 2  # the caller and at least one helper
    # The sums add up in another order: absolute terms where the value cancels (see tests/seed.py).
    atol = {LossKind.COSINE: seed.COSINE_ATOL}.get(loss.kind, seed.KL_ATOL * loss.temperature**2)
    assert split == pytest.approx(value, rel=1e-12, abs=atol)
    assert engine.loss_value(loss, t, s) == pytest.approx(value, rel=1e-12, abs=atol)
    # As between a row in one block and in column chunks (test_edges): cosine near c = 1, where one
    # rounding of c can cross the clamp at 1 and the gradient (sqrt(2 (1 - c)) / |s| there) drops
    # to 0; elsewhere an element's rounding is relative to the largest (q - p cancels).
    wide = s.astype(np.float64)
    scale = 0.75 / float(np.sqrt((wide * wide).sum(axis=-1)).min()) if loss.kind is LossKind.COSINE else 0.0
    atol = max(math.sqrt(2 * 2.3e-16) * scale, 1e-14 * float(np.abs(grad.astype(np.float64)).max()))
    np.testing.assert_allclose(split_grad.astype(np.float64), grad.astype(np.float64), rtol=1e-11, atol=atol)
    assert split_grad.dtype == grad.dtype


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("reduction", [Reduction.FLATTEN, ROW])
def test_threads_scale_huge_cosine_rows(monkeypatch: pytest.MonkeyPatch, reduction: Reduction) -> None:
    # Squared norms overflow float64: the rows are scaled by their maxima, found on every thread.
    rng = np.random.default_rng(43)
    t = rng.normal(size=(6, 400)) * 1e200
    s = t * 0.5 + rng.normal(size=t.shape) * 1e199
    loss = DistilLoss.cosine(reduction=reduction)
    (value, grad), _ = _on_cores(monkeypatch, 1, loss, t, s)
    (split, split_grad), threads = _on_cores(monkeypatch, 2, loss, t, s)
    assert threads == 2 and math.isfinite(value)
    assert split == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(split_grad, grad, rtol=1e-9, atol=1e-12 * float(np.abs(grad).max()))


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("threads", [1, 3])
def test_a_gradient_overflowing_on_any_thread_is_an_error(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    # One element at the end, in the last thread's columns, overflows float16 (2 x 60000 / 2100 x 1e4).
    monkeypatch.setattr(parallel, "cores", parallel.Cores(threads))
    t = np.zeros(2100, np.float16)
    s = t.copy()
    s[-1] = 60000
    with pytest.raises(LossOverflow, match="float16"):
        engine.layer_loss([Layer(1e4, DistilLoss.mse())], 0, t, s, gradient=True)


@pytest.mark.usefixtures("small_blocks")
def test_a_busy_process_computes_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # Another computation holds both cores: this one gets its own thread and no helper.
    monkeypatch.setattr(parallel, "cores", parallel.Cores(2))
    t, s = np.linspace(-1, 1, 4096), np.linspace(1, -1, 4096)
    seen: set[int] = set()
    with parallel.cores.claim(2), interruption.interruptible(lambda: seen.add(threading.get_ident())):
        engine.evaluate(DistilLoss.kl_divergence(2.0), t, s, 1.0)
    assert seen == {threading.get_ident()}
    assert parallel.cores.busy == 0


@pytest.mark.usefixtures("small_blocks")
def test_small_layers_stay_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fewer than SPLIT_BLOCKS blocks a thread would get: a hand-off costs what they do.
    t = np.linspace(-1, 1, engine.SPLIT_BLOCKS * 64 * 2 - 1)
    _, threads = _on_cores(monkeypatch, 8, DistilLoss.mse(), t, t[::-1].copy(), split=False)
    assert threads == 1


# ---------------------------------------------------------------- configuration


def test_engine_threads_flag_and_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "available", lambda: 8)
    assert parse_args(["--engine-threads", "3"])[0].engine_threads == 3
    assert parse_args([])[0].engine_threads == 8
    assert parse_args(["--processes", "3"])[0].engine_threads == 2  # the CPUs shared among the processes
    monkeypatch.setenv("DISTILL_ENGINE_THREADS", "5")
    assert parse_args([])[0].engine_threads == 5
    with pytest.raises(SystemExit):
        parse_args(["--engine-threads", "0"])


def test_the_server_sizes_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "cores", parallel.Cores(1))
    with InProcessServer(ServerConfig(port=0, device="cpu", engine_threads=3)):
        assert parallel.cores.count == 3
    with InProcessServer(ServerConfig(port=0, device="cpu")):
        assert parallel.cores.count == parallel.available()


def test_the_value_of_a_per_row_cosine_splits_over_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its pass is mostly per-row dot products: on threads sharing a layer they release the GIL.
    monkeypatch.setattr(backend, "CPU_BLOCK", 64)
    rng = np.random.default_rng(47)
    t, s = rng.normal(size=(7, 300)), rng.normal(size=(7, 300))
    loss = DistilLoss.cosine(reduction=ROW)
    (value, _), one = _on_cores(monkeypatch, 1, loss, t, s)
    (split, _), threads = _on_cores(monkeypatch, 3, loss, t, s)
    assert (one, threads) == (1, 3)
    assert split == pytest.approx(value, rel=1e-12)
    c = (t * s).sum(axis=1) / np.sqrt((t * t).sum(axis=1) * (s * s).sum(axis=1))
    assert value == pytest.approx(float(np.mean(1 - c)), rel=1e-12)


@pytest.mark.parametrize(
    "shape",
    [(0, 5), (1, 1), (1, 300), (1, 32768), (8, 32768), (7, 1000), (3, 4099), (64, 512), (501, 3), (600, 16), (2, 100)],
)
def test_per_row_dots_on_shared_threads_are_the_dots(shape: tuple[int, int]) -> None:
    # Rows cut into pieces (so the GIL is released), a rest after the pieces, or too small to cut.
    rng = np.random.default_rng(59)
    x, y = rng.normal(size=shape), rng.normal(size=shape)
    exact = [math.fsum(a * b for a, b in zip(u, v, strict=True)) for u, v in zip(x.tolist(), y.tolist(), strict=True)]
    scale = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))  # a dot's rounding is relative to this
    for shared in (False, True):
        got = engine._row_dot(x, y, shared)
        assert got.shape == (shape[0],)
        np.testing.assert_array_less(np.abs(got - exact), 1e-14 * scale + 1e-300)


def test_a_layer_of_few_rows_holds_a_core_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two wide rows on eight cores: the other six are free for other computations meanwhile.
    monkeypatch.setattr(backend, "CPU_BLOCK", 64)
    cores = parallel.Cores(8)
    monkeypatch.setattr(parallel, "cores", cores)
    rng = np.random.default_rng(53)
    t, s = rng.normal(size=(2, 4096)), rng.normal(size=(2, 4096))
    busy: list[int] = []
    with interruption.interruptible(lambda: busy.append(cores.busy)):
        engine.evaluate(DistilLoss.kl_divergence(2.0, reduction=ROW), t, s, 1.0)
    assert max(busy) == 2 and cores.busy == 0
