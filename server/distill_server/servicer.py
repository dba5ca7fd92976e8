"""The DistillService methods: decode and check -> engine -> encode.

Large computations run in a thread pool so the event loop keeps accepting
calls; every error is translated to a rich status in :meth:`_run`, the one
place that does it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import numpy as np

from distill.v1 import distill_pb2 as pb
from distill_client import tensors, wire
from distill_client.errors import DistillError, Internal
from distill_client.losses import LossKind
from distill_server import __version__, engine, validation
from distill_server.backend import Backend
from distill_server.status import to_status

__all__ = ["SERVICE_NAME", "DistillServicer", "add_to_server"]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["DistillService"].full_name

log = logging.getLogger(__name__)

INLINE_BYTES = 64 * 1024
"""Requests up to this size are computed on the event loop: a hop to a pool
thread costs more (about 0.1 ms here) than their whole computation."""

_Request = TypeVar("_Request", bound=bytes)
_Response = TypeVar("_Response")


class DistillServicer:
    """Computes losses on ``backend``, large ones in ``executor``'s threads.

    The loss methods take the serialized request: :mod:`distill_client.wire`
    splits it so that tensors are views on the received bytes.
    """

    def __init__(self, backend: Backend, executor: Executor, max_message_bytes: int) -> None:
        self.backend = backend
        self.executor = executor
        self.info = pb.GetServerInfoResponse(
            version=__version__,
            device=backend.device,
            device_description=backend.description,
            supported_dtypes=list(tensors.DTYPES),
            supported_loss_kinds=[kind.value for kind in LossKind],
            max_message_bytes=max_message_bytes,
        )

    async def ComputeLayerLoss(self, request: bytes, context: grpc.aio.ServicerContext) -> pb.ComputeLayerLossResponse:
        return await self._run(self._layer_loss, request, context)

    async def ComputeTotalLoss(self, request: bytes, context: grpc.aio.ServicerContext) -> pb.ComputeTotalLossResponse:
        return await self._run(self._total_loss, request, context)

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return self.info

    def _layer_loss(self, payload: bytes) -> pb.ComputeLayerLossResponse:
        request, views = wire.split(pb.ComputeLayerLossRequest, payload)
        layers = validation.layers(request.layers)
        index = validation.layer_index(request.layer_index)
        teacher = validation.tensor(views["teacher"], "teacher")
        student = validation.tensor(views["student"], "student")
        result = engine.layer_loss(
            layers, index, *self._on_device([teacher, student]), gradient=request.return_gradients
        )
        return pb.ComputeLayerLossResponse(layer_loss=self._encode(result, student.dtype))

    def _total_loss(self, payload: bytes) -> pb.ComputeTotalLossResponse:
        request, views = wire.split(pb.ComputeTotalLossRequest, payload)
        layers = validation.layers(request.layers)
        total, results = self._total(layers, views, request.return_gradients)
        return pb.ComputeTotalLossResponse(total_loss=total, layer_losses=results)

    def _total(
        self, layers: list[engine.Layer], views: dict[str, list[wire.TensorView]], gradients: bool
    ) -> tuple[float, list[pb.LayerLoss]]:
        """Decode the tensors, compute every layer, encode the results."""
        teachers = validation.tensor_list(views["teachers"], "teachers")
        students = validation.tensor_list(views["students"], "students")
        total, results = engine.total_loss(
            layers, self._on_device(teachers), self._on_device(students), gradient=gradients
        )
        return total, [self._encode(r, s.dtype) for r, s in zip(results, students, strict=True)]

    def _on_device(self, arrays: list[np.ndarray]) -> list[Any]:
        return [self.backend.to_device(array) for array in arrays]

    def _encode(self, result: engine.LayerResult, dtype: np.dtype[Any]) -> pb.LayerLoss:
        """A layer's result; its gradient in the student's wire dtype."""
        message = result.loss.to_proto()
        if result.gradient is not None:
            gradient = self.backend.to_host(result.gradient).astype(dtype, copy=False)
            message.student_gradient.CopyFrom(tensors.encode(gradient))
        return message

    def _compute(self, method: Callable[[_Request], _Response], request: _Request) -> _Response:
        with self.backend.activate():
            return method(request)

    async def _run(
        self,
        method: Callable[[_Request], _Response],
        request: _Request,
        context: grpc.aio.ServicerContext,
    ) -> _Response:
        """Run ``method`` in the pool; a DistillError aborts with its rich status."""
        log.debug("call started: rpc=%s peer=%s", method.__name__.strip("_"), context.peer())
        try:
            if len(request) <= INLINE_BYTES:
                return self._compute(method, request)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, self._compute, method, request)
        except DistillError as error:
            failure = error
        except Exception as exc:  # a bug: say so, keep serving
            log.exception("unexpected failure in %s", method.__name__)
            failure = Internal(f"internal error: {type(exc).__name__}: {exc}")
        log.info(
            "call failed: rpc=%s code=%s reason=%s peer=%s: %s",
            method.__name__.strip("_"),
            failure.code.name,
            failure.reason,
            context.peer(),
            failure.message,
        )
        await context.abort_with_status(to_status(failure))
        raise AssertionError("abort_with_status returned")  # pragma: no cover


def add_to_server(servicer: DistillServicer, server: grpc.aio.Server) -> None:
    """Register the servicer's methods; the loss requests arrive as raw bytes."""
    rpc = grpc.unary_unary_rpc_method_handler
    handlers = {
        "ComputeLayerLoss": rpc(
            servicer.ComputeLayerLoss, response_serializer=pb.ComputeLayerLossResponse.SerializeToString
        ),
        "ComputeTotalLoss": rpc(
            servicer.ComputeTotalLoss, response_serializer=pb.ComputeTotalLossResponse.SerializeToString
        ),
        "GetServerInfo": rpc(
            servicer.GetServerInfo,
            request_deserializer=pb.GetServerInfoRequest.FromString,
            response_serializer=pb.GetServerInfoResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
