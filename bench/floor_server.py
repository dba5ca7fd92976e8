"""gRPC's own cost: a server that takes ComputeTotalLoss as raw bytes and
answers nine bytes, with no protobuf and no computation.

    python bench/floor_server.py sync|aio [name=value ...]

Channel arguments (integers) apply to the server; prints the port, serves
until killed.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent import futures
from typing import Any

import grpc

LIMIT = 1 << 30
ANSWER = b"\x09" + bytes(8)  # total_loss = 0.0
SERVICE, METHOD = "distill.v1.DistillService", "ComputeTotalLoss"


def options(arguments: list[str]) -> list[tuple[str, Any]]:
    """The message limits, then each ``name=value`` (an integer)."""
    extra = [(name, int(value)) for name, _, value in (a.partition("=") for a in arguments)]
    return [("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT), *extra]


def sync(arguments: list[str]) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(4), options=options(arguments))
    handler = grpc.unary_unary_rpc_method_handler(lambda raw, context: ANSWER)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler})])
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    server.wait_for_termination()


async def aio(arguments: list[str]) -> None:
    async def answer(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return ANSWER

    server = grpc.aio.server(options=options(arguments))
    handler = grpc.unary_unary_rpc_method_handler(answer)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler})])
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    if sys.argv[1] == "sync":
        sync(sys.argv[2:])
    else:
        asyncio.run(aio(sys.argv[2:]))
