"""Regenerate the committed Python code of the contracts: protos/gen/python.

One command (`make protos`), run by hand after editing a .proto; CI runs it too and fails
when the committed code differs (`make check-protos`). The proto root is the Python import
root, so generated imports (`from labelgrid.common.v1 import common_pb2`) need no rewriting.
protos/third_party (google/api's resource and field_behavior annotations) is only an include
path: its Python code is the googleapis-common-protos package it was copied from.
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = PROTO_ROOT / "gen" / "python"
# The generated code is tied to these versions; pins live in constraints.txt.
EXPECTED = {"grpcio-tools": "1.85.1", "protobuf": "7.36.2", "mypy-protobuf": "5.1.0"}


def check_toolchain() -> None:
    for dist, want in EXPECTED.items():
        have = metadata.version(dist)
        if have != want:
            sys.exit(f"gen_protos: {dist} {have} installed, {want} expected (see constraints.txt)")


def main() -> None:
    check_toolchain()
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "labelgrid").rglob("*.proto"))
    # protoc finds the mypy plugins on PATH: use the ones of this interpreter's environment.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    wkt = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto shipped with grpc_tools
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{PROTO_ROOT / 'third_party'}",
        f"-I{wkt}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *sources,
    ]
    if protoc.main(args) != 0:
        sys.exit("gen_protos: protoc failed")
    # Regular packages (not namespace ones) so setuptools finds and installs them.
    for folder in [OUT / "labelgrid", *(p for p in (OUT / "labelgrid").rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    (OUT / "labelgrid" / "py.typed").touch()
    print(f"gen_protos: {len(sources)} files -> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
