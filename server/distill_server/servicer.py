"""The DistillService methods: receive -> decode and check -> engine -> encode.

Every method is registered as streaming on both sides, so the server
decides when a message is read and when an answer is sent: a unary call
reads its request only once it holds a slot and has reserved what the read
can buffer from the byte budget of :mod:`distill_server.admission`, and
keeps both until the client has taken its answer. (A stream would hold a
reservation while it waits for its next step, so streams are bounded by
their count, their message limit and their timeouts instead.) Large
computations run in a thread pool so the event loop keeps accepting calls;
they stop at their next block when their call is cancelled or dropped. A
call is dropped by a drain, or when it has waited on its client past its
timeout, which one sweep over the calls checks (:meth:`DistillServicer.expire`).
Every call passes through :meth:`DistillServicer._call`, the one place that
admits it, counts it (metrics), logs a failure and translates a
DistillError into a rich status. The gRPC context is read only while its
call is known to be alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from distill.v1 import distill_pb2 as pb
from distill_core import tensors, wire
from distill_core.errors import (
    Cancelled,
    DeadlineExceeded,
    DistillError,
    Internal,
    InvalidArgument,
    LimitExceeded,
    MessageTooLarge,
    Unavailable,
)
from distill_core.losses import ELEMENTWISE, LossKind, kind_of
from distill_core.rpc import RPCS, SERVICE_NAME
from distill_server import __version__, engine, validation
from distill_server.admission import READ_COPIES, Budget, Reservation, Work
from distill_server.backend import Backend
from distill_server.config import Limits
from distill_server.cuda_ipc import CudaIpc, Reference, Session, output_reference
from distill_server.interruption import interruptible
from distill_server.metrics import Metrics
from distill_server.shared_memory import Regions
from distill_server.status import bounded, to_rich_status, to_status

__all__ = ["DistillServicer", "Parsed", "add_to_server", "log_failure"]

log = logging.getLogger(__name__)

_DROPPED = "dropped by the server"
"""The message of the cancellation :meth:`_Call.drop` sends its task."""

_Message = TypeVar("_Message", bound=Message)
Kind = Literal["unary", "stream", "lease"]
Target = pb.SharedMemoryRef | pb.CudaIpcRef
"""Where a layer's gradient goes instead of the response: shared memory or CUDA memory."""
_WIRE_CODES = {dtype: code for code, dtype in tensors.DTYPES.items()}

INLINE_BYTES = 64 * 1024
"""Requests up to this size are computed on the event loop: a hop to a pool
thread costs more (about 0.1 ms here) than their whole computation. Only
element-wise losses: a batch loss of a few kilobytes can take a second
(RKD's angles grow as the batch cubed), which would stall every call."""


def _elementwise(layers: Sequence[pb.Layer]) -> bool:
    """Whether every layer's loss is element-wise (a kind-less one fails its check at once)."""
    return all(kind_of(layer.loss) in (*ELEMENTWISE, None) for layer in layers)


@dataclass(frozen=True)
class Parsed(Generic[_Message]):
    """A loss request: the message without its tensors, the tensors as views,
    how many bytes the server holds for it, and how many its tensors in CUDA
    memory hold (the client's GPU memory, not the server's)."""

    message: _Message
    views: dict[str, list[wire.TensorView]]
    nbytes: int
    device_bytes: int = 0


