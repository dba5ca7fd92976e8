"""The public surface is exact: sorted ``__all__`` naming every public name."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "distill_client",
    "distill_client.client",
    "distill_client.distiller",
    "distill_client.stream",
    "distill_client.torch",
    "distill_core",
    "distill_core.errors",
    "distill_core.losses",
    "distill_core.rpc",
    "distill_core.tensors",
    "distill_core.wire",
    "distill_server",
    "distill_server.admission",
    "distill_server.auth",
    "distill_server.backend",
    "distill_server.cli",
    "distill_server.config",
    "distill_server.decoding",
    "distill_server.engine",
    "distill_server.metrics",
    "distill_server.probe",
    "distill_server.server",
    "distill_server.servicer",
    "distill_server.status",
    "distill_server.supervisor",
    "distill_server.validation",
]


def isort_style(name: str) -> tuple[int, str]:
    """Constants, then classes, then the rest (ruff's RUF022 order)."""
    if name.isupper() or (name.upper() == name and "_" in name):
        return 0, name
    return (1 if name[0].isupper() else 2), name


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_complete(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported == sorted(exported, key=isort_style)
    assert len(set(exported)) == len(exported)
    assert all(hasattr(module, item) for item in exported)
    defined_here = {
        item
        for item, value in vars(module).items()
        if not item.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == name
    }
    assert defined_here <= set(exported), defined_here - set(exported)


def test_typed_marker_ships() -> None:
    import distill_client

    assert (importlib.resources.files(distill_client) / "py.typed").is_file()
