"""``DistillServer``: the gRPC server with its options, servicer, health,
reflection, metrics, TLS and authentication.

Separate from the CLI so tests can run the real server in-process on port 0.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import logging
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from distill_core.errors import DistillError
from distill_core.losses import DistilLoss
from distill_core.rpc import SERVICE_NAME
from distill_server import backend as backends
from distill_server import engine, parallel
from distill_server.auth import BearerTokenInterceptor
from distill_server.config import ServerConfig, format_address
from distill_server.cuda_ipc import CudaIpc
from distill_server.decoding import DecodingInterceptor
from distill_server.metrics import Metrics
from distill_server.servicer import DistillServicer, add_to_server, log_failure
from distill_server.shared_memory import SOCKET_PREFIX, Regions, SealedSocket

__all__ = ["DistillServer"]

log = logging.getLogger(__name__)

_CANCEL_MARGIN = 0.5
"""Seconds between dropping the computations left at the end of the grace
period (they answer UNAVAILABLE) and gRPC cancelling what is still open."""


class _Health(health.aio.HealthServicer):  # type: ignore[misc]
    """grpcio-health-checking's servicer with ``List``, which it lacks (each
    call answered UNIMPLEMENTED with a NotImplementedError logged at ERROR)."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        statuses = self._server_status.items()  # the parent's table, as Check reads it
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses}
        )


def _warm_up(backend: backends.Backend) -> None:
    """One small float32 computation of every loss kind, with and without a
    gradient, so the first call pays no set-up (on a GPU: no kernel compiled)."""
    losses = (DistilLoss.mse(), DistilLoss.cosine(), DistilLoss.kl_divergence(2.0), DistilLoss.combined(0.5, 0.5, 2.0))
    with backend.activate():
        x = backend.to_device(np.linspace(-1.0, 1.0, 64, dtype=np.float32))
        for loss, scale in itertools.product(losses, (None, 1.0)):
            engine.evaluate(loss, x, x[::-1].copy(), scale)


def _connection_age(seconds: float | None) -> list[tuple[str, int]]:
    """gRPC's option to send GOAWAY to connections older than ``seconds``
    (plus or minus 10%, so clients do not reconnect at once). Clients then
    connect anew, re-resolving their target: behind a headless Service they
    find replicas added since. Calls in flight on the old connection finish
    (no ``max_connection_age_grace``): a stream may last a whole training run."""
    return [] if seconds is None else [("grpc.max_connection_age_ms", max(1, round(seconds * 1000)))]


def _shared_memory_dir(config: ServerConfig) -> Path | None:
    """Where clients' shared-memory files are, if shared memory is on."""
    directory, limits = config.shared_memory_dir, config.limits
    if directory is None or not directory.is_dir() or limits.max_shared_memory_bytes <= 0:
        return None
    return directory


