"""Every Python block of the README runs as written, in order, against a live
server (its address put where the README says 127.0.0.1:50051), as one
script in a fresh interpreter, the way a reader would paste them.

A block preceded by ``<!-- not run by tests/test_readme.py: why -->`` is
left out (a GPU, example addresses)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.servers import InProcessServer

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- not run by tests/test_readme\.py: [^>]+ -->\n)?```python\n(.*?)```", re.DOTALL)


def blocks() -> list[tuple[bool, str]]:
    """Each Python block of the README, and whether it runs here."""
    return [(not skip, code) for skip, code in BLOCK.findall(README.read_text())]


def test_the_readme_has_blocks_to_run_and_says_why_it_skips_others() -> None:
    found = blocks()
    assert sum(run for run, _ in found) >= 8
    assert all("cupy" in code or "10.0.0." in code for run, code in found if not run)


def test_every_readme_block_runs(server: InProcessServer, tmp_path: Path) -> None:
    script = "\n\n".join(code for run, code in blocks() if run).replace("127.0.0.1:50051", server.target)
    path = tmp_path / "readme.py"
    path.write_text(script)
    result = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DISTILL_TARGET": server.target},
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"{result.stderr}\n--- the script:\n{script}"
    assert len(result.stdout.splitlines()) == 2  # the quickstart prints the total and one layer's loss
