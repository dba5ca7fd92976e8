"""What each install gets: a plain install is the client, which runs without
the server's dependencies; the ``server`` and ``gpu`` extras add them; the
wheel ships every package with its type information."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
SERVER_ONLY = {"grpcio-health-checking", "grpcio-reflection", "prometheus-client"}
SERVER_MODULES = ("grpc_health", "grpc_reflection", "prometheus_client")


def requirements(extra: str | None) -> set[str]:
    """The distributions an install with ``extra`` (None: a plain install) asks for."""
    names = set()
    for text in importlib.metadata.requires("distill-service") or []:
        requirement = Requirement(text)
        environment = {"extra": extra or ""}
        if requirement.marker is None or requirement.marker.evaluate(environment):
            names.add(
                requirement.name
                if not requirement.extras
                else f"{requirement.name}[{','.join(sorted(requirement.extras))}]"
            )
    return names


def test_a_plain_install_is_the_client() -> None:
    plain = requirements(None)
    assert {"grpcio", "grpcio-status", "protobuf", "numpy", "ml-dtypes"} <= plain
    assert not plain & (SERVER_ONLY | {"cupy-cuda12x"})


def test_the_server_and_gpu_extras() -> None:
    assert SERVER_ONLY <= requirements("server")
    assert "cupy-cuda12x" not in requirements("server")
    assert {"distill-service[server]", "cupy-cuda12x"} <= requirements("gpu")


def _python(code: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter where ``blocked`` modules cannot be
    imported, as in an environment without them."""
    prelude = textwrap.dedent(
        f"""
        import sys
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, Blocker())
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


def test_the_client_runs_without_the_servers_dependencies() -> None:
    done = _python(
        """
        import numpy as np
        import distill_client
        from distill_client import DistillClient, DistilLoss, RemoteFeatureDistiller
        from distill_core import wire
        d = RemoteFeatureDistiller.with_weights([0.5, 0.5], DistilLoss.kl_divergence(2.0), target="127.0.0.1:1")
        assert d.n_layers() == 2
        request = wire.build(
            __import__("distill.v1.distill_pb2", fromlist=["x"]).ComputeLayerLossRequest(),
            teacher=np.ones(3, np.float32),
            student=np.ones(3, np.float32),
        )
        assert len(request) > 12
        print(sorted(m for m in sys.modules if m.startswith("distill_server")))
        """,
        SERVER_MODULES,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("missing", SERVER_MODULES)
def test_the_server_without_its_extra_says_which_to_install(missing: str) -> None:
    done = _python("import distill_server.cli", (missing,))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert 'pip install "distill-service[server]"' in last and f"({missing} is not installed)" in last, last


def test_the_wheel_ships_every_package_typed(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for name in ("core", "client", "server"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("distill_service-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {name.split("/")[0] for name in names if not name.startswith("distill_service-")}
    assert packages == {"distill", "distill_core", "distill_client", "distill_server"}
    for package in ("distill_core", "distill_client", "distill_server"):
        assert f"{package}/py.typed" in names
    assert {"distill/v1/distill_pb2.py", "distill/v1/distill_pb2.pyi", "distill/v1/distill_pb2_grpc.py"} <= names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "distill-server = distill_server.cli:main" in entry_points
    assert "distill-probe = distill_server.probe:main" in entry_points
