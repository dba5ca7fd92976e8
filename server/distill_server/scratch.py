"""The engine's float64 block buffers, lent to a pass and kept between calls.

A pass over a large layer needs five float64 buffers of one block
(:data:`~distill_server.backend.CPU_BLOCK` elements). Allocating them for
each pass cost about 2 ms here (the kernel maps and zeroes their pages
every time): a third of a 2 x 16 MB MSE. The buffers are kept instead, one
set for each pass computing at once (at most the threads computing:
``--workers``, the engine's helper threads and the event loop), and lent
to one pass at a time.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from distill_server import backend

__all__ = ["BUFFERS", "lend"]

BUFFERS = 5
"""Buffers in a set: the most any loss uses (KL: inputs, difference, two exponentials)."""

_free: list[list[Any]] = []
_lock = threading.Lock()


@contextlib.contextmanager
def lend() -> Iterator[list[Any]]:
    """A set of :data:`BUFFERS` float64 buffers of one block each, this
    caller's alone until the context exits (then kept for the next pass)."""
    size = backend.CPU_BLOCK
    with _lock:
        while _free and _free[-1][0].size != size:  # the block size changed (tests): those are of no use
            _free.pop()
        buffers = _free.pop() if _free else None
    if buffers is None:
        buffers = [np.empty(size, dtype=np.float64) for _ in range(BUFFERS)]
    try:
        yield buffers
    finally:
        with _lock:
            _free.append(buffers)
