"""The public surface is exact: sorted ``__all__`` naming every public name,
and the client's names that README.md documents."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import distill_client

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()

MODULES = [
    "distill_client",
    "distill_client.client",
    "distill_client.cuda_ipc",
    "distill_client.distiller",
    "distill_client.hf",
    "distill_client.response",
    "distill_client.shared_memory",
    "distill_client.stream",
    "distill_client.torch",
    "distill_core",
    "distill_core.cuda",
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
    "distill_server.cuda_ipc",
    "distill_server.decoding",
    "distill_server.engine",
    "distill_server.interruption",
    "distill_server.logs",
    "distill_server.metrics",
    "distill_server.probe",
    "distill_server.relational",
    "distill_server.server",
    "distill_server.servicer",
    "distill_server.shared_memory",
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


def _readme_imports() -> set[tuple[str, str]]:
    """``(module, name)`` for every name README's examples import from the client."""
    found = set()
    for module, names in re.findall(r"^from (distill_client(?:\.\w+)?) import (.+)$", README, re.MULTILINE):
        found |= {(module, name.strip()) for name in names.split(",")}
    return found


def test_readme_imports_only_exported_names() -> None:
    imported = _readme_imports()
    assert {module for module, _ in imported} == {"distill_client", "distill_client.hf", "distill_client.torch"}
    for module, name in sorted(imported):
        assert name in importlib.import_module(module).__all__, f"README imports {name} from {module}"


def _error_table() -> list[tuple[str, str, str | None, list[str]]]:
    """The README's error table: ``(class, status code, documented base class, fields)``."""
    section = README.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        match = re.fullmatch(r"\| `(\w+)`( \(a `(\w+)`\))? \| ([A-Z_]+) \| [^|]* \|([^|]*)\|", line)
        if match:
            fields = re.findall(r"`(\w+)`", match.group(5))
            rows.append((match.group(1), match.group(4), match.group(3), fields))
    return rows


def test_readme_error_table_matches_the_exported_errors() -> None:
    rows = _error_table()
    assert len(rows) == 16, rows  # every row with one class and one status code
    assert "`distill_client.DistillError`" in README
    for name, code, base, fields in rows:
        assert name in distill_client.__all__, name
        cls = getattr(distill_client, name)
        assert issubclass(cls, distill_client.DistillError), name
        assert cls.code.name == code, (name, cls.code.name, code)
        assert base is None or issubclass(cls, getattr(distill_client, base)), (name, base)
        assert list(cls.int_fields) == fields, (name, cls.int_fields, fields)
