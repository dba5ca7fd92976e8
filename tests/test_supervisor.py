"""``--processes N``: children restarted when they die, dying with the parent,
and a busy port refused; through the real CLI, and the restart policy with
trivial children."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distill_client import DistillClient, DistilLoss
from distill_server import __version__, supervisor
from distill_server.config import ServerConfig
from distill_server.supervisor import RestartPolicy, RestartSchedule, Supervisor, die_with_parent
from tests.servers import ServerProcess

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MSE = [(1.0, DistilLoss.mse())]
_READY_PID = re.compile(r"ready on \S+ \(pid (\d+)")


def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid; None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in "ZX"


def server_children(parent: int) -> set[int]:
    """The live server processes ``parent`` started (not the resource tracker)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if stat is not None and stat[1] == parent and stat[0] not in "ZX" and b"--multiprocessing-fork" in command:
            found.add(int(entry.name))
    return found


def ready_pids(proc: ServerProcess) -> list[int]:
    return [int(pid) for pid in _READY_PID.findall(proc.text())]


def port_is_free(port: int) -> bool:
    """Whether a socket without SO_REUSEPORT can bind the port (as a new server's would)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def eventually(condition: Callable[[], bool], timeout: float = 30) -> bool:
    """Poll ``condition()`` until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``distill-server`` in a session of its own: if it has not exited within a
    minute, every process in it is killed, the children of a group included."""
    command = [sys.executable, "-m", "distill_server", "--device", "cpu", *args]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


# Through the real CLI.


def test_a_killed_child_is_restarted_and_the_group_serves_on(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--processes", "2"])
    proc.wait_for_lines("ready on", 2)
    first = ready_pids(proc)
    assert server_children(proc.process.pid) == set(first)
    os.kill(first[0], signal.SIGKILL)
    proc.wait_for_lines("ready on", 3)
    replacement = ready_pids(proc)[2]
    assert replacement not in first
    assert server_children(proc.process.pid) == {first[1], replacement}
    assert re.search(
        rf"distill-server-\d \(pid {first[0]}\) was killed by SIGKILL after .*; restarting it", proc.text()
    )
    proc.wait_for_lines(f"restarted (pid {replacement}; restart 1 of at most 5", 1)
    t = np.ones(16, np.float32)
    for _ in range(20):  # new connections: the kernel spreads them over both processes
        with DistillClient(proc.target, timeout=10) as client:
            assert client.server_info().version == __version__
            assert client.compute_total_loss(MSE, [t], [t]).total == 0.0
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert proc.text().count("stopped") == 2


def test_a_signal_stops_the_group_without_restarts(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--processes", "2"])
    proc.wait_for_lines("ready on", 2)
    children = server_children(proc.process.pid)
    proc.signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert proc.text().count("stopped") == 2 and "restart" not in proc.text()
    assert not any(alive(pid) for pid in children)
    assert port_is_free(proc.port)


def test_the_children_die_with_the_parent(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu", "--processes", "2"])
    proc.wait_for_lines("ready on", 2)
    children = server_children(proc.process.pid)
    assert len(children) == 2
    proc.signal(signal.SIGKILL)
    try:
        assert proc.wait(30) == -signal.SIGKILL
        assert eventually(lambda: not any(alive(pid) for pid in children)), proc.text()
        assert eventually(lambda: port_is_free(proc.port)), proc.text()
    finally:  # no orphan outlives the test, whatever happened
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_second_group_on_a_busy_port_is_refused(start_server: type[ServerProcess], host: str) -> None:
    proc = start_server(["--device", "cpu", "--processes", "2"])
    proc.wait_for_lines("ready on", 2)
    result = run_cli("--host", host, "--port", str(proc.port), "--processes", "2")
    assert result.returncode == 1, result.stderr
    assert f"cannot serve on {host}:{proc.port}: address in use" in result.stderr
    assert "started (pid" not in result.stderr and "ready on" not in result.stderr
    assert len(server_children(proc.process.pid)) == 2  # the first group serves on, untouched
    with DistillClient(proc.target, timeout=10) as client:
        assert client.server_info().version == __version__


def test_a_port_held_by_any_listener_is_refused() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cli("--host", "127.0.0.1", "--port", str(port), "--processes", "2")
    assert result.returncode == 1
    assert f"cannot serve on 127.0.0.1:{port}: address in use" in result.stderr
    assert "started (pid" not in result.stderr


# Trivial children (module-level: they are pickled for the spawn start method).


def _crash(config: ServerConfig, level: str, form: str) -> None:
    os._exit(3)


def _cannot_start(config: ServerConfig, level: str, form: str) -> None:
    raise SystemExit(2)


def _sleep(config: ServerConfig, level: str, form: str) -> None:
    time.sleep(60)


def _watched_child(parent: int, lifeline: Any, running: Any) -> None:
    die_with_parent(parent, lifeline)
    running.set()
    time.sleep(60)


FAST = RestartPolicy(initial_delay=0.01, max_delay=0.05, stable_after=3600, max_restarts=4, window=3600)


def run_group(
    target: supervisor.ChildTarget, count: int, policy: RestartPolicy, port: int = 0, host: str = "127.0.0.1"
) -> int:
    return Supervisor(ServerConfig(host=host, port=port), count, target, ("INFO", "text"), policy).run()


# The mechanisms, one by one, with trivial children.


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_port_held_by_so_reuseport_listeners_is_refused(caplog: pytest.LogCaptureFixture, host: str) -> None:
    """Another group's children listen with SO_REUSEPORT, as this group's own
    would: the port is still seen as taken, and no child is started."""
    caplog.set_level(logging.INFO, logger="distill_server.supervisor")
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.listen()
        assert run_group(_sleep, 2, FAST, port=port, host=host) == 1
        with socket.socket() as child:  # while one more SO_REUSEPORT socket, as a child's, still binds there
            child.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            child.bind(("127.0.0.1", port))
    assert f"cannot serve on {host}:{port}: address in use" in caplog.messages
    assert not any("started (pid" in line for line in caplog.messages)


def test_a_group_holds_its_address_before_its_children_listen(caplog: pytest.LogCaptureFixture) -> None:
    """From its check of the port until its children listen (here: never), a
    group's address is taken: a second group there is refused though nothing
    listens on the port, and a group after it finds the address free again."""
    caplog.set_level(logging.INFO, logger="distill_server.supervisor")
    seen: dict[str, Any] = {}

    def second_group() -> None:
        """While the first group runs: try a second one on its port, then stop the first."""
        try:
            serving = re.compile(r"1 processes on 127\.0\.0\.1:(\d+)")
            assert eventually(lambda: any(serving.search(line) for line in caplog.messages)), caplog.messages
            port = int(next(m.group(1) for line in caplog.messages if (m := serving.search(line))))
            seen["port"], seen["free"] = port, port_is_free(port)
            seen["status"] = run_group(_sleep, 1, FAST, port=port)  # refused before it touches signals
        except BaseException as exc:
            seen["error"] = exc
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the first group's handler: it stops

    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)  # should the signal come late
    try:
        thread = threading.Thread(target=second_group)
        thread.start()
        first = run_group(_sleep, 1, FAST)
        thread.join(60)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "error" not in seen, seen
    assert first == 128 + signal.SIGTERM  # its child, stopped by the signal
    port = seen["port"]
    assert seen["free"], "a socket listened on the port: the lock was not what refused the second group"
    assert seen["status"] == 1
    assert f"cannot serve on 127.0.0.1:{port}: address in use (another distill-server group serves there)" in (
        caplog.messages
    )
    # Once the first group is over, its address is free: a third group starts its child there.
    assert run_group(_cannot_start, 1, FAST, port=port) == 2


def test_a_child_that_keeps_dying_stops_the_group(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="distill_server.supervisor")
    assert run_group(_crash, 2, FAST) == 3
    lines = caplog.messages
    fatal = [line for line in lines if "stopping the group" in line]
    assert len(fatal) == 1, lines
    match = re.fullmatch(
        r"(distill-server-\d) \(pid \d+\) exited with status 3 after \S+ s; restarted 4 times in 3600 s already: "
        r"stopping the group",
        fatal[0],
    )
    assert match, fatal
    name = match.group(1)
    delays = [float(d) for d in re.findall(rf"{name} .*; restarting it in (\S+) s", "\n".join(lines))]
    assert delays == [0.01, 0.02, 0.04, 0.05], lines  # doubling up to max_delay
    assert sum(line.startswith(f"{name} restarted (pid") for line in lines) == 4
    assert not any("started (pid" in line for line in lines[lines.index(fatal[0]) :])  # no restart after it


def test_the_backoff_starts_over_after_a_stable_run(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="distill_server.supervisor")
    stable_at_once = RestartPolicy(initial_delay=0.01, max_delay=1, stable_after=0, max_restarts=3, window=3600)
    assert run_group(_crash, 1, stable_at_once) == 3
    delays = re.findall(r"restarting it in (\S+) s", "\n".join(caplog.messages))
    assert delays == ["0.01"] * 3


def test_the_restart_schedule() -> None:
    # On a clock of the test's own: a whole group would have to wait out the window in real time.
    policy = RestartPolicy(initial_delay=0.5, max_delay=3, stable_after=10, max_restarts=4, window=60)
    schedule = RestartSchedule(policy)
    assert [schedule.plan(t, 1) for t in (0, 1, 2, 3)] == [0.5, 1, 2, 3]  # doubling up to max_delay
    assert schedule.plan(4, 1) is None  # a fifth restart in 60 s: the limit
    assert schedule.plan(60, 1) == 3  # the first restart left the window
    assert schedule.plan(100, 10) == 0.5  # up 10 s: the delay starts over
    assert schedule.plan(101, 1) == 1


def test_a_child_that_cannot_start_is_not_restarted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="distill_server.supervisor")
    assert run_group(_cannot_start, 2, FAST) == 2
    assert not any("restart" in line for line in caplog.messages)
    assert any(
        re.fullmatch(
            r"distill-server-\d \(pid \d+\) exited with status 2 after \S+ s: it cannot start; "
            r"stopping the group",
            line,
        )
        for line in caplog.messages
    ), caplog.messages


def test_a_child_ends_when_the_pipe_from_its_parent_closes() -> None:
    """The fallback where PR_SET_PDEATHSIG is missing: end-of-file on the pipe
    (in a group, PR_SET_PDEATHSIG would end the children first)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    running = context.Event()
    child = context.Process(target=_watched_child, args=(os.getpid(), reader, running))
    child.start()
    reader.close()
    try:
        assert running.wait(30)  # past its set-up, in its target, the pipe open
        assert child.is_alive()
        writer.close()  # what the parent's death does
        child.join(30)
        assert child.exitcode == -signal.SIGTERM
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        child.close()
