"""What a call may hold: a byte budget for messages in flight, and work that
can be called off.

gRPC buffers a request message before the handler sees a byte of it, up to
the message limit, as soon as the handler asks to read it; then its Python
layer copies the message twice (into a bytearray, then into bytes). Those
copies are made on the event loop, one message at a time. So a unary call's
message is read only after reserving the message limit from a
:class:`Budget` whose capacity keeps ``READ_COPIES - 1`` largest messages
aside for the one being copied; once the message is in, the reservation
shrinks to its size, then to its answer's, held until the answer is taken.
A reservation never grows, so calls holding the budget never wait for each
other. Calls that find the budget full wait their turn, in order, for at
most the receive timeout, then fail with RESOURCE_EXHAUSTED. Nothing here
touches the gRPC context: the servicer owns it.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable

from distill_core.errors import DistillError, LimitExceeded

__all__ = ["READ_COPIES", "Budget", "Reservation", "Work"]

READ_COPIES = 3
"""Copies of a message that exist at once while gRPC hands it over: its
receive buffer, the bytearray it is gathered into, the bytes made of that
(measured: a 56 MB request raised the peak by 168 MB)."""


class Budget:
    """Bytes the server may hold for calls in flight; first come, first served.

    Lives on the event loop: not thread-safe, and needs none.

    Args:
        capacity: The most bytes reserved at once.
        flag: The flag that sets ``capacity``, named in errors.
        on_change: Called with the bytes reserved after every change (a gauge).
    """

    def __init__(self, capacity: int, flag: str, on_change: Callable[[int], None] = lambda used: None) -> None:
        self.capacity = capacity
        self.flag = flag
        self.used = 0
        self._on_change = on_change
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Reservations waiting for room."""
        return len(self._waiters)

    async def reserve(self, nbytes: int, timeout: float) -> Reservation:
        """Reserve ``nbytes``, waiting at most ``timeout`` seconds for room.

        Raises:
            LimitExceeded: the budget could not make room in time, or is
                smaller than ``nbytes``.
        """
        if nbytes > self.capacity:
            raise LimitExceeded(
                f"the call needs {nbytes} bytes in flight; this server holds at most {self.capacity} ({self.flag})",
                limit=self.capacity,
                got=nbytes,
            )
        if not self._waiters and self.used + nbytes <= self.capacity:
            self._add(nbytes)
            return Reservation(self, nbytes)
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, granted)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), timeout)
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                self._give(nbytes)  # granted as the wait ended: hand it back
            else:
                granted.cancel()
                self._waiters.remove(entry)
                self._wake()  # the head of the queue may fit now
            if isinstance(exc, TimeoutError):
                raise LimitExceeded(
                    f"the server's memory for calls in flight is full ({self.used} of {self.capacity} bytes, "
                    f"{self.flag}); waited {timeout:g} s. Retry later or add replicas",
                    limit=self.capacity,
                    got=self.used + nbytes,
                ) from None
            raise
        return Reservation(self, nbytes)

    def _add(self, nbytes: int) -> None:
        self.used += nbytes
        self._on_change(self.used)

    def _give(self, nbytes: int) -> None:
        self._add(-nbytes)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            nbytes, granted = self._waiters.popleft()
            self._add(nbytes)
            granted.set_result(None)


class Reservation:
    """Bytes held from a :class:`Budget` until :meth:`release`."""

    def __init__(self, budget: Budget, nbytes: int) -> None:
        self.budget = budget
        self.nbytes = nbytes

    def shrink(self, nbytes: int) -> None:
        """Hold only ``nbytes`` (at most what is held)."""
        if nbytes < self.nbytes:
            self.budget._give(self.nbytes - nbytes)
            self.nbytes = nbytes

    def release(self) -> None:
        """Give everything back (idempotent)."""
        if self.nbytes:
            self.budget._give(self.nbytes)
            self.nbytes = 0


class Work:
    """A computation that can be called off from the event loop.

    The worker thread calls :meth:`check` between blocks (the engine's
    ``interruptible``); :meth:`abandon` makes the next check raise the error.
    """

    def __init__(self) -> None:
        self._error: DistillError | None = None
        self._lock = threading.Lock()

    def abandon(self, error: DistillError) -> None:
        """Stop the work at its next check with ``error`` (the first one wins)."""
        with self._lock:
            if self._error is None:
                self._error = error

    def check(self) -> None:
        """Raise the error the work was abandoned with, if any."""
        if self._error is not None:
            raise self._error
