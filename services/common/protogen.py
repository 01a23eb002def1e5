"""Generate the Python gRPC stubs of proto/ into the `baichuan_audio.v1` package.

Runs at install time (setup.py) and, for a source checkout that was not installed, on first
import of the stubs (`ensure_stubs`). The generated files are never committed."""
from __future__ import annotations

import importlib
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
    pkg = root
    for part in PACKAGE:
        pkg = pkg / part
        (pkg / "__init__.py").touch()
    return protos


def _stale(root: Path) -> bool:
    out = root.joinpath(*PACKAGE)
    for proto in root.joinpath(PROTO_DIR, *PACKAGE).glob("*.proto"):
        gen = out / (proto.stem + "_pb2.py")
        if not gen.exists() or gen.stat().st_mtime < proto.stat().st_mtime:
            return True
    return False


def ensure_stubs() -> None:
    """Make `import baichuan_audio.v1.*_pb2` work: regenerate in a source checkout if stale."""
    if ROOT.joinpath(PROTO_DIR).is_dir() and _stale(ROOT):
        generate(ROOT)
        importlib.invalidate_caches()
