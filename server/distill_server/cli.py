"""``distill-server``: flags (and their environment variables), logging,
signals, processes and the wait; nothing else."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distill_server import __version__, parallel
from distill_server.backend import BackendError
from distill_server.config import Limits, ServerConfig
from distill_server.logs import configure_logging
from distill_server.server import DistillServer
from distill_server.supervisor import supervise

__all__ = ["main", "parse_args", "serve", "tls_problem"]

log = logging.getLogger("distill_server")

_MIB = 1024 * 1024
_ENV_PREFIX = "DISTILL_"


def _env_name(flag: str) -> str:
    return _ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0 to 65535)")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a finite number > 0")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a finite number >= 0")
    return value


class _Parser(argparse.ArgumentParser):
    """Every flag's default comes from its environment variable (``--max-layers``:
    ``DISTILL_MAX_LAYERS``), so flags win over the environment. A bad value
    in the environment is reported after parsing, so ``--help`` and
    ``--version`` answer whatever the environment holds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.environment_errors: list[str] = []

    def flag(self, flag: str, default: Any, help: str, type: Callable[[str], Any] = str, **kwargs: Any) -> None:
        env = _env_name(flag)
        raw = os.environ.get(env)
        if raw is not None and raw != "":
            choices = kwargs.get("choices")
            try:
                value = type(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                self.environment_errors.append(f"${env}={raw!r}: {exc}")
            else:
                if choices is not None and value not in choices:
                    self.environment_errors.append(f"${env}={raw!r}: expected one of {', '.join(choices)}")
                else:
                    default = value
        shown = "off" if default is None else default
        self.add_argument(flag, type=type, default=default, help=f"{help} [env {env}; default {shown}]", **kwargs)

    def switch(self, flag: str, default: bool, help: str) -> None:
        """``--flag`` and ``--no-flag``; the environment variable takes 1, true,
        yes, on or 0, false, no, off."""
        env = _env_name(flag)
        raw = os.environ.get(env)
        if raw is not None and raw != "":
            words = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(("0", "false", "no", "off"), False)
            if raw.strip().lower() not in words:
                self.environment_errors.append(f"${env}={raw!r}: expected 1, true, yes, on, 0, false, no or off")
            else:
                default = words[raw.strip().lower()]
        dest = flag.lstrip("-").replace("-", "_")
        group = self.add_mutually_exclusive_group()
        shown = "on" if default else "off"
        group.add_argument(
            flag, dest=dest, action="store_true", default=default, help=f"{help} [env {env}; default {shown}]"
        )
        group.add_argument("--no-" + flag.lstrip("-"), dest=dest, action="store_false", help=f"the opposite of {flag}")


def parse_args(argv: Sequence[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    """The server configuration, and the CLI-only options (logging, processes)."""
    defaults, limits = ServerConfig(), Limits()
    parser = _Parser(
        prog="distill-server", description="Serve DistillService: knowledge-distillation losses over gRPC."
    )
    parser.flag("--host", defaults.host, "address to listen on (0.0.0.0 for all interfaces)")
    parser.flag("--port", defaults.port, "port to listen on; 0 picks a free one", type=_port)
    parser.flag("--device", defaults.device, "auto (CUDA when CuPy finds a device, else the CPU), cpu, cuda or cuda:N")
    parser.flag("--workers", defaults.workers, "threads computing large requests", type=_positive)
    parser.flag("--processes", 1, "server processes sharing the port (SO_REUSEPORT), for the CPU", type=_positive)
    parser.flag(
        "--engine-threads",
        None,
        "threads one large layer may be computed on, shared by the calls of a process (CPU); default: the CPUs "
        "the process may use (affinity and container quota), divided among --processes",
        type=_positive,
    )
    parser.flag(
        "--grace",
        defaults.grace_seconds,
        "seconds calls in flight get to finish on SIGTERM/SIGINT, after the drain delay; then they are dropped",
        type=_seconds,
    )
    parser.flag(
        "--drain-delay",
        defaults.drain_delay_seconds,
        "seconds the server keeps serving, health NOT_SERVING, after SIGTERM/SIGINT (rolling restarts)",
        type=_seconds,
    )
    parser.flag(
        "--max-connection-age",
        defaults.max_connection_age_seconds,
        "seconds after which a client connection is asked to reconnect (GOAWAY), so clients "
        "balancing over DNS find new replicas; calls in flight finish",
        type=_positive_float,
    )
    parser.flag(
        "--max-message-mb",
        limits.max_message_bytes // _MIB,
        "largest request or response in MiB (1 to 2047)",
        type=_positive,
    )
    parser.flag("--max-layers", limits.max_layers, "most layers in one request", type=_positive)
    parser.flag("--max-elements", limits.max_elements, "most tensor elements in one request", type=_positive)
    parser.flag(
        "--max-concurrent-calls",
        limits.max_concurrent_calls,
        "most unary calls served at once per process",
        type=_positive,
    )
    parser.flag(
        "--max-concurrent-streams",
        limits.max_concurrent_streams,
        "most StreamLosses streams open at once per process",
        type=_positive,
    )
    parser.flag(
        "--max-streams-per-connection",
        limits.max_streams_per_connection,
        "most calls open at once on one HTTP/2 connection (more wait at the client)",
        type=_positive,
    )
    parser.flag(
        "--max-inflight-mb",
        None,
        "MiB held for unary calls in flight (received, computed, answered); a read reserves "
        "--max-message-mb, and 2 x --max-message-mb are kept for gRPC's copies; off means "
        "max(2048, 12 x --max-message-mb)",
        type=_positive,
    )
    parser.flag(
        "--receive-timeout",
        limits.receive_timeout,
        "seconds to receive a request message or a stream's first message, to wait for room in "
        "--max-inflight-mb, and for the client to take an answer",
        type=_positive_float,
    )
    parser.flag(
        "--stream-idle-timeout",
        limits.stream_idle_timeout,
        "seconds a stream may wait for its next step before the server ends it",
        type=_positive_float,
    )
    parser.flag(
        "--shared-memory-dir",
        defaults.shared_memory_dir,
        "directory of the shared-memory files clients on this host register (RegisterSharedMemory)",
        type=Path,
    )
    parser.flag(
        "--max-shared-memory-mb",
        limits.max_shared_memory_bytes // _MIB,
        "most MiB of shared-memory regions registered at once; 0 turns shared memory off",
        type=_non_negative,
    )
    parser.flag(
        "--max-shared-memory-regions",
        limits.max_shared_memory_regions,
        "most shared-memory regions registered at once",
        type=_positive,
    )
    parser.switch(
        "--cuda-ipc",
        defaults.cuda_ipc,
        "take tensors and gradient outputs in CUDA memory of clients on the server's GPU (CUDA IPC); "
        "applies where the device is CUDA",
    )
    parser.flag("--metrics-port", None, "serve Prometheus metrics on this port (0 picks one)", type=_port)
    parser.flag("--tls-cert", None, "PEM certificate chain: serve TLS", type=Path)
    parser.flag("--tls-key", None, "PEM private key of --tls-cert", type=Path)
    parser.flag("--tls-client-ca", None, "PEM CA bundle: require client certificates it signed (mutual TLS)", type=Path)
    parser.flag("--auth-token-file", None, "file holding the bearer token calls must carry", type=Path)
    parser.flag(
        "--log-level", "INFO", "DEBUG, INFO, WARNING or ERROR (any case)", type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )  # fmt: skip
    parser.flag(
        "--log-format", "text", "text or json (one JSON object per line; any case)", type=str.lower,
        choices=["text", "json"],
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.epilog = (
        f"The bearer token may also come from ${_ENV_PREFIX}AUTH_TOKEN. Health checks (grpc.health.v1) need no token."
    )
    args = parser.parse_args(argv)
    if parser.environment_errors:
        parser.error(parser.environment_errors[0])
    if args.max_message_mb > 2047:
        parser.error(f"--max-message-mb is {args.max_message_mb}; expected 1 to 2047 (protobuf's limit is 2 GiB)")
    token = os.environ.get(f"{_ENV_PREFIX}AUTH_TOKEN") or None
    if args.auth_token_file is not None:
        try:
            token = args.auth_token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"--auth-token-file {args.auth_token_file}: {getattr(exc, 'strerror', None) or exc}")
        if not token:
            parser.error(f"--auth-token-file {args.auth_token_file} is empty")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        device=args.device,
        workers=args.workers,
        engine_threads=args.engine_threads or max(1, parallel.available() // args.processes),
        limits=Limits(
            max_message_bytes=args.max_message_mb * _MIB,
            max_layers=args.max_layers,
            max_elements=args.max_elements,
            max_concurrent_calls=args.max_concurrent_calls,
            max_concurrent_streams=args.max_concurrent_streams,
            max_streams_per_connection=args.max_streams_per_connection,
            max_inflight_bytes=None if args.max_inflight_mb is None else args.max_inflight_mb * _MIB,
            receive_timeout=args.receive_timeout,
            stream_idle_timeout=args.stream_idle_timeout,
            max_shared_memory_bytes=args.max_shared_memory_mb * _MIB,
            max_shared_memory_regions=args.max_shared_memory_regions,
        ),
        grace_seconds=args.grace,
        drain_delay_seconds=args.drain_delay,
        max_connection_age_seconds=args.max_connection_age,
        metrics_port=args.metrics_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token=token,
        shared_memory_dir=args.shared_memory_dir,
        cuda_ipc=args.cuda_ipc,
    )
    try:
        config.limits.check()
    except ValueError as exc:
        parser.error(str(exc))
    return config, args


def tls_problem(config: ServerConfig) -> str | None:
    """Why the TLS files cannot serve, in one line: unreadable, or a key that
    is not the certificate's (gRPC would start and then fail every
    handshake); None when they can, or without TLS."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca is not None:
            context.load_verify_locations(config.tls_client_ca)
    except ssl.SSLError as exc:
        why = "the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(exc) else exc.reason or exc
        return f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: {why}"
    except OSError as exc:
        return f"TLS file {exc.filename or ''}: {exc.strerror or exc}"
    return None


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then drain and return."""
    server = DistillServer(config)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    metrics = f", metrics on :{server.metrics_port}" if server.metrics_port is not None else ""
    log.info(
        "distill-server %s ready on %s (pid %d, device %s, %d workers, %d engine threads, max message %d MiB%s%s%s)",
        __version__,
        server.address,
        os.getpid(),
        server.backend.description,
        config.workers,
        parallel.cores.count,
        config.limits.max_message_bytes // _MIB,
        ", TLS" if config.tls_cert else "",
        ", token auth" if config.auth_token else "",
        metrics,
    )
    await stopping.wait()
    log.info(
        "draining: NOT_SERVING, serving %.1f s more, then %.1f s for calls in flight",
        config.drain_delay_seconds,
        config.grace_seconds,
    )
    await server.stop()
    log.info("stopped")


def _run(config: ServerConfig) -> int:
    try:
        asyncio.run(serve(config))
    except BackendError as exc:
        log.error("cannot use device %r: %s", config.device, exc)
        return 2
    except (RuntimeError, ValueError, OSError) as exc:
        log.error("cannot serve on %s: %s", config.address, exc)
        return 1
    return 0


def _child(config: ServerConfig, level: str, form: str) -> None:
    faulthandler.enable()
    configure_logging(level, form)
    raise SystemExit(_run(config))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``distill-server``; returns the exit status."""
    config, args = parse_args(argv)
    problem = tls_problem(config)
    if problem is not None:
        print(f"distill-server: error: {problem}", file=sys.stderr)
        return 2
    faulthandler.enable()  # a native crash leaves every thread's Python stack on stderr
    configure_logging(args.log_level, args.log_format)
    if args.processes > 1:
        return supervise(config, args.processes, args.log_level, args.log_format, target=_child)
    return _run(config)
