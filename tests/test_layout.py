"""The import rules of the layout (README "Layout"): no stage imports another stage, shared code
imports no stage, and a stage's model and runner code never imports Ray, Redis or gRPC (only
its deployment.py does), so it runs on a bare GPU machine and in plain tests."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tokenizer", "llm", "decoder", "vocoder")
SERVING = ("ray", "redis", "grpc", "grpc_health", "grpc_reflection", "baichuan_audio")


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def modules(folder: str) -> list[Path]:
    files = sorted((ROOT / "services" / folder).glob("*.py"))
    assert files, f"services/{folder} has no modules"
    return files


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_no_other_stage(stage):
    others = tuple(f"services.{s}" for s in STAGES if s != stage)
    bad = {f.name: sorted(m for m in imports(f) if m.startswith(others)) for f in modules(stage)}
    assert not {k: v for k, v in bad.items() if v}, f"services/{stage} imports another stage: {bad}"


def test_shared_code_imports_no_stage():
    stages = tuple(f"services.{s}" for s in STAGES)
    bad = {f.name: sorted(m for m in imports(f) if m.startswith(stages)) for f in modules("common")}
    assert not {k: v for k, v in bad.items() if v}, f"services/common imports a stage: {bad}"


@pytest.mark.parametrize("stage", STAGES)
def test_model_and_runner_code_imports_no_serving_framework(stage):
    bad = {f.name: sorted(m for m in imports(f) if m.split(".")[0] in SERVING)
           for f in modules(stage) if f.name != "deployment.py"}
    assert not {k: v for k, v in bad.items() if v}, f"services/{stage} model/runner code imports {bad}"


# The modules of services/common that talk to Redis, gRPC or Ray. Everything else there is
# plain logic (entries, errors, settings, audio, ...) that tests, benchmarks and model code
# import without a serving framework, also not through one of these.
SERVING_ADAPTERS = ("bus.py", "worker.py", "stage_worker.py", "grpc_status.py")


def test_shared_logic_imports_no_serving_framework():
    adapters = {f"services.common.{name[:-3]}" for name in SERVING_ADAPTERS}
    bad = {f.name: sorted(m for m in imports(f) if m.split(".")[0] in SERVING or m in adapters)
           for f in modules("common") if f.name not in SERVING_ADAPTERS}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"services/common logic imports a serving framework: {bad}"
