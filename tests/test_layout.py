"""The import rules of the layout (README "Layout"): no stage imports another stage, shared code
imports no stage, and a stage's model and runner code never imports Ray, Redis or gRPC (only
its deployment.py does), so it runs on a bare GPU machine and in plain tests. Shared logic
in services/common (all but its serving adapters) imports none of them either, and the
orchestrator's pure modules (what a turn means, merging, the session record) do not reach them,
not even through the project modules they import."""
from __future__ import annotations

import ast
import re
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
            out |= {f"{node.module}.{a.name}" for a in node.names}     # `from pkg import module`
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
SERVING_ADAPTERS = ("bus.py", "leases.py", "worker.py", "stage_worker.py", "grpc_status.py")


def test_shared_logic_imports_no_serving_framework():
    adapters = {f"services.common.{name[:-3]}" for name in SERVING_ADAPTERS}
    bad = {f.name: sorted(m for m in imports(f) if m.split(".")[0] in SERVING or m in adapters)
           for f in modules("common") if f.name not in SERVING_ADAPTERS}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"services/common logic imports a serving framework: {bad}"


# orchestrator modules without I/O of their own, and what they may not reach: conversation.py and
# sessions.py deal in plain types (the deployment converts protobuf); merge.py makes the caller's
# protobuf events, but reads and writes nothing
NO_IO = ("ray", "redis", "grpc", "grpc_health", "grpc_reflection")
PURE_ORCHESTRATOR = {"conversation.py": SERVING, "sessions.py": SERVING, "merge.py": NO_IO,
                     # the evaluation's dataset, records, judge and scoring: scored without a server
                     "evaluation/dataset.py": SERVING, "evaluation/records.py": SERVING,
                     "evaluation/judge.py": SERVING, "evaluation/scoring.py": SERVING,
                     # the Realtime protocol (it makes no call itself: its Backend does) and server VAD
                     "realtime.py": NO_IO, "vad.py": SERVING}


def reached(path: Path) -> set[str]:
    """Every module `path` imports, directly or through the project's own modules."""
    seen: set[str] = set()
    todo = [path]
    while todo:
        for m in imports(todo.pop()) - seen:
            seen.add(m)
            f = ROOT / (m.replace(".", "/") + ".py")
            if m.split(".")[0] in ("orchestrator", "services") and f.is_file():
                todo.append(f)
    return seen


@pytest.mark.parametrize("name", sorted(PURE_ORCHESTRATOR))
def test_pure_orchestrator_modules_reach_no_serving_framework(name):
    bad = sorted(m for m in reached(ROOT / "orchestrator" / name) if m.split(".")[0] in PURE_ORCHESTRATOR[name])
    assert not bad, f"orchestrator/{name} imports {bad} (directly or through project modules)"


# One module, one concern: a file that outgrows this is carrying several.
MAX_LINES = 600


def test_no_source_file_over_the_line_limit():
    files = [p for d in ("services", "orchestrator", "tests") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50, "the tree was not found"
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them along a real seam): {long}"


# Special tokens are named in one place (services/common/text_tokenizer.py, looked up in the
# tokenizer; messages may quote them): the LLM's generation code works on the ids it is given.
SPECIAL_TOKEN = re.compile(r"<\|?[A-Za-z_]+\|?>")
TOKEN_LOGIC = ("scheduler.py", "protocol.py", "publisher.py", "stop.py", "sampler.py", "runner.py")


def code_strings(path: Path) -> list[str]:
    """The string literals of `path` that are not docstrings."""
    tree = ast.parse(path.read_text(), str(path))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


@pytest.mark.parametrize("name", TOKEN_LOGIC)
def test_generation_code_hard_codes_no_special_token(name):
    bad = [s for s in code_strings(ROOT / "services" / "llm" / name) if SPECIAL_TOKEN.search(s)]
    assert not bad, f"services/llm/{name} spells out special tokens {bad}; take their ids from the tokenizer"
