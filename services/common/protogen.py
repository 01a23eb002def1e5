"""Generate the Python gRPC stubs of proto/ into the `baichuan_audio.v1` package.

Runs at install time (setup.py's build_py, editable or not) and on `make proto`. The package
folders `baichuan_audio/` and `baichuan_audio/v1/` are committed, so setuptools' package discovery
(and the editable install's import map) always includes them; the generated modules are not."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = "proto"
PACKAGE = ("baichuan_audio", "v1")


def generate(root: Path = ROOT) -> list[Path]:
    from grpc_tools import protoc  # build-time dependency
    import grpc_tools

    src = root / PROTO_DIR
    protos = sorted(src.joinpath(*PACKAGE).glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {src.joinpath(*PACKAGE)}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{src}", f"-I{well_known}", f"--python_out={root}", f"--pyi_out={root}",
            f"--grpc_python_out={root}"] + [str(p.relative_to(src)) for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(p.name for p in protos))
    return protos

