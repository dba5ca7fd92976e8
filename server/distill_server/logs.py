"""The server's logs: text or JSON lines, gRPC's own lines included.

gRPC's C core logs through absl straight to file descriptor 2, past Python's
``logging``. With JSON logs, descriptor 2 becomes a pipe into a small relay
process that passes JSON lines through and turns every other line (the core's
``E1130 13:11:02.321801  26035 file.cc:102] message``, a traceback) into one
JSON object. The relay is a process of its own, not a thread, so the last lines
of a server that aborts are still read and written; it ends when every writer
(the server and any ``--processes`` children, which inherit the pipe) is gone.

This module uses the standard library only: the relay runs it as a script.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from typing import IO

__all__ = ["JsonFormatter", "configure_logging", "native_record", "relay"]

LOG_FIELDS = ("rpc", "code", "reason", "peer", "error", "source")
"""Extra record attributes a JSON line carries when a record has them."""

_RELAYED = "_DISTILL_LOG_RELAY"  # set once descriptor 2 goes to a relay, so children add none
_ABSL = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([^\]\s]+)\] ?(.*)")
_ABSL_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
_relay: subprocess.Popen[bytes] | None = None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and, where a
    record has them, a failed call's rpc, code, reason, peer and error, or a
    native line's source."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **{name: getattr(record, name) for name in LOG_FIELDS if hasattr(record, name)},
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _ClientGoneFilter(logging.Filter):
    """gRPC logs at ERROR, with a traceback, an answer it could not send
    because its client had just gone (a deadline expiring as the answer is
    written, grpc/grpc#32551): a cancelled call, not a server error. Such
    records become DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "ExecuteBatchError" not in record.getMessage():
            return True
        record.levelno, record.levelname, record.exc_info, record.exc_text = logging.DEBUG, "DEBUG", None, None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def configure_logging(level: str, form: str) -> None:
    """Log at ``level`` to stderr as ``form`` ("text" or "json"); with JSON,
    route descriptor 2 through the relay first (once per process tree)."""
    if form == "json" and not os.environ.get(_RELAYED):
        _start_relay()
    logging.getLogger("grpc._cython.cygrpc").addFilter(_ClientGoneFilter())
    handler = logging.StreamHandler()
    if form == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _start_relay() -> None:
    global _relay
    sys.stderr.flush()
    _relay = subprocess.Popen(
        [sys.executable, "-I", "-S", __file__], stdin=subprocess.PIPE, stdout=2, stderr=2, start_new_session=True
    )
    assert _relay.stdin is not None
    os.dup2(_relay.stdin.fileno(), 2)
    _relay.stdin.close()  # descriptor 2 is now this process's only end of the pipe
    os.environ[_RELAYED] = "1"


def native_record(line: str) -> logging.LogRecord:
    """A log record for a line written to descriptor 2 outside ``logging``:
    an absl line of gRPC's core at its own level, anything else a WARNING of
    the logger "stderr"."""
    match = _ABSL.fullmatch(line)
    if match is None:
        name, level, fields = "stderr", logging.WARNING, {"msg": line}
    else:
        letter, source, message = match.groups()
        name, level, fields = "grpc", _ABSL_LEVELS[letter], {"msg": message, "source": source}
    return logging.makeLogRecord({"name": name, "levelno": level, "levelname": logging.getLevelName(level), **fields})


MAX_LINE = 64 * 1024
"""Longest line the relay passes on; a longer one is cut (and so wrapped)."""


def relay(source: IO[bytes], sink: IO[str]) -> None:
    """Copy ``source``'s lines to ``sink`` as JSON lines until its end: a JSON
    object as it is, anything else (a native line, a traceback, two records
    that interleaved) wrapped as one."""
    formatter = JsonFormatter()
    for raw in source:
        line = raw[:MAX_LINE].decode("utf-8", errors="replace").rstrip("\r\n")
        if _is_json_object(line):
            sink.write(line + "\n")
        elif line.strip():
            sink.write(formatter.format(native_record(line)) + "\n")
        sink.flush()


def _is_json_object(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


if __name__ == "__main__":
    # Signals are for the server: it logs its drain after SIGTERM, and the relay must still be there.
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    relay(sys.stdin.buffer, sys.stdout)
