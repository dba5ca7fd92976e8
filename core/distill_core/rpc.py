"""The RPCs of ``distill.v1.DistillService``, named once for the client and
the server: the service's name and each method's path, shape and message
types, read from the proto's descriptor so they cannot drift from it."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from distill.v1 import distill_pb2 as pb

__all__ = [
    "COMPUTE_LAYER_LOSS",
    "COMPUTE_TOTAL_LOSS",
    "GET_SERVER_INFO",
    "RPCS",
    "SERVICE_NAME",
    "STREAM_LOSSES",
    "Rpc",
]

_SERVICE = pb.DESCRIPTOR.services_by_name["DistillService"]

SERVICE_NAME: str = _SERVICE.full_name
"""``distill.v1.DistillService``: for health checks, reflection and service configs."""


@dataclass(frozen=True)
class Rpc:
    """One method of the service."""

    name: str
    """The method's name in the proto, and the servicer's method for it."""
    path: str
    """``/distill.v1.DistillService/<name>``, what a channel calls."""
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool


RPCS: dict[str, Rpc] = {
    method.name: Rpc(
        name=method.name,
        path=f"/{SERVICE_NAME}/{method.name}",
        request=getattr(pb, method.input_type.name),
        response=getattr(pb, method.output_type.name),
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )
    for method in _SERVICE.methods
}
"""Every method of the service, by name, in the proto's order."""

COMPUTE_LAYER_LOSS = RPCS["ComputeLayerLoss"]
COMPUTE_TOTAL_LOSS = RPCS["ComputeTotalLoss"]
STREAM_LOSSES = RPCS["StreamLosses"]
GET_SERVER_INFO = RPCS["GetServerInfo"]
