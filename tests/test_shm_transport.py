"""DistillClient(transport=...) end to end: shared memory gives the numbers
and gradients of bytes, for either kind of region, in unary calls, streams
and the torch bridge; arrays allocated in a region cross no socket; and a
client that cannot share memory says why, or (auto) goes on with bytes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from distill_client import (
    DistillClient,
    DistilLoss,
    Reduction,
    RemoteFeatureDistiller,
    SharedMemoryDisabled,
    Unauthenticated,
)
from distill_server.config import ServerConfig
from tests.reference import LOSSES_BOTH_REDUCTIONS, WIRE_DTYPES
from tests.servers import InProcessServer, eventually

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")

LOSSES, DTYPES = LOSSES_BOTH_REDUCTIONS, WIRE_DTYPES


@pytest.fixture(params=["sealed", "file"])
def region_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Either kind of region: a sealed memory file where the platform has
    them, or (without memfd_create, as on other systems) a file in /dev/shm."""
    if request.param == "file":
        monkeypatch.delattr(os, "memfd_create")
    return str(request.param)


def received(server: InProcessServer, rpc: str) -> float:
    return server.sample("distill_received_bytes_total", rpc=rpc)


def features(dtype: Any, layers: int = 2, shape: tuple[int, ...] = (4, 300)) -> tuple[list[Any], list[Any]]:
    rng = np.random.default_rng(7)
    teachers = [rng.normal(size=shape).astype(dtype) for _ in range(layers)]
    students = [rng.normal(size=shape).astype(dtype) for _ in range(layers)]
    return teachers, students


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_shared_memory_gives_the_numbers_and_gradients_of_bytes(
    server: InProcessServer, region_kind: str, loss: DistilLoss, dtype: Any
) -> None:
    layers = [(0.5, loss), (2.0, loss)]
    teachers, students = features(dtype)
    with DistillClient(server.target, transport="grpc") as inline:
        expected = inline.compute_total_loss(layers, teachers, students, gradients=True)
        expected_layer = inline.compute_layer_loss(layers, 1, teachers[1], students[1], gradients=True)
    with DistillClient(server.target, transport="shm") as shared:
        before = received(server, "ComputeTotalLoss")
        result = shared.compute_total_loss(layers, teachers, students, gradients=True)
        assert received(server, "ComputeTotalLoss") - before < 1024  # references, not tensors
        layer = shared.compute_layer_loss(layers, 1, teachers[1], students[1], gradients=True)
    assert result.total == expected.total
    for mine, theirs, student in zip(result.layers, expected.layers, students, strict=True):
        assert mine == theirs
        assert mine.gradient is not None and theirs.gradient is not None
        assert mine.gradient.dtype == student.dtype and mine.gradient.shape == student.shape
        np.testing.assert_array_equal(mine.gradient, theirs.gradient)
    assert layer == expected_layer and layer.gradient is not None and expected_layer.gradient is not None
    np.testing.assert_array_equal(layer.gradient, expected_layer.gradient)


def test_streams_and_the_distiller_over_shared_memory(server: InProcessServer, region_kind: str) -> None:
    layers = [(1.0, DistilLoss.kl_divergence(2.0)), (0.5, DistilLoss.mse())]
    steps = [features(np.float32) for _ in range(3)]
    with DistillClient(server.target, transport="grpc") as inline, inline.stream(layers, gradients=True) as session:
        expected = [session.step(t, s) for t, s in steps]
    with DistillClient(server.target, transport="shm") as shared, shared.stream(layers, gradients=True) as session:
        before = received(server, "StreamLosses")
        results = [session.step(t, s) for t, s in steps]
        assert received(server, "StreamLosses") - before < 3 * 1024
    for mine, theirs in zip(results, expected, strict=True):
        assert (mine.step_id, mine.total, mine.layers) == (theirs.step_id, theirs.total, theirs.layers)
        for a, b in zip(mine.layers, theirs.layers, strict=True):
            np.testing.assert_array_equal(a.gradient, b.gradient)
    teachers, students = steps[0]
    with RemoteFeatureDistiller(layers, target=server.target, transport="shm") as distiller:
        assert distiller.compute_total_loss(teachers, students) == expected[0].total


