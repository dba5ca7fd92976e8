"""Lint the contract with buf (STANDARD rules): `python scripts/lint_protos.py`.

buf resolves google/rpc/status.proto from the module, so the contract is
copied into a temporary module beside googleapis' copy of that file (from
googleapis-common-protos); buf itself is the npm package @bufbuild/buf
installed in clients/node (`npm install` there).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"


def lint(buf: Path = BUF) -> subprocess.CompletedProcess[str]:
    """Run ``buf lint`` on protos/; the result carries buf's findings."""
    from google.rpc import status_pb2

    with tempfile.TemporaryDirectory() as scratch:
        module = Path(scratch) / "protos"
        shutil.copytree(ROOT / "protos", module)
        (module / "google" / "rpc").mkdir(parents=True)
        shutil.copy(Path(status_pb2.__file__).with_name("status.proto"), module / "google" / "rpc")
        return subprocess.run([str(buf), "lint"], cwd=module, capture_output=True, text=True, timeout=300, check=False)


if __name__ == "__main__":
    result = lint()
    sys.stdout.write(result.stdout + result.stderr)
    raise SystemExit(result.returncode)
