"""The exceptions of DistillService, shared by the client and the server.

Each class declares its gRPC status code and, for the kinds the contract
names, the ErrorInfo ``reason`` and the integer fields it carries as
metadata. The server raises these classes; ``distill_server.status`` turns
them into a ``google.rpc.Status``; :func:`from_rpc_error` turns that back into
the same class with the same fields, in any client::

    DistillError
    ├── Cancelled                      CANCELLED
    ├── Unknown                        UNKNOWN
    ├── InvalidArgument                INVALID_ARGUMENT
    │   ├── DimensionMismatch          DIMENSION_MISMATCH (expected, got)
    │   ├── TeacherStudentMismatch     TEACHER_STUDENT_MISMATCH (teacher, student)
    │   ├── EmptyInput                 EMPTY_INPUT
    │   ├── NonFiniteInput             NON_FINITE_INPUT (index)
    │   └── ShapeMismatch              SHAPE_MISMATCH
    ├── DeadlineExceeded               DEADLINE_EXCEEDED
    ├── NotFound                       NOT_FOUND
    │   └── RegionNotFound             REGION_NOT_FOUND
    ├── PermissionDenied               PERMISSION_DENIED
    │   └── RegionRefused              REGION_REFUSED
    ├── ResourceExhausted              RESOURCE_EXHAUSTED
    │   ├── MessageTooLarge            MESSAGE_TOO_LARGE
    │   └── LimitExceeded              LIMIT_EXCEEDED (limit, got)
    ├── FailedPrecondition             FAILED_PRECONDITION
    │   ├── RegionTruncated            REGION_TRUNCATED
    │   ├── SharedMemoryDisabled       SHARED_MEMORY_DISABLED
    │   └── CudaIpcUnavailable         CUDA_IPC_UNAVAILABLE
    ├── OutOfRange                     OUT_OF_RANGE
    │   ├── LayerIndexOutOfRange       LAYER_INDEX_OUT_OF_RANGE (expected, got),
    │   │                              also a DimensionMismatch
    │   ├── LossOverflow               LOSS_OVERFLOW
    │   └── RegionOutOfBounds          REGION_OUT_OF_BOUNDS
    ├── Unimplemented                  UNIMPLEMENTED
    ├── Internal                       INTERNAL
    ├── Unavailable                    UNAVAILABLE
    └── Unauthenticated                UNAUTHENTICATED

The first three seed-named kinds (``DimensionMismatch``,
``TeacherStudentMismatch``, ``EmptyInput``) are those of the reference
``FeatureDistiller``, with its fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "DOMAIN",
    "Cancelled",
    "CudaIpcUnavailable",
    "DeadlineExceeded",
    "DimensionMismatch",
    "DistillError",
    "EmptyInput",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LayerIndexOutOfRange",
    "LimitExceeded",
    "LossOverflow",
    "MessageTooLarge",
    "NonFiniteInput",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "RegionNotFound",
    "RegionOutOfBounds",
    "RegionRefused",
    "RegionTruncated",
    "ResourceExhausted",
    "ShapeMismatch",
    "SharedMemoryDisabled",
    "TeacherStudentMismatch",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_classes",
    "from_rich_status",
    "from_rpc_error",
    "from_status",
]

DOMAIN = "distill.v1"
"""The ErrorInfo domain of every error this service defines."""


class DistillError(Exception):
    """Base of every DistillService error.

    Attributes:
        message: What went wrong, with the values involved.
        field: The request field path it concerns (e.g. ``students[2].data``),
            or None.
        layer: The layer it concerns, or None.
        code: The gRPC status code.
        reason: The ErrorInfo reason.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    reason: ClassVar[str] = "UNKNOWN"
    int_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        layer: int | None = None,
        **values: int,
    ) -> None:
        missing = set(self.int_fields) ^ set(values)
        if missing:
            raise TypeError(f"{type(self).__name__} takes fields {self.int_fields}, got {sorted(values)}")
        super().__init__(message)
        self.message = message
        self.field = field
        self.layer = layer
        for name, value in values.items():
            setattr(self, name, int(value))

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        parts = [repr(self.message)]
        parts += [f"{name}={getattr(self, name)!r}" for name in self.int_fields]
        parts += [f"{name}={value!r}" for name in ("field", "layer") if (value := getattr(self, name)) is not None]
        return f"{type(self).__name__}({', '.join(parts)})"

    def metadata(self) -> dict[str, str]:
        """The ErrorInfo metadata: the class's fields, then layer and field."""
        md = {name: str(getattr(self, name)) for name in self.int_fields}
        if self.layer is not None:
            md["layer"] = str(self.layer)
        if self.field is not None:
            md["field"] = self.field
        return md

    @classmethod
    def from_metadata(cls, message: str, metadata: Mapping[str, str]) -> DistillError:
        """Rebuild an error of this class from ErrorInfo metadata."""
        layer = metadata.get("layer")
        return cls(
            message,
            field=metadata.get("field"),
            layer=int(layer) if layer is not None else None,
            **{name: int(metadata[name]) for name in cls.int_fields},
        )


