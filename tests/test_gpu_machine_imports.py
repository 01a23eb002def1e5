"""The benchmarks run on GPU machines that have torch, transformers and safetensors but no Ray,
Redis, gRPC, soundfile, OpenTelemetry or pydantic (README "Benchmarks"). Each one is run here
with those packages made unimportable, in every process it starts: a stage runner that reaches
the settings (pydantic) or an audio decoder (soundfile) at import fails this test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("ray", "redis", "grpc", "grpc_health", "grpc_reflection", "soundfile", "opentelemetry",
          "pydantic", "pydantic_settings", "fastapi", "starlette", "hiredis")

BLOCKER = f"""
import sys
ABSENT = {set(ABSENT)!r}
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on GPU machines)")
sys.meta_path.insert(0, _Absent())
"""

RUNS = {
    "bench gpu": ["-m", "orchestrator.bench_gpu", "--size", "tiny", "--concurrency", "1", "--no-reference"],
    "bench llm": ["-m", "services.llm.bench_engine", "--batch-sizes", "1", "--steps", "2", "--warmup", "1",
                  "--kinds", "audio"],
    "bench tokenizer": ["-m", "services.tokenizer.bench", "--help"],
    "bench decoder": ["-m", "services.decoder.bench", "--help"],
    "bench vocoder": ["-m", "services.vocoder.bench", "--help"],
}


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)       # loaded by every Python process started
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_blocker_blocks(tmp_path):
    r = run(["-c", "import pydantic"], tmp_path)
    assert r.returncode != 0 and "absent on GPU machines" in r.stderr


@pytest.mark.parametrize("name", sorted(RUNS))
def test_benchmark_runs_without_serving_packages(name, tmp_path):
    r = run(RUNS[name], tmp_path)
    assert r.returncode == 0, f"{name} needs a package GPU machines lack:\n{r.stderr[-3000:]}"
