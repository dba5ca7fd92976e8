"""Abandoned work stops between blocks: the check a server installs around a
computation, run by the loss math before each block it computes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

__all__ = ["blocks", "check", "interruptible"]

_CHECK: ContextVar[Callable[[], None] | None] = ContextVar("distill_server.interruption.check", default=None)


@contextlib.contextmanager
def interruptible(check: Callable[[], None]) -> Iterator[None]:
    """Call ``check()`` before every block the loss math computes in this context.

    So a server can stop abandoned work (a cancelled call, a passed deadline)
    between blocks: whatever ``check`` raises propagates out of the engine
    call unchanged. The check is held in a :class:`contextvars.ContextVar`:
    it applies to the calling thread (and to work started from it with a
    copy of its context, e.g. ``asyncio.to_thread``; ``run_in_executor``
    does not copy it, so install the check inside the worker function). An
    inner ``interruptible`` replaces an outer one until it exits. Without
    one, no check runs.
    """
    token = _CHECK.set(check)
    try:
        yield
    finally:
        _CHECK.reset(token)


def check() -> None:
    """Run the check :func:`interruptible` installed, if any."""
    installed = _CHECK.get()
    if installed is not None:
        installed()


def blocks(n: int, size: int) -> Iterator[slice]:
    """``range(n)`` in slices of ``size``; the installed check runs before each."""
    installed = _CHECK.get()
    for start in range(0, n, size):
        if installed is not None:
            installed()
        yield slice(start, min(start + size, n))
