"""The DistillService methods: decode and check -> engine -> encode.

Large computations run in a thread pool so the event loop keeps accepting
calls. Every call passes through :meth:`DistillServicer._call`, the one place
that admits it (the concurrency limit), counts it (metrics), logs a failure
and translates a DistillError into a rich status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np

from distill.v1 import distill_pb2 as pb
from distill_client import tensors, wire
from distill_client.errors import DistillError, Internal, InvalidArgument, LimitExceeded
from distill_client.losses import LossKind
from distill_server import __version__, engine, validation
from distill_server.backend import Backend
from distill_server.metrics import Metrics
from distill_server.status import to_rich_status, to_status
from distill_server.validation import Limits

__all__ = ["SERVICE_NAME", "DistillServicer", "add_to_server"]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["DistillService"].full_name

log = logging.getLogger(__name__)

INLINE_BYTES = 64 * 1024
"""Requests up to this size are computed on the event loop: a hop to a pool
thread costs more (about 0.1 ms here) than their whole computation."""

_Response = TypeVar("_Response")


class DistillServicer:
    """Computes losses on ``backend``, large ones in ``executor``'s threads.

    The loss methods take the serialized request: :mod:`distill_client.wire`
    splits it so that tensors are views on the received bytes, and frames the
    response so that gradients are copied once.
    """

    def __init__(self, backend: Backend, executor: Executor, limits: Limits, metrics: Metrics) -> None:
        self.backend = backend
        self.executor = executor
        self.limits = limits
        self.metrics = metrics
        self.active_calls = 0
        self.info = pb.GetServerInfoResponse(
            version=__version__,
            device=backend.device,
            device_description=backend.description,
            supported_dtypes=list(tensors.DTYPES),
            supported_loss_kinds=[kind.value for kind in LossKind],
            max_message_bytes=limits.max_message_bytes,
        )

    # ------------------------------------------------------------ the RPCs

    async def ComputeLayerLoss(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with self._call("ComputeLayerLoss", request, context):
            return await self._execute(self._layer_loss, request)
        raise AssertionError("unreachable")  # pragma: no cover

    async def ComputeTotalLoss(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with self._call("ComputeTotalLoss", request, context):
            return await self._execute(self._total_loss, request)
        raise AssertionError("unreachable")  # pragma: no cover

    async def StreamLosses(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """One configuration, then one response per step; a failed step
        answers with its error and the stream goes on."""
        steps = 0
        async with self._call("StreamLosses", b"", context):
            try:
                iterator = aiter(requests)
                first = await anext(iterator, None)
                if first is None:
                    return
                self.metrics.received.labels("StreamLosses").inc(len(first))
                layers, gradients = self._stream_config(first)
                log.debug("stream started: peer=%s layers=%d", context.peer(), len(layers))
                async for payload in iterator:
                    steps += 1
                    self.metrics.received.labels("StreamLosses").inc(len(payload))
                    yield await self._step(payload, layers, gradients, context.peer())
            finally:
                # Also reached when the client cancels: nothing of the stream is kept.
                log.debug("stream ended: peer=%s steps=%d", context.peer(), steps)

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        async with self._call("GetServerInfo", b"", context):
            return self.info
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------ the work

    def _layer_loss(self, payload: bytes) -> bytes:
        request, views = wire.split(pb.ComputeLayerLossRequest, payload)
        layers = validation.layers(request.layers, self.limits)
        index = validation.layer_index(request.layer_index)
        teacher = validation.tensor(views["teacher"], "teacher")
        student = validation.tensor(views["student"], "student")
        self._count_elements("ComputeLayerLoss", [teacher, student])
        result = engine.layer_loss(
            layers, index, *self._on_device([teacher, student]), gradient=request.return_gradients
        )
        return wire.build(pb.ComputeLayerLossResponse(), layer_loss=self._encode(result, student.dtype))

    def _total_loss(self, payload: bytes) -> bytes:
        request, views = wire.split(pb.ComputeTotalLossRequest, payload)
        layers = validation.layers(request.layers, self.limits)
        total, results = self._total("ComputeTotalLoss", layers, views, request.return_gradients)
        return wire.build(pb.ComputeTotalLossResponse(total_loss=total), layer_losses=results)

    def _total(
        self, rpc: str, layers: list[engine.Layer], views: dict[str, list[wire.TensorView]], gradients: bool
    ) -> tuple[float, list[wire.Framed]]:
        """Decode the tensors, compute every layer, encode the results."""
        teachers = validation.tensor_list(views["teachers"], "teachers")
        students = validation.tensor_list(views["students"], "students")
        self._count_elements(rpc, teachers + students)
        total, results = engine.total_loss(
            layers, self._on_device(teachers), self._on_device(students), gradient=gradients
        )
        return total, [self._encode(r, s.dtype) for r, s in zip(results, students, strict=True)]

    def _count_elements(self, rpc: str, arrays: Sequence[np.ndarray]) -> None:
        self.metrics.elements.labels(rpc).inc(self.limits.check_elements(arrays))

    def _on_device(self, arrays: list[np.ndarray]) -> list[Any]:
        return [self.backend.to_device(array) for array in arrays]

    def _encode(self, result: engine.LayerResult, dtype: np.dtype[Any]) -> wire.Framed:
        """A layer's result, its gradient in the student's wire dtype framed
        without protobuf's copies."""
        message = result.loss.to_proto()
        if result.gradient is None:
            return wire.frame(message)
        gradient = self.backend.to_host(result.gradient).astype(dtype, copy=False)
        return wire.frame(message, student_gradient=gradient)

    def _stream_config(self, payload: bytes) -> tuple[list[engine.Layer], bool]:
        request, views = wire.split(pb.StreamLossesRequest, payload)
        if not request.HasField("config"):
            raise InvalidArgument("the first message of a stream must set config", field="config")
        if views["teachers"] or views["students"] or request.step_id:
            raise InvalidArgument("the first message of a stream carries only config", field="config")
        return validation.layers(request.config.layers, self.limits), request.config.return_gradients

    async def _step(self, payload: bytes, layers: list[engine.Layer], gradients: bool, peer: str) -> bytes:
        step_id = 0

        def step(payload: bytes) -> bytes:
            nonlocal step_id
            request, views = wire.split(pb.StreamLossesRequest, payload)
            step_id = request.step_id
            if request.HasField("config"):
                raise InvalidArgument("config may be set only in the first message of a stream", field="config")
            total, results = self._total("StreamLosses", layers, views, gradients)
            return wire.build(pb.StreamLossesResponse(step_id=step_id, total_loss=total), layer_losses=results)

        try:
            response = await self._execute(step, payload)
        except DistillError as error:
            self.metrics.stream_steps.labels(error.code.name).inc()
            _log_failure("StreamLosses", error, peer, f" step={step_id}")
            return pb.StreamLossesResponse(step_id=step_id, error=to_rich_status(error)).SerializeToString()
        self.metrics.stream_steps.labels("OK").inc()
        return response

    # ------------------------------------------------------------ the machinery

    async def _execute(self, method: Callable[[bytes], _Response], payload: bytes) -> _Response:
        """Compute on the event loop when small, else in the pool; errors
        other than DistillError become Internal."""
        try:
            if len(payload) <= INLINE_BYTES:
                return self._compute(method, payload)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, self._compute, method, payload)
        except DistillError:
            raise
        except Exception as exc:  # a bug: say so, keep serving
            log.exception("unexpected failure in %s", method.__name__)
            raise Internal(f"internal error: {type(exc).__name__}: {exc}") from exc

    def _compute(self, method: Callable[[bytes], _Response], payload: bytes) -> _Response:
        with self.backend.activate():
            return method(payload)

    @contextlib.asynccontextmanager
    async def _call(self, rpc: str, payload: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Admit, count and time one call; a DistillError aborts it with its rich status."""
        start, code = time.perf_counter(), "OK"
        if log.isEnabledFor(logging.DEBUG):
            log.debug("call started: rpc=%s peer=%s", rpc, context.peer())
        self.metrics.received.labels(rpc).inc(len(payload))
        try:
            with self._slot(rpc):
                yield
        except DistillError as error:
            code = error.code.name
            await _abort(context, rpc, error)
        except BaseException as exc:  # the client went away, or an abort
            code = "CANCELLED" if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else "UNKNOWN"
            raise
        finally:
            self.metrics.requests.labels(rpc, code).inc()
            self.metrics.duration.labels(rpc).observe(time.perf_counter() - start)

    @contextlib.contextmanager
    def _slot(self, rpc: str) -> Iterator[None]:
        """Hold one of ``--max-concurrent-calls`` slots (calls run on one event loop)."""
        if self.active_calls >= self.limits.max_concurrent_calls:
            raise LimitExceeded(
                f"the server is serving its limit of {self.limits.max_concurrent_calls} concurrent calls "
                "(--max-concurrent-calls); retry later or add replicas",
                limit=self.limits.max_concurrent_calls,
                got=self.active_calls + 1,
            )
        self.active_calls += 1
        self.metrics.in_flight.labels(rpc).inc()
        try:
            yield
        finally:
            self.active_calls -= 1
            self.metrics.in_flight.labels(rpc).dec()


async def _abort(context: grpc.aio.ServicerContext, rpc: str, error: DistillError) -> NoReturn:
    _log_failure(rpc, error, context.peer())
    await context.abort_with_status(to_status(error))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def _log_failure(rpc: str, error: DistillError, peer: str, extra: str = "") -> None:
    """One structured line per failed call (or stream step)."""
    log.warning(
        "call failed: rpc=%s code=%s reason=%s peer=%s%s: %s",
        rpc,
        error.code.name,
        error.reason,
        peer,
        extra,
        error.message,
        extra={
            "rpc": rpc,
            "code": error.code.name,
            "reason": error.reason,
            "peer": peer,
            "error": error.message,
        },
    )


def add_to_server(servicer: DistillServicer, server: grpc.aio.Server) -> None:
    """Register the servicer's methods; the loss methods take and return
    serialized messages (framed by :mod:`distill_client.wire`)."""
    rpc = grpc.unary_unary_rpc_method_handler
    handlers = {
        "ComputeLayerLoss": rpc(servicer.ComputeLayerLoss),
        "ComputeTotalLoss": rpc(servicer.ComputeTotalLoss),
        "StreamLosses": grpc.stream_stream_rpc_method_handler(servicer.StreamLosses),
        "GetServerInfo": rpc(
            servicer.GetServerInfo,
            request_deserializer=pb.GetServerInfoRequest.FromString,
            response_serializer=pb.GetServerInfoResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
