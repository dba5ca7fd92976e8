"""A second language: the Node.js client against a real server, and buf lint
of the contract. Both need Node.js and npm (they skip without them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from distill_client import DistillClient, DistilLoss
from scripts.lint_protos import BUF, lint
from tests.servers import InProcessServer

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"


@pytest.fixture(scope="module")
def node_client() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("needs Node.js and npm")
    lock = NODE_DIR / "package-lock.json"
    stamp = NODE_DIR / "node_modules" / ".package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, capture_output=True, timeout=600
        )
    return NODE_DIR


def test_node_client_agrees_with_python_and_reads_rich_errors(
    node_client: Path, server: InProcessServer, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    shapes = [(2, 5), (7,), (3, 4)]
    teachers = [rng.normal(size=shape).astype(np.float32) for shape in shapes]
    students = [t + rng.normal(size=t.shape).astype(np.float32) for t in teachers]
    specs = [
        {"weight": 0.5, "kind": "mse", "name": "a"},
        {"weight": 1.5, "kind": "kl_divergence", "temperature": 2.0, "name": "b"},
        {"weight": -1.0, "kind": "combined", "kl_weight": 0.25, "mse_weight": 0.75, "temperature": 4.0, "name": "c"},
    ]
    losses = [DistilLoss.mse(), DistilLoss.kl_divergence(2.0), DistilLoss.combined(0.25, 0.75, 4.0)]
    layers = [(spec["weight"], loss) for spec, loss in zip(specs, losses, strict=True)]
    with DistillClient(server.target, timeout=30) as client:
        total = client.compute_total_loss(layers, teachers, students).total
        layer_1 = client.compute_layer_loss(layers, 1, teachers[1], students[1]).weighted_loss
    case = {
        "target": server.target,
        "layers": specs,
        "teachers": [{"values": t.ravel().tolist(), "shape": list(t.shape)} for t in teachers],
        "students": [{"values": s.ravel().tolist(), "shape": list(s.shape)} for s in students],
        "expected_total": total,
        "expected_layer_1": layer_1,
    }
    path = tmp_path / "case.json"
    path.write_text(json.dumps(case))
    result = subprocess.run(
        ["node", "check.js", str(path)], cwd=node_client, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads(result.stdout)
    # Same float32 bytes in, same float64 computation: the same numbers.
    assert seen["total_loss"] == total and seen["layer_1"] == layer_1
    assert seen["names"] == ["a", "b", "c"]
    error = seen["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error["reason"] == "TEACHER_STUDENT_MISMATCH"
    assert error["domain"] == "distill.v1"
    assert error["metadata"] == {"teacher": "10", "student": "3", "layer": "0", "field": "student"}
    assert error["fieldViolations"] == [{"field": "student", "description": error["message"]}]


def test_buf_lint_passes_with_the_standard_rules(node_client: Path) -> None:
    assert BUF.exists()
    result = lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_the_node_package_tests_pass_against_a_live_server(node_client: Path, server: InProcessServer) -> None:
    result = subprocess.run(
        ["npm", "test"], cwd=node_client, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DISTILL_TARGET": server.target},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 5" in result.stdout


def test_the_node_package_checks_and_carries_the_contract(node_client: Path) -> None:
    result = subprocess.run(["npm", "run", "check"], cwd=node_client, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    package = json.loads((node_client / "package.json").read_text())
    assert "private" not in package and package["types"] == "distill.d.ts"
    # Packed, the package carries the contract (copied in as it packs, removed after): no path out of it.
    packed = subprocess.run(
        ["npm", "pack", "--dry-run", "--json"], cwd=node_client, capture_output=True, text=True, timeout=120
    )
    assert packed.returncode == 0, packed.stderr
    files = {entry["path"] for entry in json.loads(packed.stdout)[0]["files"]}
    assert {"distill.js", "distill.d.ts", "README.md", "proto/distill/v1/distill.proto"} <= files
    assert not (node_client / "proto").exists()  # a checkout reads protos/ itself: never a stale copy