def test_arrays_allocated_in_a_region_go_without_a_copy(server: InProcessServer, region_kind: str) -> None:
    layers = [(1.0, DistilLoss.cosine())]
    teachers, students = features(np.float32, layers=1, shape=(64, 1024))
    with DistillClient(server.target, transport="grpc") as inline:
        expected = inline.compute_total_loss(layers, teachers, students, gradients=True)
    with DistillClient(server.target, transport="shm") as client:
        teacher, student = client.shared_arrays([(64, 1024), (64, 1024)])
        teacher[:], student[:] = teachers[0], students[0]
        result = client.compute_total_loss(layers, [teacher], [student], gradients=True)
        teacher[0, 0] += 1.0  # the server reads the array itself: a change shows in the next call
        changed = client.compute_total_loss(layers, [teacher], [student])
    assert result.total == expected.total and result.layers == expected.layers
    np.testing.assert_array_equal(result.layers[0].gradient, expected.layers[0].gradient)
    assert changed.total != expected.total


def test_the_torch_bridge_over_shared_memory(server: InProcessServer) -> None:
    torch = pytest.importorskip("torch")
    from distill_client.torch import RemoteDistillLoss

    layers = [(1.0, DistilLoss.mse()), (0.5, DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW))]
    teachers, students = features(np.float32)
    grads = {}
    for transport in ("grpc", "shm"):
        feats = [torch.tensor(s, requires_grad=True) for s in students]
        remote = RemoteDistillLoss(layers, target=server.target, transport=transport, stream=True)
        try:
            loss = remote([torch.tensor(t) for t in teachers], feats)
            loss.backward()
        finally:
            remote.close()
        grads[transport] = (loss.item(), [f.grad.numpy().copy() for f in feats])
    assert grads["shm"][0] == grads["grpc"][0]
    for a, b in zip(grads["shm"][1], grads["grpc"][1], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def start(start_in_process: Callable[[ServerConfig], InProcessServer]) -> Iterator[Callable[..., InProcessServer]]:
    yield lambda **config: start_in_process(ServerConfig(port=0, device="cpu", **config))


def test_without_shared_memory_shm_says_why_and_auto_goes_on(start: Callable[..., InProcessServer]) -> None:
    server = start(shared_memory_dir=None)
    layers = [(1.0, DistilLoss.mse())]
    teachers, students = features(np.float32, layers=1, shape=(64, 1024))  # over the auto threshold
    with DistillClient(server.target, transport="shm") as client, pytest.raises(SharedMemoryDisabled) as info:
        client.compute_total_loss(layers, teachers, students)
    assert "shares no memory" in info.value.message and "transport='grpc'" in info.value.message
    with DistillClient(server.target) as client:  # auto
        total = client.compute_total_loss(layers, teachers, students).total
    assert total == pytest.approx(float(np.mean((teachers[0].astype(np.float64) - students[0]) ** 2)), rel=1e-12)


def test_shared_memory_needs_the_token_like_everything_else(start: Callable[..., InProcessServer]) -> None:
    server = start(auth_token="s3cret")
    layers = [(1.0, DistilLoss.mse())]
    teachers, students = features(np.float32, layers=1)
    with DistillClient(server.target, transport="shm", token="wrong") as client, pytest.raises(Unauthenticated):
        client.compute_total_loss(layers, teachers, students)
    with DistillClient(server.target, transport="shm", token="s3cret") as client:
        expected = sum(float(np.mean((t.astype(np.float64) - s) ** 2)) for t, s in zip(teachers, students, strict=True))
        assert client.compute_total_loss(layers, teachers, students).total == pytest.approx(expected, rel=1e-12)
        assert server.sample("distill_shared_memory_regions") >= 1
    released = lambda: server.sample("distill_shared_memory_regions") == 0  # noqa: E731
    eventually(released, what="closing the client released its regions")
