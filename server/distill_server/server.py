"""``DistillServer``: the gRPC server with its options, servicer and health.

Separate from the CLI so tests can run the real server in-process on port 0.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from distill_client.losses import DistilLoss
from distill_server import backend as backends
from distill_server import engine
from distill_server.servicer import SERVICE_NAME, DistillServicer, add_to_server

__all__ = ["DistillServer", "ServerConfig", "format_address"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server is started with (the CLI's flags)."""

    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    workers: int = 4
    max_message_bytes: int = 256 * 1024 * 1024
    grace_seconds: float = 10.0

    @property
    def address(self) -> str:
        """``host:port`` to bind (IPv6 hosts bracketed)."""
        return format_address(self.host, self.port)


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _warm_up(backend: backends.Backend) -> None:
    """One small computation of every loss, so the first call pays no set-up."""
    x = backend.to_device(np.linspace(-1.0, 1.0, 64, dtype=np.float32))
    losses = (DistilLoss.mse(), DistilLoss.cosine(), DistilLoss.combined(0.5, 0.5, 2.0))
    with backend.activate():
        for loss in losses:
            engine.loss_value(loss, x, x[::-1].copy())


class DistillServer:
    """A DistillService bound to its port, with health and reflection.

    Raises:
        BackendError: the configured device cannot be used.
        RuntimeError: the address cannot be bound (a busy port fails: no
            SO_REUSEPORT).
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.backend = backends.select(config.device)
        _warm_up(self.backend)
        self.executor = ThreadPoolExecutor(config.workers, thread_name_prefix="distill")
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        add_to_server(DistillServicer(self.backend, self.executor, config.max_message_bytes), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(config.address)

    @property
    def address(self) -> str:
        """``host:port`` with the port actually bound."""
        return format_address(self.config.host, self.port)

    async def start(self) -> None:
        """Start serving; health reports SERVING."""
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health goes NOT_SERVING, new calls are refused, calls in
        flight get ``grace`` seconds to finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_seconds if grace is None else grace)
        self.executor.shutdown(wait=True)

    async def wait(self) -> None:
        """Wait until the server stops."""
        await self.server.wait_for_termination()
