"""The proto contract: generated code is current, every element documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from scripts.gen_protos import PROTO, PROTO_ROOT, ROOT, generate, protoc

GENERATED = ROOT / "core" / "distill" / "v1"


def test_generated_code_is_current(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = tmp_path / "distill" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == ["distill_pb2.py", "distill_pb2.pyi", "distill_pb2_grpc.py"]
    for name in names:
        assert (fresh / name).read_text() == (GENERATED / name).read_text(), f"{name} is stale: run `make protos`"


def _descriptor(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "distill.desc"
    protoc("--include_source_info", f"--descriptor_set_out={out}")
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]


def _elements(proto: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Path in SourceCodeInfo -> name, for every message, field, oneof, enum, value, service, method."""
    found: dict[tuple[int, ...], str] = {}

    def message(path: tuple[int, ...], m: descriptor_pb2.DescriptorProto) -> None:
        found[path] = m.name
        for i, f in enumerate(m.field):
            found[(*path, 2, i)] = f"{m.name}.{f.name}"
        synthetic = {f.oneof_index for f in m.field if f.proto3_optional}  # protoc's, for `optional` fields
        for i, o in enumerate(m.oneof_decl):
            if i not in synthetic:
                found[(*path, 8, i)] = f"{m.name}.{o.name}"
        for i, nested in enumerate(m.nested_type):
            if not nested.options.map_entry:  # protoc's, for a map field (documented as the field)
                message((*path, 3, i), nested)
        for i, e in enumerate(m.enum_type):
            enum((*path, 4, i), e)

    def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto) -> None:
        found[path] = e.name
        for i, v in enumerate(e.value):
            found[(*path, 2, i)] = v.name

    for i, m in enumerate(proto.message_type):
        message((4, i), m)
    for i, e in enumerate(proto.enum_type):
        enum((5, i), e)
    for i, s in enumerate(proto.service):
        found[(6, i)] = s.name
        for j, method in enumerate(s.method):
            found[(6, i, 2, j)] = method.name
    return found


def test_every_element_is_documented(tmp_path: Path) -> None:
    proto = _descriptor(tmp_path)
    documented = {tuple(loc.path) for loc in proto.source_code_info.location if loc.leading_comments.strip()}
    missing = [name for path, name in _elements(proto).items() if path not in documented]
    assert not missing, f"undocumented: {missing}"


def test_package_is_versioned_and_enums_start_unspecified(tmp_path: Path) -> None:
    proto = _descriptor(tmp_path)
    assert proto.package == "distill.v1"
    for enum in proto.enum_type:
        assert enum.value[0].number == 0
        assert enum.value[0].name.endswith("_UNSPECIFIED")
    for method in proto.service[0].method:
        assert method.input_type == f".distill.v1.{method.name}Request"
        assert method.output_type == f".distill.v1.{method.name}Response"


@pytest.mark.parametrize("path", [PROTO])
def test_proto_lives_where_its_package_says(path: Path) -> None:
    assert path.relative_to(PROTO_ROOT).parent.as_posix() == "distill/v1"
