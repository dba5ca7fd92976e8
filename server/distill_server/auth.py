"""Bearer-token authentication: a server interceptor.

A call without ``authorization: Bearer <token>`` (compared in constant time)
is refused with UNAUTHENTICATED before its handler runs, and before its
request message is read: the refusal is a handler with a streaming request
side that never reads, so gRPC buffers no more of the request than HTTP/2
flow control lets the client send ahead (the stream window, 64 KiB to a few
MiB with BDP probing), and drops it with the stream. That is as little as
gRPC allows: the headers must be read to see the token. The health service
stays open for probes.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from distill_core.errors import Unauthenticated
from distill_server.decoding import OnError
from distill_server.status import to_status

__all__ = ["OPEN_PREFIXES", "BearerTokenInterceptor"]

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods reachable without a token."""


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls that do not carry the server's bearer token.

    Args:
        token: The expected token.
        on_reject: Called with the method, the error and the call's context
            (alive) for each refused call (logs and metrics), as the other
            refusals are.
    """

    def __init__(self, token: str, on_reject: OnError = lambda method, error, context: None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

    def _authorised(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES) or self._authorised(details):
            return handler
        return _refusing(details.method, self._on_reject)


def _refusing(method: str, on_reject: OnError) -> grpc.RpcMethodHandler:
    """A handler that aborts with UNAUTHENTICATED without reading the request
    (any RPC shape: no message is read or sent)."""
    error = Unauthenticated(f"{method} needs 'authorization: Bearer <token>' metadata with the server's token")
    status = to_status(error)

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        on_reject(method, error, context)
        await context.abort_with_status(status)

    return grpc.stream_unary_rpc_method_handler(refuse)
