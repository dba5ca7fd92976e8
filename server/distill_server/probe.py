"""``distill-probe``: exit 0 when a server's gRPC health check says SERVING.

For container health checks and scripts; Kubernetes can use its native gRPC
probe on the same health service instead (plaintext only: with TLS, run this).

Its defaults follow the server's own ``DISTILL_*`` environment, so a bare
``distill-probe`` in the server's container checks that server as configured;
flags win over the environment:

- target: ``127.0.0.1:$DISTILL_PORT`` (50051), or ``$DISTILL_HOST`` instead of
  127.0.0.1 when the server binds one address rather than all of them.
- TLS: on when ``$DISTILL_TLS_CERT`` (the server serves TLS) or
  ``$DISTILL_PROBE_TLS_CA`` is set; ``--plaintext`` turns it off.
- trusted CA: ``$DISTILL_PROBE_TLS_CA``, else the server's own certificate
  ``$DISTILL_TLS_CERT``, trusted as it is (pinned).
- name checked in the certificate: ``$DISTILL_PROBE_TLS_SERVER_NAME``, else
  the target's host. A certificate that names neither 127.0.0.1 nor
  ``localhost`` needs it set to one of its names.
- client certificate (mutual TLS): ``$DISTILL_PROBE_TLS_CERT`` and
  ``$DISTILL_PROBE_TLS_KEY``, else, when the server requires one
  (``$DISTILL_TLS_CLIENT_CA``), the server's own ``$DISTILL_TLS_CERT`` and
  ``$DISTILL_TLS_KEY``: they must then be signed by that CA and allowed for
  client authentication.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["main"]

_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def _default_target(env: Mapping[str, str]) -> str:
    """The server this container runs, from its ``DISTILL_HOST`` and ``DISTILL_PORT``."""
    host = env.get("DISTILL_HOST", "").strip()
    host = "127.0.0.1" if host in _WILDCARDS else host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{host}:{env.get('DISTILL_PORT', '').strip() or '50051'}"


def _path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name, "").strip()
    return Path(value) if value else None


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill-probe",
        description=(__doc__ or "").replace("``", ""),  # the docstring's reST markup is not for a terminal
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", default=_default_target(env), help="host:port of the server")
    parser.add_argument("--service", default="", help="service to check; empty for the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--plaintext", action="store_true", help="no TLS, whatever the environment says")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA of the server's certificate: connect with TLS")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate, for a mutual-TLS server")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", help="name to expect in the server's certificate")
    return parser


def _credentials(args: argparse.Namespace, env: Mapping[str, str]) -> grpc.ChannelCredentials | None:
    """TLS credentials from the flags, else the environment; None for plaintext."""
    if args.plaintext:
        return None
    server_cert = _path(env, "DISTILL_TLS_CERT")
    ca = args.tls_ca or _path(env, "DISTILL_PROBE_TLS_CA") or server_cert
    cert, key = args.tls_cert, args.tls_key
    if cert is None and key is None:
        cert, key = _path(env, "DISTILL_PROBE_TLS_CERT"), _path(env, "DISTILL_PROBE_TLS_KEY")
    if cert is None and key is None and _path(env, "DISTILL_TLS_CLIENT_CA"):
        cert, key = server_cert, _path(env, "DISTILL_TLS_KEY")
    if ca is None and cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Check the server's health; 0 if SERVING, 1 otherwise."""
    env = os.environ
    args = _parser(env).parse_args(argv)
    try:
        credentials = _credentials(args, env)
    except OSError as exc:  # a certificate or key that cannot be read
        print(f"{args.target}: {exc}", file=sys.stderr)
        return 1
    if credentials is None:
        channel = grpc.insecure_channel(args.target)
    else:
        name = args.tls_server_name or env.get("DISTILL_PROBE_TLS_SERVER_NAME", "").strip()
        options = [("grpc.ssl_target_name_override", name)] if name else []
        channel = grpc.secure_channel(args.target, credentials, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.target}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    raise SystemExit(main())
