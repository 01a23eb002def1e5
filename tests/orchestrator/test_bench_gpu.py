"""`baichuan-audio bench gpu` at tiny size on the CPU: conversations go through the serving
path's runners, engine, publisher and job functions, and every measurement is reported."""
from __future__ import annotations

import math

from orchestrator.bench_gpu import Turn, bench_gpu


def test_underrun_and_speed_of_a_player():
    t = Turn("x", 0.0, None)
    t.audio = [(1.0, 0.5), (1.4, 0.5), (2.5, 1.0)]    # the third piece is 0.5 s late
    assert math.isclose(t.underrun(), 0.5) and math.isclose(t.speed(), 2.0 / 1.5)


def test_bench_runs_conversations_through_the_serving_path(capsys):
    rows = bench_gpu("tiny", "cpu", concurrency=(1, 2), question_s=1.0, reply="3,12,2,6", reference=False)
    assert [r["C"] for r in rows] == [1, 2] and all(r["completed"] == r["C"] for r in rows)
    for r in rows:
        assert 0 < r["ttfa"][0] <= r["ttfa"][1] and r["speed"][1] > 0 and "audio" in r["steps"]
    out = capsys.readouterr().out
    assert "first audio p50/p95" in out and "underrun" in out
