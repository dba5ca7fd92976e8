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
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from distill.v1 import distill_pb2 as pb
from distill.v1 import distill_pb2_grpc as pb_grpc
from distill_client import tensors
from distill_client.errors import DistillError, Internal
from distill_client.losses import LossKind
from distill_server import __version__, engine, validation
from distill_server.backend import Backend
from distill_server.status import to_status

__all__ = ["DistillServicer"]

log = logging.getLogger(__name__)

INLINE_BYTES = 64 * 1024
"""Requests up to this size are computed on the event loop: a hop to a pool
thread costs more (about 0.1 ms here) than their whole computation."""

_Request = TypeVar("_Request", bound=Message)
_Response = TypeVar("_Response")


class DistillServicer(pb_grpc.DistillServiceServicer):
    """Computes losses on ``backend`` in ``executor``'s threads."""

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

    async def ComputeLayerLoss(
        self, request: pb.ComputeLayerLossRequest, context: grpc.aio.ServicerContext
    ) -> pb.ComputeLayerLossResponse:
        return await self._run(self._layer_loss, request, context)

    async def ComputeTotalLoss(
        self, request: pb.ComputeTotalLossRequest, context: grpc.aio.ServicerContext
    ) -> pb.ComputeTotalLossResponse:
        return await self._run(self._total_loss, request, context)

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return self.info

    def _layer_loss(self, request: pb.ComputeLayerLossRequest) -> pb.ComputeLayerLossResponse:
        layers = validation.layers(request.layers)
        index = validation.layer_index(request.layer_index)
        teacher = validation.tensor(request.teacher, "teacher", self.backend)
        student = validation.tensor(request.student, "student", self.backend)
        result = engine.layer_loss(layers, index, teacher, student)
        return pb.ComputeLayerLossResponse(layer_loss=result.to_proto())

    def _total_loss(self, request: pb.ComputeTotalLossRequest) -> pb.ComputeTotalLossResponse:
        layers = validation.layers(request.layers)
        teachers = validation.tensor_list(request.teachers, "teachers", self.backend)
        students = validation.tensor_list(request.students, "students", self.backend)
        total, results = engine.total_loss(layers, teachers, students)
        return pb.ComputeTotalLossResponse(total_loss=total, layer_losses=[r.to_proto() for r in results])

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
            if request.ByteSize() <= INLINE_BYTES:
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