class Cancelled(DistillError):
    """The call was cancelled, usually by the caller."""

    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class Unknown(DistillError):
    """An error the server did not classify."""

    code = grpc.StatusCode.UNKNOWN
    reason = "UNKNOWN"


class InvalidArgument(DistillError):
    """A malformed request: bad dtype, shape, data length or configuration."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class DimensionMismatch(InvalidArgument):
    """A count differs from the number of layers (the seed's DimensionMismatch).

    Attributes:
        expected: The number of layers.
        got: The count sent (for a layer index, the index plus one).
    """

    reason = "DIMENSION_MISMATCH"
    int_fields = ("expected", "got")
    expected: int
    got: int


class TeacherStudentMismatch(InvalidArgument):
    """A layer's teacher and student differ in length (the seed's error).

    Attributes:
        teacher: The teacher's element count.
        student: The student's element count.
    """

    reason = "TEACHER_STUDENT_MISMATCH"
    int_fields = ("teacher", "student")
    teacher: int
    student: int


class EmptyInput(InvalidArgument):
    """A layer's teacher has no elements (the seed's EmptyInput)."""

    reason = "EMPTY_INPUT"


class NonFiniteInput(InvalidArgument):
    """A tensor holds NaN or infinity.

    Attributes:
        index: Flat (C-order) index of the first non-finite element.
    """

    reason = "NON_FINITE_INPUT"
    int_fields = ("index",)
    index: int


class ShapeMismatch(InvalidArgument):
    """Teacher and student shapes differ where a per-row loss needs them equal."""

    reason = "SHAPE_MISMATCH"


class DeadlineExceeded(DistillError):
    """The call did not finish before its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class NotFound(DistillError):
    """The server does not know the method (an older or other server?)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class PermissionDenied(DistillError):
    """The caller is not allowed to make this call."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class RegionNotFound(NotFound):
    """A shared-memory file or region handle the server does not know."""

    reason = "REGION_NOT_FOUND"


class RegionRefused(PermissionDenied):
    """A shared-memory file the server will not use: a symlink, not a
    regular file, not its user's, or open to other users."""

    reason = "REGION_REFUSED"


