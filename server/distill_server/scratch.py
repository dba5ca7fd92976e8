"""The engine's float64 scratch, lent to a pass and kept between calls.

A pass over a large layer needs up to five float64 buffers of one block
(:data:`~distill_server.backend.CPU_BLOCK` elements), which it carves out
of one set: a pass that uses fewer may take larger blocks. Allocating them
for each pass cost about 2 ms here (the kernel maps and zeroes their pages
every time): a third of a 2 x 16 MB MSE. The sets are kept instead, one
for each pass computing at once (at most the threads computing:
``--workers``, the engine's helper threads and the event loop), and lent
to one pass at a time.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np

from distill_server import backend

__all__ = ["BUFFERS", "lend"]

BUFFERS = 5
"""Blocks in a set: the most buffers any loss uses (KL: inputs, difference, two exponentials)."""

_free: list[np.ndarray] = []
_lock = threading.Lock()


@contextlib.contextmanager
def lend() -> Iterator[np.ndarray]:
    """A set of :data:`BUFFERS` blocks of float64, one array, this caller's
    alone until the context exits (then kept for the next pass)."""
    size = BUFFERS * backend.CPU_BLOCK
    with _lock:
        while _free and _free[-1].size != size:  # the block size changed (tests): those are of no use
            _free.pop()
        buffers = _free.pop() if _free else None
    if buffers is None:
        buffers = np.empty(size, dtype=np.float64)
    try:
        yield buffers
    finally:
        with _lock:
            _free.append(buffers)
