"""``distill-client``: info, check and bench against a real server."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill_client.cli import CHECK_EXPECTED, parse_size
from tests.servers import InProcessServer


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distill_client.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_info_is_the_servers_description(server: InProcessServer) -> None:
    result = run("--target", server.target, "info")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["device"] == "cpu" and "DTYPE_FLOAT32" in info["supported_dtypes"]


def test_check_passes_against_a_server_and_names_the_value(server: InProcessServer) -> None:
    result = run("--target", server.target, "check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ") and f"(expected {CHECK_EXPECTED!r})" in result.stdout


def test_an_unreachable_server_is_a_typed_one_line_error() -> None:
    result = run("--target", "127.0.0.1:1", "--timeout", "2", "check")
    assert result.returncode == 2
    assert result.stderr.startswith("distill-client: ") and "Traceback" not in result.stderr
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr


def test_bench_sweeps_sizes_and_concurrency_into_csv(server: InProcessServer, tmp_path: Path) -> None:
    out = tmp_path / "bench.csv"
    result = run(
        "--target", server.target, "bench", "--sizes", "1K,64K", "--concurrency", "1,3", "--seconds", "0.3",
        "--csv", str(out), "--plot", str(tmp_path / "bench.png"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["payload_bytes"]), int(r["concurrency"])) for r in rows] == [
        (1024, 1), (1024, 3), (65536, 1), (65536, 3)
    ]  # fmt: skip
    for row in rows:
        assert int(row["calls"]) > 0 and int(row["errors"]) == 0
        assert 0 < float(row["p50_ms"]) <= float(row["p90_ms"]) <= float(row["p99_ms"])
    assert result.stdout.count("\n") == 2 + len(rows)  # the table: header, rule, a line per row
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_bench_shows_a_progress_bar_on_stderr(server: InProcessServer) -> None:
    args = ["--target", server.target, "bench", "--sizes", "1K", "--concurrency", "1,2", "--seconds", "0.5"]
    shown = run(*args, "--progress")
    assert shown.returncode == 0, shown.stderr
    frames = shown.stderr.replace("\n", "\r").split("\r")
    assert any(frame.startswith("1024 B x 2: ") for frame in frames)  # which measurement runs
    assert any("calls=" in frame and "<" in frame for frame in frames)  # calls so far, time left
    assert frames[-2].startswith("1024 B x 2: 100%") and "1.0/1.0 s" in frames[-2]  # it ends full
    assert shown.stdout.count("\n") == 4  # the table is undisturbed on stdout
    quiet = run(*args)  # not a terminal: no bar
    assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.parametrize(("text", "expected"), [("1K", 1024), ("64M", 64 << 20), ("512", 512), ("1.5KB", 1536)])
def test_sizes_in_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_bad_bench_arguments_are_refused(server: InProcessServer) -> None:
    for args in (["--sizes", "2"], ["--concurrency", "0"], ["--sizes", "lots"]):
        result = run("--target", server.target, "bench", *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
