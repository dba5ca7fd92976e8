"""``distill-server``: flags (and their environment variables), logging,
signals, processes and the wait; nothing else."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from distill_server import __version__
from distill_server.backend import BackendError
from distill_server.server import DistillServer, ServerConfig, format_address
from distill_server.validation import Limits

__all__ = ["JsonFormatter", "main", "parse_args", "serve"]

log = logging.getLogger("distill_server")

_MIB = 1024 * 1024
_ENV_PREFIX = "DISTILL_"
_LOG_FIELDS = ("rpc", "code", "reason", "peer", "error")


def _env_name(flag: str) -> str:
    return _ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


class _Parser(argparse.ArgumentParser):
    """Every flag's default comes from its environment variable (``--max-layers``:
    ``DISTILL_MAX_LAYERS``), so flags win over the environment."""

    def flag(self, flag: str, default: Any, help: str, type: Callable[[str], Any] = str, **kwargs: Any) -> None:
        env = _env_name(flag)
        raw = os.environ.get(env)
        if raw is not None and raw != "":
            try:
                default = type(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                self.error(f"${env}={raw!r}: {exc}")
            choices = kwargs.get("choices")
            if choices is not None and default not in choices:
                self.error(f"${env}={raw!r}: expected one of {', '.join(choices)}")
        shown = "off" if default is None else default
        self.add_argument(flag, type=type, default=default, help=f"{help} [env {env}; default {shown}]", **kwargs)


def parse_args(argv: Sequence[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    """The server configuration, and the CLI-only options (logging, processes)."""
    defaults, limits = ServerConfig(), Limits()
    parser = _Parser(
        prog="distill-server", description="Serve DistillService: knowledge-distillation losses over gRPC."
    )
    parser.flag("--host", defaults.host, "address to listen on (0.0.0.0 for all interfaces)")
    parser.flag("--port", defaults.port, "port to listen on; 0 picks a free one", type=int)
    parser.flag("--device", defaults.device, "auto (CUDA when CuPy finds a device, else the CPU), cpu, cuda or cuda:N")
    parser.flag("--workers", defaults.workers, "threads computing large requests", type=_positive)
    parser.flag("--processes", 1, "server processes sharing the port (SO_REUSEPORT), for the CPU", type=_positive)
    parser.flag(
        "--grace", defaults.grace_seconds, "seconds calls in flight get to finish on SIGTERM/SIGINT", type=float
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
        "--max-concurrent-calls", limits.max_concurrent_calls, "most calls served at once per process", type=_positive
    )
    parser.flag("--metrics-port", None, "serve Prometheus metrics on this port (0 picks one)", type=int)
    parser.flag("--tls-cert", None, "PEM certificate chain: serve TLS", type=Path)
    parser.flag("--tls-key", None, "PEM private key of --tls-cert", type=Path)
    parser.flag("--tls-client-ca", None, "PEM CA bundle: require client certificates it signed (mutual TLS)", type=Path)
    parser.flag("--auth-token-file", None, "file holding the bearer token calls must carry", type=Path)
    parser.flag("--log-level", "INFO", "DEBUG, INFO, WARNING or ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.flag("--log-format", "text", "text or json (one JSON object per line)", choices=["text", "json"])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.epilog = (
        f"The bearer token may also come from ${_ENV_PREFIX}AUTH_TOKEN. Health checks (grpc.health.v1) need no token."
    )
    args = parser.parse_args(argv)
    if args.max_message_mb > 2047:
        parser.error(f"--max-message-mb is {args.max_message_mb}; expected 1 to 2047 (protobuf's limit is 2 GiB)")
    token = os.environ.get(f"{_ENV_PREFIX}AUTH_TOKEN") or None
    if args.auth_token_file is not None:
        token = args.auth_token_file.read_text().strip()
        if not token:
            parser.error(f"--auth-token-file {args.auth_token_file} is empty")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        device=args.device,
        workers=args.workers,
        limits=Limits(
            max_message_bytes=args.max_message_mb * _MIB,
            max_layers=args.max_layers,
            max_elements=args.max_elements,
            max_concurrent_calls=args.max_concurrent_calls,
        ),
        grace_seconds=args.grace,
        metrics_port=args.metrics_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token=token,
    )
    return config, args


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and a failed
    call's rpc, code, reason, peer and error."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **{name: getattr(record, name) for name in _LOG_FIELDS if hasattr(record, name)},
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(level: str, form: str) -> None:
    handler = logging.StreamHandler()
    if form == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


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
        "distill-server %s ready on %s (pid %d, device %s, %d workers, max message %d MiB%s%s%s)",
        __version__,
        server.address,
        os.getpid(),
        server.backend.description,
        config.workers,
        config.limits.max_message_bytes // _MIB,
        ", TLS" if config.tls_cert else "",
        ", token auth" if config.auth_token else "",
        metrics,
    )
    await stopping.wait()
    log.info("draining: refusing new calls, %.1f s for calls in flight", config.grace_seconds)
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
    _configure_logging(level, form)
    raise SystemExit(_run(config))


def _metrics_port(port: int | None, index: int) -> int | None:
    """Process ``index``'s metrics port: ``port + index``, or a free one for 0."""
    return port if not port else port + index


def _serve_processes(config: ServerConfig, count: int, level: str, form: str) -> int:
    """``count`` server processes on one port (SO_REUSEPORT), as gRPC's own
    multiprocessing example: the kernel spreads connections over them."""
    port = config.port
    if port == 0:  # pick one for all of them
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((config.host, 0))
            port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")  # no gRPC state crosses a fork
    children = [
        context.Process(
            target=_child,
            args=(
                replace(config, port=port, reuse_port=True, metrics_port=_metrics_port(config.metrics_port, i)),
                level,
                form,
            ),
            name=f"distill-server-{i}",
        )
        for i in range(count)
    ]
    stopping = False

    def forward(sig: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.start()
    log.info("distill-server %s: %d processes on %s", __version__, count, format_address(config.host, port))
    running = list(children)
    while running:
        multiprocessing.connection.wait([child.sentinel for child in running])
        for child in [c for c in running if not c.is_alive()]:
            running.remove(child)
            if not stopping:  # a process died on its own: stop the rest, report it
                log.error("%s exited with status %s; stopping the others", child.name, child.exitcode)
                forward(signal.SIGTERM, None)
    return max(_exit_status(child.exitcode) for child in children)


def _exit_status(code: int | None) -> int:
    """A process's exit status as a shell reports it (128 + N when killed by signal N)."""
    if code is None:
        return 1
    return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``distill-server``; returns the exit status."""
    config, args = parse_args(argv)
    _configure_logging(args.log_level, args.log_format)
    if args.processes > 1:
        return _serve_processes(config, args.processes, args.log_level, args.log_format)
    return _run(config)