def _sealed_socket(config: ServerConfig) -> SealedSocket | None:
    """The socket for sealed memory files, where shared memory is on and the
    platform has sealing (Linux)."""
    directory = _shared_memory_dir(config)
    if directory is None or not hasattr(fcntl, "F_GET_SEALS"):
        return None
    path = directory / f"{SOCKET_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.sock"
    limits = config.limits
    return SealedSocket(path, limits.max_shared_memory_regions, limits.receive_timeout)


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class DistillServer:
    """A DistillService bound to its port, with health, reflection and metrics.

    The device is chosen in the constructor. Health reports NOT_SERVING from
    :meth:`start` until every loss has been computed once on the device
    (CUDA kernels compiled), SERVING after, NOT_SERVING from :meth:`stop` on.

    Raises:
        BackendError: the configured device cannot be used.
        ValueError: an incomplete TLS configuration, or limits that cannot
            hold a largest message.
        RuntimeError: the address cannot be bound (a busy port fails: no
            SO_REUSEPORT unless ``reuse_port``, for multi-process serving).
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        config.limits.check()
        credentials = _credentials(config)
        self.backend = backends.select(config.device)
        parallel.cores.resize(config.engine_threads or parallel.available())
        self.metrics = Metrics(self.backend.device, self.backend.description)
        self.executor = ThreadPoolExecutor(config.workers, thread_name_prefix="distill")
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if config.auth_token:
            interceptors.append(BearerTokenInterceptor(config.auth_token, self._count_refused))
        interceptors.append(DecodingInterceptor(self._count_refused))
        limits = config.limits
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", limits.max_message_bytes),
                ("grpc.max_receive_message_length", limits.max_message_bytes),
                ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
                ("grpc.so_reuseport", int(config.reuse_port)),
                # BDP probing grows every stream's window to megabytes, so gRPC would take in data no handler
                # asked to read (16 MB a call, measured). Without it a call holds at most the 64 KiB initial
                # window until its read starts, and a read still opens the window to its whole message.
                ("grpc.http2.bdp_probe", 0),
                *_connection_age(config.max_connection_age_seconds),
            ],
        )
        self._sealed = _sealed_socket(config)
        try:
            regions = Regions(
                _shared_memory_dir(config),
                limits.max_shared_memory_bytes,
                limits.max_shared_memory_regions,
                self._sealed,
            )
            cuda_ipc = CudaIpc(self.backend.ordinal, config.cuda_ipc, self.metrics.cuda_ipc_mappings.set)
            self.servicer = DistillServicer(self.backend, self.executor, limits, self.metrics, regions, cuda_ipc)
            add_to_server(self.servicer, self.server)
            self.health = _Health()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
            services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(services, self.server)
            if credentials is None:
                self.port = self.server.add_insecure_port(config.address)
            else:
                self.port = self.server.add_secure_port(config.address, credentials)
        except BaseException:
            if self._sealed is not None:
                self._sealed.close()
            raise
        self.metrics_port: int | None = None
        self._expiry: asyncio.Future[None] | None = None

    def _count_refused(self, method: str, error: DistillError, context: grpc.aio.ServicerContext) -> None:
        """A call refused before its handler (no token, malformed bytes): logged and counted like any failure."""
        rpc = method.rsplit("/", 1)[-1]
        log_failure(rpc, error, context.peer())
        self.metrics.labelled(self.metrics.requests, rpc, error.code.name).inc()

    @property
    def address(self) -> str:
        """``host:port`` with the port actually bound."""
        return format_address(self.config.host, self.port)

    async def start(self) -> None:
        """Start serving (and the metrics endpoint); health reports
        NOT_SERVING while the device warms up, SERVING after."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port)
        await asyncio.get_running_loop().run_in_executor(self.executor, _warm_up, self.backend)
        limits = self.config.limits
        period = min(0.5, limits.receive_timeout / 4, limits.stream_idle_timeout / 4)
        self._expiry = asyncio.ensure_future(self.servicer.expire(period))
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health goes NOT_SERVING and calls are still served for the
        drain delay, so that balancers leave this server first; then new
        calls are refused and calls in flight get ``grace`` seconds. What is
        still computing or queued then is dropped with UNAVAILABLE (losses
        are pure: the client retries elsewhere), and what is still open half
        a second later is cancelled by gRPC."""
        grace = self.config.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.config.drain_delay_seconds > 0:
            await asyncio.sleep(self.config.drain_delay_seconds)
        stopping = asyncio.ensure_future(self.server.stop(grace + _CANCEL_MARGIN))
        leases = asyncio.ensure_future(self.servicer.end_leases())
        done, _ = await asyncio.wait({stopping}, timeout=grace)
        leases.cancel()
        if not done:
            dropped = self.servicer.abandon(
                f"the server is shutting down and the call did not finish within its {grace:g} s grace "
                "period (--grace); retry it on another replica"
            )
            log.warning("grace period over: dropping %d call(s) in flight", dropped)
        await stopping
        if self._expiry is not None:
            self._expiry.cancel()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.metrics.close()
        if self._sealed is not None:
            self._sealed.close()

    async def wait(self) -> None:
        """Wait until the server stops."""
        await self.server.wait_for_termination()
