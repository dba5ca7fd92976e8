"""What the server is started with: ``ServerConfig`` (the CLI's flags) and
the ``Limits`` it holds calls to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from distill_server.admission import READ_COPIES

__all__ = ["Limits", "ServerConfig", "format_address"]

_MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What calls may ask of the server (the ``--max-*`` and timeout flags).

    ``max_inflight_bytes`` bounds the bytes of unary calls in flight (being
    received, computed or answered); None means ``max(2 GiB, 12 x
    max_message_bytes)``, room to receive ten largest messages at once and
    copy one (see :mod:`distill_server.admission`).
    """

    max_message_bytes: int = 256 * _MIB
    max_layers: int = 1024
    max_elements: int = 1 << 28
    max_concurrent_calls: int = 64
    max_concurrent_streams: int = 16
    max_streams_per_connection: int = 100
    max_inflight_bytes: int | None = None
    receive_timeout: float = 30.0
    stream_idle_timeout: float = 300.0
    max_shared_memory_bytes: int = 4096 * _MIB
    max_shared_memory_regions: int = 64

    @property
    def inflight_bytes(self) -> int:
        """``max_inflight_bytes`` with its default resolved."""
        if self.max_inflight_bytes is not None:
            return self.max_inflight_bytes
        return max(2048 * _MIB, 4 * READ_COPIES * self.max_message_bytes)

    def check(self) -> None:
        """Raises ValueError when the limits cannot serve a largest message."""
        needed = READ_COPIES * self.max_message_bytes
        if self.inflight_bytes < needed:
            raise ValueError(
                f"--max-inflight-mb {self.inflight_bytes // _MIB} cannot receive a largest message: gRPC holds "
                f"{READ_COPIES} copies of it while it hands it over, so at least {needed // _MIB}"
            )
        for name in ("receive_timeout", "stream_idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected > 0")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server is started with (the CLI's flags)."""

    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    workers: int = 4
    engine_threads: int | None = None
    """Threads one large layer may be computed on (the CPU engine), shared
    by every computation of the process; None: the CPUs it may use."""
    limits: Limits = field(default_factory=Limits)
    grace_seconds: float = 10.0
    drain_delay_seconds: float = 0.0
    max_connection_age_seconds: float | None = None
    metrics_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token: str | None = field(default=None, repr=False)
    reuse_port: bool = False
    shared_memory_dir: Path | None = Path("/dev/shm")
    cuda_ipc: bool = True
    """Take tensors in CUDA memory of clients on the server's GPU (CUDA IPC);
    it applies only where the device is CUDA."""

    @property
    def address(self) -> str:
        """``host:port`` to bind (IPv6 hosts bracketed)."""
        return format_address(self.host, self.port)


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
