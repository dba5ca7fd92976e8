"""DistillError -> ``google.rpc.Status``: the server's half of the error mapping.

The status carries an ErrorInfo (domain, reason, the error's fields as
metadata) and, when the error names a request field, a BadRequest field
violation, so clients in any language can read them.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from distill_core.errors import DOMAIN, DistillError

__all__ = ["MAX_TEXT_CHARS", "bounded", "to_rich_status", "to_status"]

MAX_TEXT_CHARS = 1024
"""Longest message or metadata value an error carries (gRPC's trailers, and
a client's patience, are limited: 8 KiB of metadata by default)."""


def bounded(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text``, cut in the middle to at most ``limit`` characters."""
    if len(text) <= limit:
        return text
    keep = limit - 40  # the marker is shorter than 40 characters
    half = keep // 2
    return f"{text[:half]} ...[{len(text) - keep} characters cut]... {text[len(text) - (keep - half) :]}"


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_rich_status(error: DistillError) -> status_pb2.Status:
    """The ``google.rpc.Status`` of an error (code, message, ErrorInfo, BadRequest)."""
    message = bounded(error.message)
    metadata = {key: bounded(value, 256) for key, value in error.metadata().items()}
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata))]
    if error.field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=bounded(error.field, 256), description=message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    return status_pb2.Status(code=error.code.value[0], message=message, details=details)


def to_status(error: DistillError) -> grpc.Status:
    """The rich gRPC status of an error, ready for ``context.abort_with_status``."""
    return rpc_status.to_status(to_rich_status(error))
