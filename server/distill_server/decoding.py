"""Malformed request bytes on any method are INVALID_ARGUMENT: a server interceptor.

gRPC calls a handler's request deserializer itself and answers UNKNOWN, with
a traceback logged at ERROR, when it raises. The services the server hosts
from other packages (health, reflection) deserialize that way, so this
interceptor takes deserialization into the handler, where a failure can be
answered properly, logged in one line and counted. DistillService's own
methods read raw bytes and pass through untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from distill_core.errors import DistillError, InvalidArgument
from distill_server.status import to_status

__all__ = ["DecodingInterceptor"]

OnError = Callable[[str, DistillError, grpc.aio.ServicerContext], None]


class DecodingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers a request that does not parse with INVALID_ARGUMENT.

    Args:
        on_error: Called with the method, the error and the call's context
            (alive) for each request refused (logs and metrics).
    """

    def __init__(self, on_error: OnError) -> None:
        self._on_error = on_error

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _guarded(handler, details.method, self._on_error)


def _guarded(handler: grpc.RpcMethodHandler, method: str, on_error: OnError) -> grpc.RpcMethodHandler:
    """``handler`` taking raw bytes and deserializing them itself."""
    deserialize = handler.request_deserializer

    async def decode(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # protobuf's DecodeError, or any deserializer's failure
            error = InvalidArgument(f"malformed request: {exc}")
            on_error(method, error, context)
            await context.abort_with_status(to_status(error))

    async def decoded(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for raw in requests:
            yield await decode(raw, context)

    async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await _result(handler.unary_unary(await decode(raw, context), context))

    async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for item in _items(handler.unary_stream(await decode(raw, context), context)):
            yield item

    async def stream_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        return await _result(handler.stream_unary(decoded(requests, context), context))

    async def stream_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for item in _items(handler.stream_stream(decoded(requests, context), context)):
            yield item

    serializer = {"response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_unary, **serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(unary_stream, **serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(stream_unary, **serializer)
    return grpc.stream_stream_rpc_method_handler(stream_stream, **serializer)


async def _result(result: Any) -> Any:
    """A unary handler's answer, whether it was written sync or async."""
    return await result if inspect.isawaitable(result) else result


async def _items(result: Any) -> AsyncIterator[Any]:
    """A streaming handler's answers: an (async) iterator, or None when it
    wrote them with ``context.write``."""
    if inspect.isawaitable(result):
        result = await result
    if result is None:
        return
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        for item in result:
            yield item
