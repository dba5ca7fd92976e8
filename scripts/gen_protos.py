"""Generate the Python code of the proto contract into core/distill/v1/.

The generated modules are committed; `make protos` reruns this, and
tests/test_protos.py fails when the committed code is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO = PROTO_ROOT / "distill" / "v1" / "distill.proto"


def include_paths() -> list[str]:
    """protoc's -I flags: the proto root, the well-known types, google/rpc."""
    import grpc_tools
    from google.rpc import status_pb2

    return [
        f"-I{PROTO_ROOT}",
        f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
        f"-I{Path(status_pb2.__file__).parents[2]}",
    ]


def protoc(*args: str) -> None:
    """Run grpcio-tools' protoc on the contract with extra arguments."""
    from grpc_tools import protoc as tool

    command = ["protoc", *include_paths(), *args, str(PROTO)]
    if tool.main(command) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(command)}")


def generate(out_dir: Path) -> None:
    """Write distill/v1/distill_pb2{.py,.pyi,_grpc.py} under `out_dir`."""
    protoc(f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "core")
