"""AsyncDistillClient: DistillClient's API on asyncio, against real servers."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import numpy as np
import pytest

from distill_client import (
    AsyncDistillClient,
    DeadlineExceeded,
    DimensionMismatch,
    DistillClient,
    DistilLoss,
    InvalidArgument,
    NonFiniteInput,
    Reduction,
)
from tests.reference import reference
from tests.servers import InProcessServer, ServerProcess

LAYERS = [(0.5, DistilLoss.mse()), (2.0, DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW))]


def features(seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    teachers = [rng.normal(size=(4, 16)).astype(np.float32) for _ in LAYERS]
    return teachers, [t + rng.normal(size=t.shape).astype(np.float32) for t in teachers]


def test_results_are_the_sync_clients(server: InProcessServer, client: DistillClient) -> None:
    teachers, students = features()

    async def main() -> tuple[Any, Any, Any]:
        async with AsyncDistillClient(server.target) as aio:
            total = await aio.compute_total_loss(LAYERS, teachers, students, gradients=True, names=["a", "b"])
            layer = await aio.compute_layer_loss(LAYERS, 1, teachers[1], students[1])
            return total, layer, await aio.server_info()

    total, layer, info = asyncio.run(main())
    expected = client.compute_total_loss(LAYERS, teachers, students, gradients=True, names=["a", "b"])
    assert total.total == expected.total  # the same server and engine: the same bits
    assert total.layers[0].loss == pytest.approx(reference(LAYERS[0][1], teachers[0], students[0]), rel=1e-12)
    for got, want in zip(total.layers, expected.layers, strict=True):
        assert (got.name, got.loss) == (want.name, want.loss)
        assert got.gradient is not None and want.gradient is not None
        np.testing.assert_array_equal(got.gradient, want.gradient)
    assert layer.weighted_loss == expected.layers[1].weighted_loss
    assert info == client.server_info()


def test_errors_are_typed(server: InProcessServer) -> None:
    teachers, students = features()
    bad = [teachers[0].copy(), teachers[1]]
    bad[0][1, 2] = np.nan

    async def main() -> list[BaseException]:
        async with AsyncDistillClient(server.target) as aio:
            calls = [
                aio.compute_total_loss(LAYERS[:1], teachers, students),  # two teachers for one layer
                aio.compute_total_loss(LAYERS, bad, students),
                aio.compute_total_loss(LAYERS, teachers[0], students),  # one tensor for a list of layers
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    mismatch, non_finite, one_tensor = asyncio.run(main())
    assert isinstance(mismatch, DimensionMismatch) and mismatch.expected == 1 and mismatch.got == 2
    assert isinstance(non_finite, NonFiniteInput) and non_finite.layer == 0 and non_finite.index == 18
    assert isinstance(one_tensor, InvalidArgument) and "teachers is one tensor" in one_tensor.message


def test_many_calls_at_once(server: InProcessServer, client: DistillClient) -> None:
    pairs = [features(seed) for seed in range(32)]

    async def main() -> list[Any]:
        async with AsyncDistillClient(server.target) as aio:
            return await asyncio.gather(*(aio.compute_total_loss(LAYERS, t, s) for t, s in pairs))

    totals = [result.total for result in asyncio.run(main())]
    assert totals == [client.compute_total_loss(LAYERS, t, s).total for t, s in pairs]


def test_a_cancelled_call_leaves_the_server_serving(server: InProcessServer) -> None:
    big = np.ones(8 << 20, np.float32)
    teachers, students = features()

    async def main() -> float:
        async with AsyncDistillClient(server.target) as aio:
            task = asyncio.ensure_future(aio.compute_total_loss([(1.0, DistilLoss.mse())], [big], [big * 2]))
            await asyncio.sleep(0.05)  # on its way
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return (await aio.compute_total_loss(LAYERS, teachers, students)).total

    assert asyncio.run(main()) > 0


def test_a_stream_goes_on_after_a_bad_step(server: InProcessServer, client: DistillClient) -> None:
    teachers, students = features()

    async def main() -> tuple[list[float], BaseException | None, bool]:
        async with AsyncDistillClient(server.target) as aio, aio.stream(LAYERS, gradients=True) as session:
            first = await session.step(teachers, students)
            error = None
            try:
                await session.step(teachers[:1], students)
            except DimensionMismatch as exc:
                error = exc
            last = await session.step(teachers, students)
            assert first.step_id == 0 and last.step_id == 2
            assert all(layer.gradient is not None for layer in last.layers)
            return [first.total, last.total], error, session.closed

    totals, error, closed = asyncio.run(main())
    expected = client.compute_total_loss(LAYERS, teachers, students).total
    assert totals == [pytest.approx(expected, rel=1e-12)] * 2
    assert isinstance(error, DimensionMismatch)
    assert not closed


def test_a_step_without_an_answer_ends_the_stream(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu"])
    teachers, students = features()

    async def main() -> None:
        async with AsyncDistillClient(proc.target, timeout=60) as aio:
            session = aio.stream(LAYERS, step_timeout=1.0)
            await session.step(teachers, students)
            proc.process.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(DeadlineExceeded, match=r"step 1 got no answer within 1 s"):
                    await session.step(teachers, students)
                assert session.closed
            finally:
                proc.process.send_signal(signal.SIGCONT)
            assert (await aio.compute_total_loss(LAYERS, teachers, students)).total > 0  # the server goes on

    asyncio.run(main())


def test_a_step_bound_must_be_positive(server: InProcessServer) -> None:
    async def main() -> None:
        async with AsyncDistillClient(server.target) as aio:
            with pytest.raises(ValueError, match="must be positive"):
                aio.stream(LAYERS, step_timeout=0.0)

    asyncio.run(main())
