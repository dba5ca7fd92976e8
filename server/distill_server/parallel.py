"""The cores a process computes on, shared by its computations.

A large layer is split over threads while cores are free, so one call uses
the machine's cores (NumPy releases the GIL in its loops), and calls that
run at once share the cores instead of each taking them all: a computation
gets at most the cores no other computation holds, and always its own
thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["Cores", "Share", "available", "cores"]

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


_PROC = Path("/proc/self")
"""Where the process's cgroups (``cgroup``) and mounts (``mountinfo``) are listed."""


def available() -> int:
    """The CPUs this process may use: those it may run on (its affinity), or
    fewer where a CPU quota allows fewer (a limit of 4 CPUs on a 64-core
    node: 4), its own cgroup's or any above it."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(count, math.ceil(quota))) if quota is not None else count


def _cgroup_quota() -> float | None:
    """The smallest CPU quota, in CPUs, of this process's cgroup and the
    cgroups above it that it can see (a Kubernetes pod's limit sits above its
    containers'; without a cgroup namespace, the container's own is below the
    hierarchy's root), in cgroup v2 or v1; None if none has one."""
    quotas = [quota for directory, top in _cpu_cgroups(_PROC) for quota in _quotas(directory, top)]
    return min(quotas, default=None)


def _unescape(field: str) -> str:
    r"""A mountinfo path: spaces, tabs, newlines and backslashes are written ``\ooo``."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _cpu_cgroups(proc: Path) -> list[tuple[Path, Path]]:
    """``(the process's cgroup directory, its hierarchy's mount point)`` for
    the cgroup v2 hierarchy and the v1 hierarchy of the ``cpu`` controller
    that are mounted, from ``/proc/self/cgroup`` and ``/proc/self/mountinfo``.

    A mount that shows only another part of the hierarchy (another
    container's cgroup, bind-mounted) says nothing about this process; where
    no mount of a hierarchy contains the process's cgroup (a namespace that
    hides its path), the mount itself stands for it.
    """
    try:  # any mount point's bytes may stand in mountinfo: read them as the OS's names
        membership = (proc / "cgroup").read_text(errors="surrogateescape").splitlines()
        mounts = (proc / "mountinfo").read_text(errors="surrogateescape").splitlines()
    except OSError:
        return []
    paths: dict[bool, str] = {}  # v2 or not: the process's cgroup in that hierarchy
    for line in membership:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            paths[True] = path
        elif "cpu" in controllers.split(","):
            paths[False] = path
    inside: dict[bool, list[tuple[Path, Path]]] = {True: [], False: []}
    outside: dict[bool, list[tuple[Path, Path]]] = {True: [], False: []}
    for line in mounts:
        mount, _, source = line.partition(" - ")
        fields, kind = mount.split(), source.split()  # kind: type, source (may be empty), super options
        if len(fields) < 5 or len(kind) < 2:
            continue
        v2 = kind[0] == "cgroup2"
        member = paths.get(v2)
        if not member or not (v2 or (kind[0] == "cgroup" and "cpu" in kind[-1].split(","))):
            continue
        root, top = _unescape(fields[3]), Path(_unescape(fields[4]))
        below = os.path.relpath(member, root)  # the mount shows the hierarchy from root down
        if below.startswith(".."):
            outside[v2].append((top, top))
        else:
            inside[v2].append((top / below, top))
    return [pair for v2 in (True, False) for pair in inside[v2] or outside[v2]]


def _quotas(directory: Path, top: Path) -> Iterator[float]:
    """The CPU quotas, in CPUs, set on ``directory`` and its parents up to ``top``."""
    while True:
        quota = _quota(directory)
        if quota is not None:
            yield quota
        if directory == top or top not in directory.parents:
            return
        directory = directory.parent


def _quota(directory: Path) -> float | None:
    """The quota set on one cgroup: ``cpu.max`` (v2: "QUOTA PERIOD", or "max
    PERIOD"), or ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (v1; -1: none)."""
    try:
        fields = (directory / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:
            fields = [(directory / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us")]
        except (OSError, ValueError):
            return None
    try:
        quota, period = float(fields[0]), float(fields[1])
    except (ValueError, IndexError):  # "max"
        return None
    return quota / period if quota > 0 and period > 0 else None


class Cores:
    """``count`` cores, handed to computations as threads (the caller's own, plus helpers)."""

    def __init__(self, count: int) -> None:
        self.count = max(1, count)
        self._busy = 0
        self._lock = threading.Lock()
        self._helpers: concurrent.futures.ThreadPoolExecutor | None = None
        self._helper_count = 0

    def resize(self, count: int) -> None:
        """Use ``count`` cores from now on (computations under way keep theirs)."""
        with self._lock:
            self.count = max(1, count)

    @property
    def busy(self) -> int:
        """The cores computations hold now."""
        return self._busy

    @contextlib.contextmanager
    def claim(self, wanted: int) -> Iterator[Share]:
        """Hold up to ``wanted`` cores for one computation: as many as are
        free, and at least one (the calling thread's). A computation that
        wants one (a small layer) is not counted: it ends before another
        could use the core."""
        if wanted <= 1:
            yield Share(self, 0)
            return
        with self._lock:
            granted = max(1, min(wanted, self.count - self._busy))
            self._busy += granted
        share = Share(self, granted)
        try:
            yield share
        finally:
            self.give(share.threads)

    def give(self, count: int) -> None:
        """Give back ``count`` cores a computation held."""
        with self._lock:
            self._busy -= count

    def leave_if_crowded(self) -> bool:
        """Give back one core if computations hold more than there are (one
        started while all were held); whether it was given."""
        with self._lock:
            if self._busy <= self.count:
                return False
            self._busy -= 1
            return True

    def helpers(self, count: int, task: Callable[[], None]) -> list[concurrent.futures.Future[None]]:
        """Run ``task`` on ``count`` helper threads, each in a copy of the
        caller's context. The pool has one thread fewer than the cores (the
        callers compute too), made on first use and grown with ``count``."""
        with self._lock:
            if self._helpers is None or self._helper_count < count:
                if self._helpers is not None:
                    self._helpers.shutdown(wait=False)  # its threads end once their work is done
                self._helper_count = max(count, self.count - 1)
                self._helpers = concurrent.futures.ThreadPoolExecutor(
                    self._helper_count, thread_name_prefix="distill-engine"
                )
            return [self._helpers.submit(contextvars.copy_context().run, task) for _ in range(count)]


class Share:
    """The cores one computation holds: ``threads``, its own included."""

    def __init__(self, cores: Cores, threads: int) -> None:
        self.cores = cores
        self.threads = threads

    def map(self, fn: Callable[[_Item], _Result], items: Sequence[_Item]) -> list[_Result]:
        """``[fn(item) for item in items]``, the items taken in turn by the
        calling thread and ``threads - 1`` helpers, each helper in a copy of
        the caller's context (where :mod:`~distill_server.interruption` keeps
        its check). Cores beyond one an item are given back at once. A
        helper that finds the process holding more cores than it has (a
        computation started meanwhile) gives its core back and stops taking
        items; the caller finishes them. Every call has ended when this
        returns, or raises the first error."""
        used = max(1, min(self.threads, len(items)))
        if used < self.threads:  # fewer items than cores: the others go back now
            self.cores.give(self.threads - used)
            self.threads = used
        if self.threads <= 1:
            return [fn(item) for item in items]
        results: list[Any] = [None] * len(items)
        taken = 0
        errors: list[BaseException] = []
        lock = threading.Lock()

        def take(helper: bool) -> None:
            nonlocal taken
            while True:
                with lock:
                    if taken == len(items) or errors:
                        return
                    if helper and self.cores.leave_if_crowded():
                        self.threads -= 1
                        return
                    index, taken = taken, taken + 1
                try:
                    results[index] = fn(items[index])
                except BaseException as error:
                    with lock:
                        errors.append(error)
                    return

        started = self.cores.helpers(self.threads - 1, functools.partial(take, True))
        try:
            take(False)
        finally:
            for future in started:
                future.cancel()  # not started yet: nothing left for it
            concurrent.futures.wait(started)  # none still writes into shared arrays when this returns
        if errors:
            raise errors[0]
        return results


cores = Cores(available())
"""The process's cores: the engine claims them, the server sizes them (``--engine-threads``)."""
