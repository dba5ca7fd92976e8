"""``AsyncDistillClient``: :class:`~distill_client.DistillClient`'s API for asyncio.

For trainers and data loaders written with asyncio: every method is a
coroutine on one ``grpc.aio`` channel, made with the same arguments as
``DistillClient`` (limits, retries, round-robin over healthy replicas, TLS,
token) and answering the same results and typed errors. Tensors travel as
bytes in the messages (what ``transport="grpc"`` does): shared memory and
CUDA IPC belong to the synchronous client.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from distill.v1 import distill_pb2 as pb
from distill_client.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT,
    ChannelSettings,
    LayerSpec,
    ServerInfo,
    TotalLoss,
    channel_target,
    default_target,
    layer_config,
    layer_loss_request,
    total_loss_request,
)
from distill_client.shared_memory import Batch
from distill_client.stream import StepResult, step_bound
from distill_core import rpc, tensors, wire
from distill_core.errors import DeadlineExceeded, Unavailable, from_rich_status, from_rpc_error
from distill_core.losses import LayerLoss

__all__ = ["AsyncDistillClient", "AsyncStreamSession"]


def _batch(teachers: Any, students: Any) -> Batch:
    """A call's tensors, inline."""
    return Batch(tensors.per_layer("teachers", teachers), tensors.per_layer("students", students))


class AsyncDistillClient:
    """One asyncio channel to a DistillService; use ``async with`` or
    ``await client.close()``.

    Arguments as :class:`~distill_client.DistillClient`'s (without
    ``transport``). Every method raises a
    :class:`~distill_core.errors.DistillError` subclass on failure.
    """

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = 4,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = channel_target(target or default_target())
        self.timeout = timeout
        settings = ChannelSettings.of(
            max_message_bytes, retries, token, tls_ca, tls_cert, tls_key, tls, credentials, options
        )
        self._metadata = settings.metadata
        if settings.credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=settings.options)
        else:
            self._channel = grpc.aio.secure_channel(self.target, settings.credentials, options=settings.options)
        self._layer_loss = self._unary(rpc.COMPUTE_LAYER_LOSS)
        self._total_loss = self._unary(rpc.COMPUTE_TOTAL_LOSS)
        self._server_info = self._unary(rpc.GET_SERVER_INFO)
        self._stream_losses = self._channel.stream_stream(
            rpc.STREAM_LOSSES.path, response_deserializer=rpc.STREAM_LOSSES.response.FromString
        )

    def _unary(self, method: rpc.Rpc) -> Any:
        return self._channel.unary_unary(method.path, response_deserializer=method.response.FromString)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncDistillClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: bytes, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    async def compute_layer_loss(
        self,
        layers: Sequence[LayerSpec],
        layer_index: int,
        teacher: Any,
        student: Any,
        *,
        names: Sequence[str] | None = None,
        gradients: bool = False,
        timeout: float | None = None,
        labels: Any = None,
    ) -> LayerLoss:
        """Layer ``layer_index``'s loss, weighted by its weight (see
        :meth:`DistillClient.compute_layer_loss`)."""
        batch = _batch([teacher], [student])
        request = layer_loss_request(layer_config(layers, names), layer_index, gradients, batch, labels)
        response: pb.ComputeLayerLossResponse = await self._call(self._layer_loss, request, timeout)
        return batch.layers([response.layer_loss])[0]

    async def compute_total_loss(
        self,
        layers: Sequence[LayerSpec],
        teachers: Sequence[Any],
        students: Sequence[Any],
        *,
        names: Sequence[str] | None = None,
        gradients: bool = False,
        timeout: float | None = None,
        labels: Mapping[int, Any] | None = None,
    ) -> TotalLoss:
        """The weighted sum of every layer's loss, and each layer's part (see
        :meth:`DistillClient.compute_total_loss`)."""
        batch = _batch(teachers, students)
        request = total_loss_request(layer_config(layers, names), gradients, batch, labels)
        response: pb.ComputeTotalLossResponse = await self._call(self._total_loss, request, timeout)
        return TotalLoss(response.total_loss, batch.layers(response.layer_losses))

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """What the server offers: version, device, dtypes, loss kinds, limits."""
        request = pb.GetServerInfoRequest().SerializeToString()
        return ServerInfo.from_proto(await self._call(self._server_info, request, timeout))

    def stream(
        self,
        layers: Sequence[LayerSpec],
        *,
        gradients: bool = False,
        names: Sequence[str] | None = None,
        timeout: float | None = None,
        step_timeout: float | None = None,
    ) -> AsyncStreamSession:
        """Open a ``StreamLosses`` stream (see :meth:`DistillClient.stream`;
        ``step_timeout`` likewise defaults to the client's ``timeout``)."""
        config = pb.StreamConfig(layers=layer_config(layers, names), return_gradients=gradients)
        per_step = step_bound(self.timeout if step_timeout is None else step_timeout)
        call = self._stream_losses(timeout=timeout, metadata=self._metadata)
        return AsyncStreamSession(call, config, per_step)


class AsyncStreamSession:
    """:class:`~distill_client.StreamSession` for asyncio: ``await
    session.step(teachers, students)``; use ``async with`` or ``await
    session.close()``. A step the server rejects raises its error and the
    stream goes on; a step with no answer within ``step_timeout`` ends the
    stream with :class:`~distill_core.errors.DeadlineExceeded`."""

    def __init__(self, call: Any, config: pb.StreamConfig, step_timeout: float | None) -> None:
        self._call = call
        self._config: pb.StreamConfig | None = config  # sent with the first step
        self._step_timeout = step_timeout
        self._next_id = 0
        self._closed = False

    async def step(
        self,
        teachers: Sequence[Any],
        students: Sequence[Any],
        step_id: int | None = None,
        *,
        labels: Mapping[int, Any] | None = None,
    ) -> StepResult:
        """The losses (and gradients, if configured) of one step (see :meth:`StreamSession.step`)."""
        if self._closed:
            raise Unavailable("the stream is closed")
        step_id = self._next_id if step_id is None else step_id
        self._next_id = step_id + 1
        batch = _batch(teachers, students)
        message = pb.StreamLossesRequest(step_id=step_id, labels=tensors.labels_by_layer(labels))
        request = wire.build(message, teachers=batch.teachers, students=batch.students)
        try:
            if self._config is not None:
                await self._call.write(pb.StreamLossesRequest(config=self._config).SerializeToString())
                self._config = None
            await self._call.write(request)
            response = await asyncio.wait_for(self._call.read(), self._step_timeout)
        except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on
            await self.close()
            raise DeadlineExceeded(
                f"step {step_id} got no answer within {self._step_timeout:g} s (step_timeout); the stream is over"
            ) from None
        except grpc.aio.AioRpcError as exc:
            self._closed = True
            raise from_rpc_error(exc) from exc
        if response is grpc.aio.EOF:
            self._closed = True
            raise Unavailable("the server ended the stream")
        if response.HasField("error"):
            raise from_rich_status(response.error)
        return StepResult(response.step_id, response.total_loss, batch.layers(response.layer_losses))

    @property
    def closed(self) -> bool:
        """Whether the stream is over (closed here, or ended by an error)."""
        return self._closed

    async def close(self) -> None:
        """End the stream (idempotent)."""
        if not self._closed:
            self._closed = True
            self._call.cancel()

    async def __aenter__(self) -> AsyncStreamSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