class DistillServicer:
    """Computes losses on ``backend``, large ones in ``executor``'s threads.

    The loss methods take the serialized request: :mod:`distill_core.wire`
    splits it so that tensors are views on the received bytes, and frames the
    response so that gradients are copied once. Unary calls and streams have
    their own concurrency limits, so neither can starve the other.
    """

    def __init__(
        self,
        backend: Backend,
        executor: Executor,
        limits: Limits,
        metrics: Metrics,
        regions: Regions,
        cuda_ipc: CudaIpc | None = None,
    ) -> None:
        self.backend = backend
        self.regions = regions
        self.cuda_ipc = cuda_ipc if cuda_ipc is not None else CudaIpc(backend.ordinal, enabled=False)
        self._leases: dict[str, asyncio.Event] = {}
        self.executor = executor
        self.limits = limits
        self.metrics = metrics
        self.active_calls = 0
        self.active_streams = 0
        copying = (READ_COPIES - 1) * limits.max_message_bytes  # the message gRPC is copying, one at a time
        self.budget = Budget(limits.inflight_bytes - copying, "--max-inflight-mb", metrics.inflight_bytes.set)
        self._calls: set[_Call] = set()
        self._working = 0  # calls other than leases
        self._quiet = asyncio.Event()
        self._quiet.set()
        self.closing: str | None = None
        self.info = pb.GetServerInfoResponse(
            version=__version__,
            device=backend.device,
            device_description=backend.description,
            supported_dtypes=list(tensors.DTYPES),
            supported_loss_kinds=[kind.value for kind in LossKind],
            max_message_bytes=limits.max_message_bytes,
            shared_memory=regions.info(),
            cuda_ipc=self.cuda_ipc.info(),
        ).SerializeToString()

    # ------------------------------------------------------------ the RPCs

    async def ComputeLayerLoss(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        async with self._call("ComputeLayerLoss", context) as call:
            request = call.hold(self._parse(pb.ComputeLayerLossRequest, await call.request()))
            await call.answer(await call.run(self._layer_loss, request, _elementwise(request.message.layers)))

    async def ComputeTotalLoss(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        async with self._call("ComputeTotalLoss", context) as call:
            request = call.hold(self._parse(pb.ComputeTotalLossRequest, await call.request()))
            await call.answer(await call.run(self._total_loss, request, _elementwise(request.message.layers)))

    async def StreamLosses(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        """One configuration, then one response per step; a failed step
        answers with its error and the stream goes on."""
        async with self._call("StreamLosses", context, kind="stream") as call:
            first = await call.receive(self.limits.receive_timeout, "--receive-timeout")
            if first is None:
                return
            layers, gradients = self._stream_config(first)
            log.debug("stream started: peer=%s layers=%d", call.peer, len(layers))
            idle = self.limits.stream_idle_timeout
            while (payload := await call.receive(idle, "--stream-idle-timeout")) is not None:
                call.steps += 1
                await call.answer(await self._step(call, payload, layers, gradients))

    async def GetServerInfo(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        async with self._call("GetServerInfo", context) as call:
            self._small(pb.GetServerInfoRequest, await call.request())
            await call.answer(self.info)

    async def RegisterSharedMemory(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        """Register a region, answer its handle, and hold it while the call is open."""
        async with self._call("RegisterSharedMemory", context, kind="lease") as call:
            region = self.regions.register(self._small(pb.RegisterSharedMemoryRequest, await call.request()))
            self._leases[region.handle] = lease = asyncio.Event()
            self._count_regions()
            try:
                log.debug("region registered: peer=%s bytes=%d", call.peer, region.byte_size)
                await call.answer(
                    pb.RegisterSharedMemoryResponse(
                        region=region.handle, byte_size=region.byte_size
                    ).SerializeToString()
                )
                await lease.wait()  # UnregisterSharedMemory; or the call ends: cancelled, gone, dropped
            finally:
                del self._leases[region.handle]
                self.regions.release(region)
                self._count_regions()

    async def UnregisterSharedMemory(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        async with self._call("UnregisterSharedMemory", context) as call:
            request = self._small(pb.UnregisterSharedMemoryRequest, await call.request())
            region = self.regions.get(request.region)
            self._leases[region.handle].set()
            await call.answer(pb.UnregisterSharedMemoryResponse().SerializeToString())

    async def GetSharedMemoryStatus(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        async with self._call("GetSharedMemoryStatus", context) as call:
            request = self._small(pb.GetSharedMemoryStatusRequest, await call.request())
            await call.answer(self.regions.status(list(request.regions)).SerializeToString())

    # ------------------------------------------------------------ the work

    def _parse(self, message_type: type[_Message], payload: bytes) -> Parsed[_Message]:
        """A loss request split (tensors as views on ``payload``), with the
        bytes it makes the server hold: its own and those it names in
        shared memory, which the message limit bounds as it bounds inline ones
        (tensors in CUDA memory are the client's: ``--max-elements`` bounds them).

        Raises:
            InvalidArgument, LimitExceeded: see :func:`distill_core.wire.split`.
            MessageTooLarge: more bytes in shared memory than ``--max-message-mb``.
        """
        message, views = wire.split(message_type, payload, self.limits.max_layers)
        shared = sum(v.shared_memory.byte_size for vs in views.values() for v in vs if v.shared_memory is not None)
        if len(payload) + shared > self.limits.max_message_bytes:
            raise MessageTooLarge(
                f"the request's tensors in shared memory hold {shared} bytes, which with its own {len(payload)} "
                f"is over this server's limit of {self.limits.max_message_bytes} (--max-message-mb); send fewer "
                "layers per call"
            )
        device = sum(v.cuda_ipc.byte_size for vs in views.values() for v in vs if v.cuda_ipc is not None)
        return Parsed(message, views, len(payload) + shared, device)

    @staticmethod
    def _small(message_type: type[_Message], payload: bytes) -> _Message:
        """A request without tensors, parsed."""
        try:
            return message_type.FromString(payload)
        except DecodeError as exc:
            raise InvalidArgument(f"malformed request: {exc}") from exc

    def _layer_loss(self, parsed: Parsed[pb.ComputeLayerLossRequest]) -> bytes:
        request, views = parsed.message, parsed.views
        layers = validation.layers(request.layers, self.limits)
        index = validation.layer_index(request.layer_index)
        labels = validation.layer_labels(request.labels, layers, index) if request.HasField("labels") else None
        with self.cuda_ipc.session() as ipc:
            teacher = validation.tensor(self._resolve(views["teacher"], "teacher", repeated=False), "teacher")
            student = validation.tensor(self._resolve(views["student"], "student", repeated=False), "student")
            targets = self._targets(
                [request.gradient_output] if request.HasField("gradient_output") else [],
                [request.gradient_cuda_output] if request.HasField("gradient_cuda_output") else [],
                1,
                request.return_gradients,
                singular=True,
            )
            target, name = targets[0] if targets else (None, "")
            into = self._into([target], [student], [name], first_layer=index)
            self._count_elements("ComputeLayerLoss", [teacher, student])
            (out,) = self._open_outputs(ipc, into)
            teacher, student = self._on_device(ipc, [teacher, student])
            result = engine.layer_loss(
                layers, index, teacher, student, gradient=request.return_gradients, out=out, labels=labels
            )
            ipc.finish()
            encoded = self._encode(result, student.dtype, target, name, written=out is not None)
        return wire.build(pb.ComputeLayerLossResponse(), layer_loss=encoded)

    def _total_loss(self, parsed: Parsed[pb.ComputeTotalLossRequest]) -> bytes:
        request = parsed.message
        layers = validation.layers(request.layers, self.limits)
        total, results = self._total(
            "ComputeTotalLoss",
            layers,
            parsed.views,
            request.return_gradients,
            request.gradient_outputs,
            request.gradient_cuda_outputs,
            validation.labels(request.labels, layers),
        )
        return wire.build(pb.ComputeTotalLossResponse(total_loss=total), layer_losses=results)

    def _total(
        self,
        rpc: str,
        layers: list[engine.Layer],
        views: dict[str, list[wire.TensorView]],
        gradients: bool,
        outputs: Sequence[pb.SharedMemoryRef],
        cuda_outputs: Sequence[pb.CudaIpcRef] = (),
        labels: Mapping[int, Any] | None = None,
    ) -> tuple[float, list[wire.Framed]]:
        """Decode the tensors, compute every layer, encode the results; CUDA
        memory the request names is mapped for this alone."""
        with self.cuda_ipc.session() as ipc:
            teachers = validation.tensor_list(self._resolve(views["teachers"], "teachers"), "teachers")
            students = validation.tensor_list(self._resolve(views["students"], "students"), "students")
            named = self._targets(outputs, cuda_outputs, len(layers), gradients)
            targets: list[Target | None] = [target for target, _ in named] or [None] * len(students)
            names = [name for _, name in named] or [""] * len(students)
            into = self._into(targets, students, names)
            self._count_elements(rpc, [*teachers, *students])
            out = self._open_outputs(ipc, into)
            total, results = engine.total_loss(
                layers,
                self._on_device(ipc, teachers),
                self._on_device(ipc, students),
                gradient=gradients,
                out=out,
                labels=labels,
            )
            ipc.finish()
            return total, [
                self._encode(r, s.dtype, target, name, written=array is not None)
                for r, s, target, name, array in zip(results, students, targets, names, out, strict=True)
            ]

    def _resolve(self, views: list[wire.TensorView], field: str, repeated: bool = True) -> list[wire.TensorView]:
        """``views`` with the bytes of those in shared memory read from their regions."""
        return [self._read(view, f"{field}[{i}]" if repeated else field) for i, view in enumerate(views)]

    def _read(self, view: wire.TensorView, field: str) -> wire.TensorView:
        if view.shared_memory is None or view.cuda_ipc is not None:  # CUDA memory: refused with both set
            return view
        if len(view.data):
            raise InvalidArgument(f"{field} sets both data and shared_memory; set one", field=field)
        data = self.regions.read(view.shared_memory, f"{field}.shared_memory")
        return wire.TensorView(view.dtype, view.shape, data)

    def _into(
        self,
        targets: Sequence[Target | None],
        students: Sequence[validation.Input],
        fields: Sequence[str],
        first_layer: int = 0,
    ) -> list[Any]:
        """Where the engine writes each gradient: an array in mapped shared
        memory (a target in a sealed region, on the CPU), a checked range of
        CUDA memory (opened by :meth:`_open_outputs`), or None where the
        gradient is written to its target after (or has none)."""
        into: list[Any] = []
        for layer, (target, s, field) in enumerate(zip(targets, students, fields, strict=False), first_layer):
            if isinstance(target, pb.CudaIpcRef):
                into.append(output_reference(target, s.dtype, s.shape, field, layer))
            elif target is None or self.backend.device != "cpu":
                into.append(None)
            else:
                into.append(self.regions.array(target, s.dtype, s.shape, field))
        return into

    @staticmethod
    def _open_outputs(ipc: Session, into: list[Any]) -> list[Any]:
        """``into`` with its ranges of CUDA memory mapped, as arrays."""
        return [ipc.output(item) if isinstance(item, Reference) else item for item in into]

    @staticmethod
    def _targets(
        shared: Sequence[pb.SharedMemoryRef],
        cuda: Sequence[pb.CudaIpcRef],
        layers: int,
        gradients: bool,
        singular: bool = False,
    ) -> list[tuple[Target, str]]:
        """Where gradients go instead of the response, with their fields:
        none, or one range per layer, all in shared memory or all in CUDA memory."""
        kind = "gradient_cuda_output" if cuda else "gradient_output"
        field = kind if singular else f"{kind}s"
        if shared and cuda:
            raise InvalidArgument(
                f"both {field} and {field.replace('cuda_', '')} are set; gradients go to one kind of memory",
                field=field,
            )
        outputs: Sequence[Target] = cuda or shared
        if outputs and not gradients:
            raise InvalidArgument("gradient outputs are set but no gradients are asked for", field=field)
        if outputs and len(outputs) != layers:
            raise InvalidArgument(
                f"{len(outputs)} gradient outputs for {layers} layers; send none or one per layer", field=field
            )
        return [(output, field if singular else f"{field}[{i}]") for i, output in enumerate(outputs)]

    def _count_regions(self) -> None:
        self.metrics.shared_memory_regions.set(len(self.regions))
        self.metrics.shared_memory_bytes.set(self.regions.registered_bytes)

    def _count_elements(self, rpc: str, arrays: Sequence[validation.Counted]) -> None:
        self.metrics.labelled(self.metrics.elements, rpc).inc(validation.elements(arrays, self.limits))

    def _on_device(self, ipc: Session, inputs: list[validation.Input]) -> list[Any]:
        """The inputs on the device: host arrays moved there, CUDA memory mapped where it is."""
        return [ipc.tensor(x) if isinstance(x, Reference) else self.backend.to_device(x) for x in inputs]

    def _encode(
        self,
        result: engine.LayerResult,
        dtype: np.dtype[Any],
        output: Target | None,
        field: str,
        written: bool = False,
    ) -> wire.Framed:
        """A layer's result, its gradient in the student's wire dtype framed
        without protobuf's copies, or in shared memory at ``output`` (where
        the engine has ``written`` it already, or copied there now), or in
        CUDA memory at ``output`` (written there by the engine)."""
        message = result.loss.to_proto()
        if result.gradient is None:
            return wire.frame(message)
        if isinstance(output, pb.CudaIpcRef):
            echo = pb.Tensor(dtype=_WIRE_CODES[dtype], shape=result.gradient.shape, cuda_ipc=output)
            return wire.frame(message, student_gradient=echo)
        code, gradient = tensors.to_wire(self.backend.to_host(result.gradient).astype(dtype, copy=False))
        if output is None:
            return wire.frame(message, student_gradient=gradient)
        if not written:
            self.regions.write(output, gradient.reshape(-1).view(np.uint8).data, field)
        reference = pb.Tensor(dtype=code, shape=gradient.shape, shared_memory=output)
        return wire.frame(message, student_gradient=reference)

    def _stream_config(self, payload: bytes) -> tuple[list[engine.Layer], bool]:
        request, views = wire.split(pb.StreamLossesRequest, payload, self.limits.max_layers)
        if not request.HasField("config"):
            raise InvalidArgument("the first message of a stream must set config", field="config")
        if views["teachers"] or views["students"] or request.step_id or request.labels:
            raise InvalidArgument("the first message of a stream carries only config", field="config")
        return validation.layers(request.config.layers, self.limits), request.config.return_gradients

    async def _step(self, call: _Call, payload: bytes, layers: list[engine.Layer], gradients: bool) -> bytes:
        step_id = 0

        def step(parsed: Parsed[pb.StreamLossesRequest]) -> bytes:
            request = parsed.message
            if request.HasField("config"):
                raise InvalidArgument("config may be set only in the first message of a stream", field="config")
            total, results = self._total(
                "StreamLosses",
                layers,
                parsed.views,
                gradients,
                request.gradient_outputs,
                request.gradient_cuda_outputs,
                validation.labels(request.labels, layers),
            )
            return wire.build(pb.StreamLossesResponse(step_id=step_id, total_loss=total), layer_losses=results)

        try:
            parsed = self._parse(pb.StreamLossesRequest, payload)
            step_id = parsed.message.step_id
            response = await call.run(step, parsed, all(layer.loss.kind in ELEMENTWISE for layer in layers))
        except DistillError as error:
            if error is call.dropped:
                raise  # the stream is over (dropped: a drain, a timeout), not the step
            self.metrics.labelled(self.metrics.stream_steps, error.code.name).inc()
            log_failure("StreamLosses", error, call.peer, f" step={step_id}")
            return pb.StreamLossesResponse(step_id=step_id, error=to_rich_status(error)).SerializeToString()
        self.metrics.labelled(self.metrics.stream_steps, "OK").inc()
        return response

    def compute(self, method: Callable[[Parsed[Any]], bytes], request: Parsed[Any], work: Work | None = None) -> bytes:
        """Run ``method`` on the device, stoppable between blocks through
        ``work``; an answer over the message limit is an error, not a send."""
        if work is not None:
            work.check()  # dropped while it was queued
        stoppable = interruptible(work.check) if work else contextlib.nullcontext()
        with self.backend.activate(), stoppable:
            response = method(request)
        if len(response) > self.limits.max_message_bytes:
            raise MessageTooLarge(
                f"the answer would be {len(response)} bytes, over this server's limit of "
                f"{self.limits.max_message_bytes} (--max-message-mb); ask for fewer layers or no gradients per call"
            )
        return response

    async def expire(self, period: float) -> None:
        """Every ``period`` seconds, end the calls that have waited on their
        client past their timeout with DEADLINE_EXCEEDED (runs until cancelled)."""
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for call in list(self._calls):
                if call.waiting is not None and call.waiting[0] < now:
                    call.drop(DeadlineExceeded(call.waiting[1]))

    async def end_leases(self) -> None:
        """Once no call but the regions' leases is left, end the leases (with
        OK): a stopping server waits for calls that use a region, not for
        the clients that hold one."""
        await self._quiet.wait()
        for lease in self._leases.values():
            lease.set()

    def abandon(self, message: str) -> int:
        """End every call in flight with UNAVAILABLE and ``message``, whatever
        it waits for (its message, room in the budget, a worker, its next
        step) or computes, except one sending its answer; returns how many."""
        self.closing = message  # what a call that finishes its answer meets next
        dropped = [call for call in self._calls if not call.answering]  # an answer on its way is let through
        for call in dropped:
            call.drop(Unavailable(message))
        return len(dropped)

    # ------------------------------------------------------------ the machinery

    @contextlib.asynccontextmanager
    async def _call(self, rpc: str, context: grpc.aio.ServicerContext, kind: Kind = "unary") -> AsyncIterator[_Call]:
        """Admit, count and time one call; a DistillError aborts it with its rich status.

        A ``unary`` call takes a slot of ``--max-concurrent-calls`` and its
        bytes from the budget; a ``stream`` a slot of
        ``--max-concurrent-streams``; a ``lease`` (a shared-memory region's
        registration, open while the region lives) no slot, its region
        counting against the region limits instead.
        """
        start, code, counted = time.perf_counter(), "OK", False

        def count(code: str) -> None:
            nonlocal counted
            counted = True
            self.metrics.labelled(self.metrics.requests, rpc, code).inc()
            self.metrics.labelled(self.metrics.duration, rpc).observe(time.perf_counter() - start)

        stream = kind == "stream"
        call = _Call(self, rpc, context, None if stream else self.budget)
        log.debug("call started: rpc=%s peer=%s", rpc, call.peer)
        self._calls.add(call)
        if kind != "lease":
            self._working += 1
            self._quiet.clear()
        try:
            try:
                with self._slot(rpc, kind):
                    yield call
            except asyncio.CancelledError as cancel:
                if call.dropped is None or cancel.args != (_DROPPED,):  # the client went away
                    raise
                raise call.dropped from None  # dropped by the server (a drain, a timeout): answer why
        except DistillError as error:
            code = error.code.name
            log_failure(rpc, error, call.peer)
            count(code)  # before the status: a client that has it finds it counted
            await context.abort_with_status(to_status(error))
        except BaseException as exc:  # the client went away, or an abort
            code = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"
            raise
        finally:
            self._calls.discard(call)
            if kind != "lease":
                self._working -= 1
                if not self._working:
                    self._quiet.set()
            call.close()
            if stream:
                log.debug("stream ended: peer=%s steps=%d", call.peer, call.steps)
            if not counted:
                count(code)

    @contextlib.contextmanager
    def _slot(self, rpc: str, kind: Kind) -> Iterator[None]:
        """Hold one of ``--max-concurrent-calls`` (or ``-streams``) slots (calls run on one event loop)."""
        stream = kind == "stream"
        if (
            kind == "lease"
        ):  # not a call in flight (nor one for the autoscaler): distill_shared_memory_regions counts it
            yield
            return
        active, limit, flag = (
            (self.active_streams, self.limits.max_concurrent_streams, "--max-concurrent-streams")
            if stream
            else (self.active_calls, self.limits.max_concurrent_calls, "--max-concurrent-calls")
        )
        if active >= limit:
            what = "streams" if stream else "calls"
            raise LimitExceeded(
                f"the server is serving its limit of {limit} concurrent {what} ({flag}); retry later or add replicas",
                limit=limit,
                got=active + 1,
            )
        self._count(stream, +1)
        self.metrics.labelled(self.metrics.in_flight, rpc).inc()
        try:
            yield
        finally:
            self._count(stream, -1)
            self.metrics.labelled(self.metrics.in_flight, rpc).dec()

    def _count(self, stream: bool, delta: int) -> None:
        if stream:
            self.active_streams += delta
        else:
            self.active_calls += delta


class _Call:
    """One admitted call: what it has reserved and the work it runs."""

    def __init__(
        self, servicer: DistillServicer, rpc: str, context: grpc.aio.ServicerContext, budget: Budget | None
    ) -> None:
        self.servicer = servicer
        self.rpc = rpc
        self.context = context
        self.peer = context.peer()  # read while the call is alive: its native call may be gone once it ended
        self.budget = budget
        self.steps = 0
        self.dropped: DistillError | None = None
        self._task = asyncio.current_task()
        self.waiting: tuple[float, str] | None = None
        self.answering = False
        self._work: Work | None = None
        self._reservation: Reservation | None = None

    def drop(self, error: DistillError) -> None:
        """End the call with ``error``: what it awaits is cancelled, and its
        computation stops at its next block."""
        if self.dropped is not None:
            return
        self.dropped = error
        if self._work is not None:
            self._work.abandon(error)
        if self._task is not None:
            self._task.cancel(_DROPPED)

    async def receive(self, timeout: float, flag: str) -> bytes | None:
        """The next message (None at the end), read within ``timeout`` seconds,
        and once the budget (if any) holds the most the read can buffer."""
        limits = self.servicer.limits
        self._check_dropped()
        if self.servicer.closing is not None:
            raise Unavailable(self.servicer.closing)
        if self.budget is not None:
            self.close()  # the previous message is answered
            self._reservation = await self.budget.reserve(limits.max_message_bytes, limits.receive_timeout)
        with self._waiting(timeout, f"no complete message arrived within {timeout:g} s ({flag})"):
            # context.read(), not the request iterator: its suspended generator keeps the last message alive.
            message = await self.context.read()
        payload = None if message is grpc.aio.EOF else message
        if self._reservation is not None and payload is None:
            self._reservation.shrink(0)
        if payload is not None:
            metrics = self.servicer.metrics
            metrics.labelled(metrics.received, self.rpc).inc(len(payload))
        return payload

    def _check_dropped(self) -> None:
        """Raise the error the call was dropped with, should its cancellation
        have been lost (a wait that finished as it came)."""
        if self.dropped is not None:
            raise self.dropped

    def hold(self, request: Parsed[_Message]) -> Parsed[_Message]:
        """Keep reserved only what ``request`` makes the server hold (a
        received message keeps the read's whole reservation until then)."""
        if self._reservation is not None:
            self._reservation.shrink(request.nbytes)
        return request

    async def request(self) -> bytes:
        """A unary call's one message."""
        payload = await self.receive(self.servicer.limits.receive_timeout, "--receive-timeout")
        if payload is None:
            raise InvalidArgument("the call ended without a request message")
        return payload

    async def answer(self, response: bytes) -> None:
        """Send ``response`` while the call still holds its slot and, shrunk
        to the answer's size, its reservation: a client that does not take
        its answers holds no more than it was admitted with, and for at most
        the receive timeout."""
        self._check_dropped()
        if self._reservation is not None:
            self._reservation.shrink(len(response))
        timeout = self.servicer.limits.receive_timeout
        self.answering = True
        try:
            with self._waiting(timeout, f"the answer was not taken within {timeout:g} s (--receive-timeout)"):
                await self.context.write(response)
        finally:
            self.answering = False

    @contextlib.contextmanager
    def _waiting(self, timeout: float, why: str) -> Iterator[None]:
        """Mark a wait on the client that :meth:`DistillServicer.expire`
        ends with DEADLINE_EXCEEDED after ``timeout`` seconds (one sweep for
        every call is cheaper than a timer for every read and write)."""
        self.waiting = (time.monotonic() + timeout, why)
        try:
            yield
        finally:
            self.waiting = None

    async def run(
        self, method: Callable[[Parsed[Any]], bytes], request: Parsed[Any], elementwise: bool = True
    ) -> bytes:
        """``method(request)``: on the event loop when small and ``elementwise``
        (its cost in proportion to its bytes), else in the pool, where it stops
        at its next block once the call is abandoned."""
        servicer = self.servicer
        try:
            if elementwise and request.nbytes + request.device_bytes <= INLINE_BYTES:
                return servicer.compute(method, request)
            self._work = work = Work()
            if self.dropped is not None:
                work.abandon(self.dropped)
            try:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(servicer.executor, servicer.compute, method, request, work)
            except asyncio.CancelledError:
                work.abandon(Cancelled("the call was cancelled"))
                raise
            finally:
                self._work = None
        except DistillError:
            raise
        except Exception as exc:  # a bug: say so without the internals, keep serving
            log.exception("unexpected failure in %s", self.rpc)
            raise Internal(f"internal error in {self.rpc} ({type(exc).__name__}); the server logged it") from exc

    def close(self) -> None:
        if self._reservation is not None:
            self._reservation.release()


def log_failure(rpc: str, error: DistillError, peer: str, extra: str = "") -> None:
    """One structured line per failed call (or stream step), of bounded length."""
    message = bounded(error.message)
    log.warning(
        "call failed: rpc=%s code=%s reason=%s peer=%s%s: %s",
        rpc,
        error.code.name,
        error.reason,
        peer,
        extra,
        message,
        extra={"rpc": rpc, "code": error.code.name, "reason": error.reason, "peer": peer, "error": message},
    )


def add_to_server(servicer: DistillServicer, server: grpc.aio.Server) -> None:
    """Register the servicer's methods. Each reads its requests and writes
    its answers itself (a streaming handler on both sides, whatever the
    RPC's shape), as serialized messages (framed by :mod:`distill_core.wire`)."""
    handler = grpc.stream_stream_rpc_method_handler
    handlers = {name: handler(getattr(servicer, name)) for name in RPCS}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
