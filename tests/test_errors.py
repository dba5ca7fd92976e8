"""Every error survives the wire: server exception -> rich status -> the same exception."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from distill_core import errors
from distill_core.errors import DistillError, error_classes, from_rpc_error, from_status
from distill_server.status import to_status

_ERROR_TO_RAISE: dict[str, DistillError] = {}


def _sample(cls: type[DistillError]) -> DistillError:
    values = {name: 1000 + i for i, name in enumerate(cls.int_fields)}
    return cls(f"a {cls.__name__} happened", field="students[3].data", layer=3, **values)


class _Raise(grpc.GenericRpcHandler):
    """A real handler whose calls fail with the error named by the method."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        error = _ERROR_TO_RAISE.get(details.method.rsplit("/", 1)[-1])
        if error is None:
            return None

        def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort_with_status(to_status(error))
            raise AssertionError("unreachable")

        return grpc.unary_unary_rpc_method_handler(fail)


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[_Raise()], options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(None)


CLASSES = [cls for cls in error_classes() if cls is not DistillError]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_round_trips_over_grpc(channel: grpc.Channel, cls: type[DistillError]) -> None:
    sent = _sample(cls)
    _ERROR_TO_RAISE[cls.__name__] = sent
    call = channel.unary_unary(f"/test/{cls.__name__}")
    with pytest.raises(grpc.RpcError) as info:
        call(b"", timeout=10)
    assert info.value.code() == cls.code
    received = from_rpc_error(info.value)
    assert type(received) is cls
    assert received.message == sent.message
    assert (received.field, received.layer) == ("students[3].data", 3)
    for name in cls.int_fields:
        assert getattr(received, name) == getattr(sent, name)

    # What a client in another language sees: standard rich error details.
    status = rpc_status.from_call(info.value)
    infos, requests = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            infos.append(error_details_pb2.ErrorInfo())
            detail.Unpack(infos[-1])
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            requests.append(error_details_pb2.BadRequest())
            detail.Unpack(requests[-1])
    assert [(i.domain, i.reason) for i in infos] == [(errors.DOMAIN, cls.reason)]
    assert {k: infos[0].metadata[k] for k in cls.int_fields} == {k: str(getattr(sent, k)) for k in cls.int_fields}
    assert [(v.field, v.description) for v in requests[0].field_violations] == [("students[3].data", sent.message)]


def test_reasons_and_codes_are_unique() -> None:
    reasons = [cls.reason for cls in CLASSES]
    assert len(reasons) == len(set(reasons))
    code_classes = [cls for cls in CLASSES if cls.reason == cls.code.name]
    assert len({cls.code for cls in code_classes}) == len(code_classes)


def test_every_error_class_is_exported() -> None:
    assert {cls.__name__ for cls in CLASSES} <= set(errors.__all__)


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK], ids=lambda c: c.name)
def test_every_status_code_maps_to_an_error(code: grpc.StatusCode) -> None:
    error = from_status(code, "boom", None)
    assert isinstance(error, DistillError)
    assert "boom" in error.message
    if error.code is not code:  # codes the service never sends are kept in the message
        assert type(error) is errors.Unknown and code.name in error.message


def test_foreign_error_info_falls_back_to_the_status_code() -> None:
    status = to_status(errors.EmptyInput("x"))
    rich = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    rich.details[0].Unpack(info)
    info.domain = "someone.else"
    rich.details[0].Pack(info)
    assert type(from_status(grpc.StatusCode.INVALID_ARGUMENT, "x", rich)) is errors.InvalidArgument


def test_message_too_large_hints() -> None:
    sent = from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "Sent message larger than max (10 vs. 5)", None)
    assert type(sent) is errors.MessageTooLarge and "max_message_bytes" in sent.message
    received = from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (10 vs. 5)", None)
    assert type(received) is errors.MessageTooLarge and "--max-message-mb" in received.message


def test_fields_are_required() -> None:
    with pytest.raises(TypeError):
        errors.TeacherStudentMismatch("x", teacher=1)  # type: ignore[call-arg]
    error: Any = errors.TeacherStudentMismatch("x", teacher=1, student=2)
    assert (error.teacher, error.student) == (1, 2)
    assert repr(error) == "TeacherStudentMismatch('x', teacher=1, student=2)"
