"""``StreamSession``: a training loop's losses over one ``StreamLosses`` stream."""

from __future__ import annotations

import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from distill.v1 import distill_pb2 as pb
from distill_client._closing import Closing
from distill_client.cuda_ipc import CudaIpc
from distill_client.shared_memory import Batch, SharedMemory
from distill_core import tensors, wire
from distill_core.errors import DeadlineExceeded, Unavailable, from_rich_status, from_rpc_error
from distill_core.losses import LayerLoss

__all__ = ["StepResult", "StreamSession", "step_bound"]

_END = object()


def step_bound(step_timeout: float | None) -> float | None:
    """The bound a stream puts on each step, in seconds: None for none
    (``None`` or ``math.inf``).

    Raises:
        ValueError: zero, negative or NaN (every step would expire at once).
    """
    if step_timeout is None or step_timeout == math.inf:
        return None
    if not step_timeout > 0:
        raise ValueError(
            f"step_timeout (by default the client's timeout) must be positive, or math.inf for none; got {step_timeout}"
        )
    return float(step_timeout)


class _Watchdog:
    """Calls ``expire`` (held weakly) once a step has been in flight
    ``timeout`` seconds: one thread a session, where a timer a step cost
    about 0.1 ms of every step's latency (it starts a thread)."""

    def __init__(self, timeout: float, expire: Callable[[], None]) -> None:
        self._timeout = timeout
        self._expire = weakref.WeakMethod(expire)
        self._deadline: float | None = None  # the step in flight's
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name="distill-step-watchdog", daemon=True).start()

    def start(self) -> None:
        """A step is sent: it has ``timeout`` seconds."""
        with self._lock:
            self._deadline = time.monotonic() + self._timeout

    def finish(self) -> None:
        """The step is over (answered, or failed)."""
        with self._lock:
            self._deadline = None

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        # Waits a whole timeout while no step is in flight, so a step needs no wake-up: sent within
        # that wait, its deadline is later than the wait's end.
        while True:
            with self._lock:
                deadline, now = self._deadline, time.monotonic()
                if deadline is not None and now >= deadline:
                    expire = self._expire()
                    if expire is not None:
                        expire()
                    return
            if self._stopped.wait(self._timeout if deadline is None else deadline - now):
                return


@dataclass(frozen=True)
class StepResult:
    """One step's answer: its id, the total loss and every layer's result."""

    step_id: int
    total: float
    layers: list[LayerLoss]


class StreamSession(Closing):
    """Send the layer configuration once, then one message per training step.

    Made by :meth:`DistillClient.stream`. :meth:`step` sends a step and
    returns its answer; a step the server rejects raises its
    :class:`~distill_core.errors.DistillError` and the session goes on.
    Use it as a context manager, or call :meth:`close`: closing ends the
    stream and frees the server's side of it at once. Not thread-safe: one
    session per training loop. Each step's tensors travel as the client's
    ``transport`` says (a pooled shared-memory region per step, CUDA IPC
    handles, or bytes).

    ``step_timeout`` bounds each step: a step with no answer within it ends
    the stream with :class:`~distill_core.errors.DeadlineExceeded` (the
    server paused or unreachable); None waits as long as the stream lasts.
    """

    def __init__(
        self,
        method: Any,
        config: pb.StreamConfig,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]] | None = None,
        shared_memory: SharedMemory | CudaIpc | None = None,
        step_timeout: float | None = None,
    ) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._requests.put(pb.StreamLossesRequest(config=config).SerializeToString())
        self._responses: Iterator[pb.StreamLossesResponse] = method(
            iter(self._requests.get, _END), timeout=timeout, metadata=metadata
        )
        self._next_id = 0
        self._closed = False
        self._gradients = config.return_gradients
        self._shared_memory = shared_memory
        self._step_timeout = step_timeout
        self._expired = threading.Event()  # set when a step outlived step_timeout and the stream was cancelled
        self._watchdog = None if step_timeout is None else _Watchdog(step_timeout, self._expire)
        self._end = weakref.finalize(self, _end, self._requests, self._responses, self._watchdog)  # or when dropped
        self._end.atexit = False

    def step(
        self,
        teachers: Sequence[Any],
        students: Sequence[Any],
        step_id: int | None = None,
        *,
        labels: Mapping[int, Any] | None = None,
    ) -> StepResult:
        """The losses (and gradients, if configured) of one step.

        ``step_id`` defaults to one more than the previous step's; ``labels``:
        layer index -> the step's class labels, for the layers with a
        response loss.

        Raises:
            DistillError: the step's own error (the stream goes on), or the
                stream's (it is then over).
        """
        if self._closed:
            raise Unavailable("the stream is closed")
        step_id = self._next_id if step_id is None else step_id
        self._next_id = step_id + 1
        by_layer = tensors.labels_by_layer(labels)

        def send(batch: Batch) -> StepResult:
            request = pb.StreamLossesRequest(
                step_id=step_id,
                gradient_outputs=batch.gradient_outputs,
                gradient_cuda_outputs=batch.gradient_cuda_outputs,
                labels=by_layer,
            )
            self._requests.put(wire.build(request, teachers=batch.teachers, students=batch.students))
            try:
                response = self._answer()
            except grpc.RpcError as exc:
                self._closed = True
                if self._expired.is_set():
                    raise DeadlineExceeded(
                        f"step {step_id} got no answer within {self._step_timeout:g} s (step_timeout); "
                        "the stream is over"
                    ) from None
                raise from_rpc_error(exc) from exc
            except StopIteration:
                self._closed = True
                raise Unavailable("the server ended the stream") from None
            if response.HasField("error"):
                raise from_rich_status(response.error)
            return StepResult(response.step_id, response.total_loss, batch.layers(response.layer_losses))

        if self._shared_memory is None:
            return send(Batch(list(teachers), list(students)))
        return self._shared_memory.exchange(teachers, students, self._gradients, send)

    def _answer(self) -> pb.StreamLossesResponse:
        """The next response; past ``step_timeout`` the stream is cancelled,
        which ends the wait."""
        if self._watchdog is None:
            return next(self._responses)
        self._watchdog.start()
        try:
            response = next(self._responses)
        finally:
            self._watchdog.finish()
        if self._expired.is_set():  # the bound passed as the answer came: the answer stands, the stream is gone
            self._closed = True
        return response

    def _expire(self) -> None:
        self._expired.set()
        self._responses.cancel()  # type: ignore[attr-defined]

    @property
    def closed(self) -> bool:
        """Whether the stream is over (closed here, or ended by an error)."""
        return self._closed

    def close(self) -> None:
        """End the stream (idempotent)."""
        self._closed = True
        self._end()


def _end(requests: queue.SimpleQueue[Any], responses: Any, watchdog: _Watchdog | None) -> None:
    """End a session's stream: no more requests, the call cancelled (which
    frees the server's side at once), the watchdog stopped."""
    if watchdog is not None:
        watchdog.stop()
    requests.put(_END)
    cancel = getattr(responses, "cancel", None)
    if cancel is not None:
        cancel()
