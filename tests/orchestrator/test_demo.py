"""`make demo` as a user runs it: its own redis-server and Ray cluster, one spoken turn."""
from __future__ import annotations

import os
import subprocess
import sys

import soundfile as sf


def test_demo_runs_a_spoken_turn_and_cleans_up(tmp_path):
    out = tmp_path / "reply.wav"
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "REDIS_URL", "BAICHUAN_AUDIO_CONFIG")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")          # builds its own tiny checkpoint
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo", "-o", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "time to first audio" in r.stdout and "real-time factor" in r.stdout
    info = sf.info(str(out))
    assert info.samplerate == 24000 and info.frames > 0
    assert "shutting down" in r.stderr
