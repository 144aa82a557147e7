"""Regenerate the committed Python code for the megascope wire protocol.

Layout (one layout, chosen so generated imports resolve in an editable install):

    protos/megascope/v1/telemetry.proto       source
    protos/megascope/v1/telemetry_pb2.py      generated (also *_pb2.pyi, *_pb2_grpc.py, __init__.py)

The folder ``protos/`` is the package ``megascope.protos``, so the generated modules import as::

    from megascope.protos.megascope.v1 import telemetry_pb2, agent_pb2, agent_pb2_grpc
    from megascope.protos.megascope.v1 import worker_pb2, worker_pb2_grpc

protoc runs as any other language's user runs it, ``protoc -I protos protos/megascope/v1/*.proto``: every
.proto is known by its path below ``protos/`` (``megascope/v1/telemetry.proto``), which is also the name
server reflection gives it. protoc's Python generator turns that path into the module ``megascope.v1``, which
is not where the package lives; it has no option for a module prefix, so :func:`_into_package` rewrites the
two places that name the module (the imports between generated files and the module name the message classes
record, which pickling uses) to ``megascope.protos.megascope.v1``. The ``megascope/protos/...`` path of
earlier versions made the imports right without a rewrite, but no other language's user could compile the
files with ``-I protos``.

Usage::

    python -m megascope.protos.generate          # regenerate and write the files
    python -m megascope.protos.generate --check  # exit 1, listing stale files, if anything differs

Output is byte-for-byte reproducible only with the pinned grpcio-tools (see pyproject.toml).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

# The folder that is the package megascope.protos (this file's folder), and protoc's one include path.
PROTOS_DIR = Path(__file__).resolve().parent
# Where the generated modules are imported from: the package of PROTOS_DIR.
PYTHON_PACKAGE = "megascope.protos"
# Sources live under PROTOS_DIR / SOURCE_SUBDIR; generated code is written next to them.
SOURCE_SUBDIR = "megascope"
# File names this script owns below SOURCE_SUBDIR: anything matching is rewritten or deleted.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
INIT = "__init__.py"


def proto_sources(root: Path) -> list[Path]:
    """All .proto files below ``root/megascope``, sorted so protoc sees a stable order."""
    return sorted((root / SOURCE_SUBDIR).rglob("*.proto"))


def _is_generated(path: Path) -> bool:
    return path.name == INIT or path.name.endswith(GENERATED_SUFFIXES)


def generate(root: Path = PROTOS_DIR) -> dict[Path, bytes]:
    """Run protoc on the sources under ``root`` and return {path relative to root: content}.

    Nothing under ``root`` is written: protoc writes into a temporary directory, so a failed run
    never leaves half-updated files behind.
    """
    sources = proto_sources(root)
    if not sources:
        raise FileNotFoundError(f"no .proto files under {root / SOURCE_SUBDIR}")
    # grpc_tools ships the well-known types (google/protobuf/*.proto); `python -m grpc_tools.protoc`
    # adds this include by itself, calling protoc.main in-process does not.
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="megascope-protoc-") as tmp:
        out = Path(tmp)
        args = [
            "grpc_tools.protoc",  # argv[0], ignored by protoc
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            # Sources named relative to the include path, as in `protoc -I protos megascope/v1/x.proto`.
            *(src.relative_to(root).as_posix() for src in sources),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed (its error is printed above); command: " + " ".join(args))
        packages = _proto_packages(out)
        files = {
            path.relative_to(out): _into_package(path.read_bytes(), packages)
            for path in sorted(out.rglob("*"))
            if path.is_file()
        }
    # Empty __init__.py in every generated folder: regular packages are found by every tool
    # (mypy, setuptools' package discovery), where implicit namespace packages are not always.
    for rel in list(files):
        for parent in rel.parents:
            if parent != Path("."):
                files.setdefault(parent / INIT, b"")
    return files


def _proto_packages(out: Path) -> list[str]:
    """The Python packages protoc wrote (``megascope.v1``), longest first so a prefix never shadows a longer one."""
    folders = {path.parent.relative_to(out) for path in out.rglob("*.py*")}
    return sorted((".".join(folder.parts) for folder in folders if folder.parts), key=len, reverse=True)


def _into_package(code: bytes, packages: list[str]) -> bytes:
    """``code`` with protoc's module names (``megascope.v1.x_pb2``) moved under :data:`PYTHON_PACKAGE`.

    Only whole statements protoc writes are touched: ``from megascope.v1 import ...`` lines and the quoted
    module name handed to ``BuildTopDescriptorsAndMessages``. Descriptor contents (the serialized file, its
    ``megascope/v1/...`` name) stay as protoc made them.
    """
    text = code.decode("utf-8")
    for package in packages:
        quoted = re.escape(package)
        text = re.sub(rf"^from {quoted} import ", f"from {PYTHON_PACKAGE}.{package} import ", text, flags=re.M)
        text = re.sub(rf"'{quoted}\.(\w+_pb2)'", rf"'{PYTHON_PACKAGE}.{package}.\1'", text)
    return text.encode("utf-8")


def committed(root: Path = PROTOS_DIR) -> dict[Path, bytes]:
    """Generated-looking files currently on disk below ``root/megascope``, relative to root."""
    return {
        path.relative_to(root): path.read_bytes()
        for path in sorted((root / SOURCE_SUBDIR).rglob("*"))
        if path.is_file() and _is_generated(path)
    }


def stale_files(root: Path = PROTOS_DIR) -> list[Path]:
    """Paths (relative to root) that are missing, different, or left over from a removed .proto."""
    fresh = generate(root)
    current = committed(root)
    return sorted(p for p in fresh.keys() | current.keys() if fresh.get(p) != current.get(p))


def write(root: Path = PROTOS_DIR) -> list[Path]:
    """Regenerate under ``root``; return the paths that were written or deleted."""
    fresh = generate(root)
    changed: list[Path] = []
    for rel, content in fresh.items():
        path = root / rel
        if not path.exists() or path.read_bytes() != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            changed.append(rel)
    # Delete generated files whose .proto is gone, so a removed message cannot linger importable.
    for rel in committed(root).keys() - fresh.keys():
        (root / rel).unlink()
        changed.append(rel)
    return sorted(changed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megascope.protos.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check", action="store_true", help="do not write; exit 1 and list the stale files if anything would change"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=PROTOS_DIR,
        help="folder holding megascope/**/*.proto (default: this package's folder)",
    )
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    if args.check:
        stale = stale_files(root)
        if stale:
            print("stale generated files (run `python -m megascope.protos.generate`):", file=sys.stderr)
            for rel in stale:
                print(f"  {root / rel}", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    for rel in write(root):
        print(f"updated {root / rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
