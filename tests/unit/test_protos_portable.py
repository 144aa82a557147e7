"""The .proto files as any language's user compiles them: `protoc -I protos protos/megascope/v1/*.proto`, with
package options for the common generators; the committed Python stays importable under megascope.protos."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from megascope.protos import generate
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2, worker_pb2

PROTOS = generate.PROTOS_DIR
SOURCES = sorted(str(p.relative_to(PROTOS.parent)) for p in (PROTOS / "megascope" / "v1").glob("*.proto"))
OPTIONS = ("go_package", "java_package", "java_multiple_files", "java_outer_classname", "csharp_namespace",
           "objc_class_prefix", "php_namespace", "ruby_package")  # fmt: skip


def _protoc(*args: str) -> subprocess.CompletedProcess[str]:
    # grpc_tools' protoc, run as its own command from the repository root; `-I protos` is the only include path.
    return subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "protos", *args, *SOURCES],
        capture_output=True, text=True, timeout=120, cwd=PROTOS.parent,
    )  # fmt: skip


def test_the_protos_compile_with_only_the_protos_folder_as_include_path(tmp_path: Path) -> None:
    descriptors = tmp_path / "megascope.binpb"
    result = _protoc(f"--descriptor_set_out={descriptors}", f"--python_out={tmp_path}")
    assert result.returncode == 0, result.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes()).file
    assert sorted(f.name for f in files) == ["megascope/v1/agent.proto", "megascope/v1/telemetry.proto",
                                             "megascope/v1/worker.proto"]  # fmt: skip
    assert {d for f in files for d in f.dependency} == {"megascope/v1/telemetry.proto"}


@pytest.mark.skipif(shutil.which("protoc") is None, reason="no protoc binary on PATH (grpc_tools' protoc is tested)")
def test_a_system_protoc_compiles_them_too(tmp_path: Path) -> None:
    result = subprocess.run(
        ["protoc", "-I", "protos", f"--descriptor_set_out={tmp_path / 'set.binpb'}", *SOURCES],
        capture_output=True, text=True, timeout=120, cwd=PROTOS.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", [agent_pb2, telemetry_pb2, worker_pb2], ids=lambda m: m.__name__.rsplit(".")[-1])
def test_every_file_carries_the_language_package_options(module: object) -> None:
    options = module.DESCRIPTOR.GetOptions()  # type: ignore[attr-defined]
    missing = [name for name in OPTIONS if not options.HasField(name)]
    assert not missing, f"{module.DESCRIPTOR.name}: add option {', '.join(missing)}"  # type: ignore[attr-defined]
    assert options.java_package == "dev.megascope.v1" and options.csharp_namespace == "Megascope.V1"


def test_generated_messages_live_under_the_megascope_package_and_pickle() -> None:
    """generate.py maps protoc's `megascope.v1` modules onto megascope.protos.megascope.v1 (pickle names them)."""
    report = telemetry_pb2.StepReport(rank=3, step=7, loss=1.5)
    assert type(report).__module__ == "megascope.protos.megascope.v1.telemetry_pb2"
    assert pickle.loads(pickle.dumps(report)) == report
    assert agent_pb2.GetSnapshotResponse.DESCRIPTOR.fields_by_name["node_info"].message_type.file.name == (
        "megascope/v1/telemetry.proto"
    )
