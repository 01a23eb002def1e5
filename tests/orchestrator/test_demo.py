"""`make demo` as a user runs it: the installed console script, from a directory outside the
repository, with a clean environment (no PYTHONPATH): its own redis-server and Ray cluster,
one spoken turn. This is what catches an install that only works from the repo root."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import soundfile as sf

from services.common.checkpoint import Checkpoint
from services.common.runtime import TINY_SEED

CLI = Path(sys.executable).parent / "baichuan-audio"
# what a user's shell has; nothing that points Python at the checkout
USER_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "CI")


def user_env(tmp_path: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in USER_ENV if k in os.environ}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")          # builds its own tiny checkpoint
    return env


def test_installed_cli_runs_outside_the_repo(tmp_path):
    """--help, and the stubs package, from another directory: the editable install maps every package."""
    assert CLI.is_file(), f"{CLI} missing: is the project installed (make install)?"
    r = subprocess.run([str(CLI), "--help"], cwd=tmp_path, env=user_env(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout, r.stderr
    # the client imports the generated stubs (the import that failed when only orchestrator/ and
    # services/ were mapped)
    r = subprocess.run([sys.executable, "-c", "import orchestrator.client"], cwd=tmp_path, env=user_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_demo_runs_a_spoken_turn_and_cleans_up(tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run([str(CLI), "demo", "-o", "reply.wav"], cwd=work, env=user_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "time to first audio" in r.stdout and "real-time factor" in r.stdout
    # the checkpoint the demo wrote for itself gives the reply's rate
    ckpt = Checkpoint(tmp_path / "cache" / "baichuan-audio" / f"tiny-seed{TINY_SEED}")
    info = sf.info(str(work / "reply.wav"))
    assert info.samplerate == ckpt.hift_config().sampling_rate and info.frames > 0
    assert "shutting down" in r.stderr
