"""``distill-server``: flags, logging, signals and the wait; nothing else."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Sequence

from distill_server import __version__
from distill_server.backend import BackendError
from distill_server.server import DistillServer, ServerConfig

__all__ = ["main", "parse_args", "serve"]

log = logging.getLogger("distill_server")

_MIB = 1024 * 1024


def parse_args(argv: Sequence[str] | None = None) -> tuple[ServerConfig, str]:
    """The server configuration and log level from the command line."""
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="distill-server",
        description="Serve DistillService: knowledge-distillation losses over gRPC.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=defaults.host, help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=defaults.port, help="port to listen on; 0 picks a free one")
    parser.add_argument(
        "--device",
        default=defaults.device,
        help="auto (CUDA when CuPy finds a device, else the CPU), cpu, cuda or cuda:N",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="threads computing losses (calls computed at once)",
    )
    parser.add_argument(
        "--max-message-mb",
        type=int,
        default=defaults.max_message_bytes // _MIB,
        help="largest request or response in MiB; larger calls get RESOURCE_EXHAUSTED (at most 2047)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=defaults.grace_seconds,
        help="seconds calls in flight get to finish on SIGTERM/SIGINT",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("DISTILL_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    if not 1 <= args.max_message_mb <= 2047:
        parser.error(f"--max-message-mb is {args.max_message_mb}; expected 1 to 2047 (protobuf's limit is 2 GiB)")
    if args.workers < 1:
        parser.error(f"--workers is {args.workers}; expected >= 1")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        device=args.device,
        workers=args.workers,
        max_message_bytes=args.max_message_mb * _MIB,
        grace_seconds=args.grace,
    )
    return config, args.log_level


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then drain and return."""
    server = DistillServer(config)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    log.info(
        "distill-server %s ready on %s (device %s, %d workers, max message %d MiB)",
        __version__,
        server.address,
        server.backend.description,
        config.workers,
        config.max_message_bytes // _MIB,
    )
    await stopping.wait()
    log.info("draining: refusing new calls, %.1f s for calls in flight", config.grace_seconds)
    await server.stop()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``distill-server``; returns the exit status."""
    config, level = parse_args(argv)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(config))
    except BackendError as exc:
        log.error("cannot use device %r: %s", config.device, exc)
        return 2
    except RuntimeError as exc:
        log.error("cannot serve on %s: %s", config.address, exc)
        return 1
    return 0
