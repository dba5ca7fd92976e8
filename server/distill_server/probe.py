"""``distill-probe``: exit 0 when a server's gRPC health check says SERVING.

For container health checks and scripts; Kubernetes can use its native gRPC
probe on the same health service instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Check ``--target``'s health; 0 if SERVING, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="distill-probe", description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    parser.add_argument("--service", default="", help="service to check; empty for the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA of the server's certificate: connect with TLS")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate, for a mutual-TLS server")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    args = parser.parse_args(argv)
    if args.tls_ca or args.tls_cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
            private_key=args.tls_key.read_bytes() if args.tls_key else None,
            certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
        )
        channel = grpc.secure_channel(args.target, credentials)
    else:
        channel = grpc.insecure_channel(args.target)
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