class ResourceExhausted(DistillError):
    """A server limit was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class MessageTooLarge(ResourceExhausted):
    """A request or response exceeds a gRPC message-size limit.

    The message says which limit: the client's ``max_message_bytes`` or the
    server's ``--max-message-mb``.
    """

    reason = "MESSAGE_TOO_LARGE"


class LimitExceeded(ResourceExhausted):
    """A request or the server's load is over a configured limit.

    The message names the server flag (``--max-layers``, ``--max-elements``,
    ``--max-concurrent-calls``).

    Attributes:
        limit: The configured limit.
        got: What the request (or the server's load) amounts to.
    """

    reason = "LIMIT_EXCEEDED"
    int_fields = ("limit", "got")
    limit: int
    got: int


class FailedPrecondition(DistillError):
    """The server is not in a state to answer."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class RegionTruncated(FailedPrecondition):
    """A shared-memory region whose file was cut shorter after it was registered."""

    reason = "REGION_TRUNCATED"


class SharedMemoryDisabled(FailedPrecondition):
    """The server shares no memory, or none with this client (another host,
    another shared-memory directory or user)."""

    reason = "SHARED_MEMORY_DISABLED"


class CudaIpcUnavailable(FailedPrecondition):
    """CUDA memory cannot go by IPC handle here: the server computes on the
    CPU or has CUDA IPC off, the memory is on another GPU than the server's,
    the driver refuses the handle, or (on the client) the tensors are not on
    a GPU the server shares."""

    reason = "CUDA_IPC_UNAVAILABLE"


class OutOfRange(DistillError):
    """A value lies outside the range the operation allows."""

    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "OUT_OF_RANGE"


class LayerIndexOutOfRange(OutOfRange, DimensionMismatch):
    """A layer index >= the number of layers (the seed's DimensionMismatch).

    Attributes:
        expected: The number of layers.
        got: The index plus one, as the seed reports it.
    """

    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "LAYER_INDEX_OUT_OF_RANGE"


class LossOverflow(OutOfRange):
    """Finite inputs whose loss is not representable (overflows float64)."""

    reason = "LOSS_OVERFLOW"


class RegionOutOfBounds(OutOfRange):
    """A shared-memory range outside its region, or a file shorter than the
    region it should hold."""

    reason = "REGION_OUT_OF_BOUNDS"


class Unimplemented(DistillError):
    """The server does not implement this method."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


class Internal(DistillError):
    """A bug on the server side; the message says what failed."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


class Unavailable(DistillError):
    """The server cannot be reached or is shutting down; safe to retry."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class Unauthenticated(DistillError):
    """The call lacks valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


def error_classes() -> list[type[DistillError]]:
    """Every error class, the base included."""
    found: list[type[DistillError]] = []
    pending: list[type[DistillError]] = [DistillError]
    while pending:
        cls = pending.pop()
        if cls not in found:
            found.append(cls)
            pending.extend(cls.__subclasses__())
    return found


_BY_REASON = {cls.reason: cls for cls in error_classes() if cls is not DistillError}
_BY_CODE = {cls.code: cls for cls in _BY_REASON.values() if cls.reason == cls.code.name}

_TOO_LARGE_HINTS = {
    "Sent message larger than max": "raise the client's max_message_bytes",
    "Received message larger than max": (
        "raise the server's --max-message-mb (or, for a response, the client's max_message_bytes)"
    ),
}


def from_status(code: grpc.StatusCode, message: str, status: status_pb2.Status | None) -> DistillError:
    """Map a status code, message and optional rich status to its exception.

    The class is chosen by the ErrorInfo reason when the status carries one
    from this service, else by the status code.
    """
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                cls = _BY_REASON.get(info.reason)
                if info.domain == DOMAIN and cls is not None:
                    try:
                        return cls.from_metadata(message, info.metadata)
                    except (KeyError, ValueError, TypeError):
                        break
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        for marker, hint in _TOO_LARGE_HINTS.items():
            if marker in message:
                return MessageTooLarge(f"{message}: {hint}")
    cls = _BY_CODE.get(code)
    return cls(message) if cls is not None else Unknown(f"{code.name}: {message}")


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def from_rich_status(status: status_pb2.Status) -> DistillError:
    """Map a ``google.rpc.Status`` message (e.g. a stream step's error) to its exception."""
    return from_status(_CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.message, status)


def from_rpc_error(exc: grpc.RpcError) -> DistillError:
    """Map a failed gRPC call, synchronous or asyncio's, to the DistillError it stands for."""
    if not isinstance(exc, (grpc.Call, grpc.aio.AioRpcError)):
        return Unknown(str(exc))
    try:
        status = rpc_status.from_call(exc)
    except ValueError:
        status = None
    return from_status(exc.code(), exc.details() or "", status)
