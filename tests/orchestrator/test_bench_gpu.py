"""`baichuan-audio bench gpu` at tiny size on the CPU: conversations go through the serving
path's runners, engine, publisher and job functions, and every measurement is reported; the
placement code (stages on several devices) runs on the CPU through the same path."""
from __future__ import annotations

import math

import pytest
import torch

from orchestrator.bench_gpu import STAGES, Turn, bench_gpu, describe, main, placement, side_by_side, spread


def test_underrun_and_speed_of_a_player():
    t = Turn("x", 0.0, None)
    t.audio = [(1.0, 0.5), (1.4, 0.5), (2.5, 1.0)]    # the third piece is 0.5 s late
    assert math.isclose(t.underrun(), 0.5) and math.isclose(t.speed(), 2.0 / 1.5)


def test_spread_puts_the_llm_alone_on_the_first_card():
    assert set(spread(1).values()) == {"cuda:0"}
    two = spread(2)
    assert two["llm"] == "cuda:0" and {two[s] for s in STAGES if s != "llm"} == {"cuda:1"}
    four = spread(4)
    assert four["llm"] == "cuda:0" and four["decoder"] == "cuda:1" and four["vocoder"] == "cuda:2"
    assert "cuda:0" not in {four[s] for s in STAGES if s != "llm"}
    assert describe(two) == "llm cuda:0; tokenizer, decoder, vocoder cuda:1"
    assert describe(spread(1)) == "all on cuda:0"


def test_placement_spec():
    assert placement("", "cpu") == {s: "cpu" for s in STAGES}
    assert placement("decoder+vocoder=cpu", "cpu")["decoder"] == "cpu"
    for bad, says in (("vocder=cpu", "unknown stage 'vocder'"), ("llm", "STAGE[+STAGE...]=DEVICE"),
                      ("llm=", "STAGE[+STAGE...]=DEVICE"), ("gpus=x", "whole number"), ("gpus=0", "at least 1")):
        with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("+", r"\+").replace(".", r"\.")):
            placement(bad, "cpu")
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match="does not exist here"):
        placement(f"llm={missing}", "cpu")


def test_cli_refuses_a_bad_placement_before_starting_anything(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--placement", "llm=cpu,talker=cpu"])
    assert e.value.code == 2 and "unknown stage 'talker'" in capsys.readouterr().err


def test_bench_runs_conversations_through_the_serving_path(capsys):
    places = [placement("", "cpu"), placement("llm=cpu,decoder+vocoder+tokenizer=cpu", "cpu")]
    rows = bench_gpu("tiny", "cpu", concurrency=(1, 2), question_s=1.0, reply="3,12,2,6", reference=False,
                     placements=places)
    assert [r["C"] for r in rows] == [1, 2, 1, 2] and all(r["completed"] == r["C"] for r in rows)
    assert [r["placement"] for r in rows] == [places[0]] * 2 + [places[1]] * 2
    for r in rows:
        assert 0 < r["ttfa"][0] <= r["ttfa"][1] and r["speed"][1] > 0 and "audio" in r["steps"]
        tok = r["stages"]["tokenizer"]                  # every question tokenized, none twice
        assert round(tok["batches"] * tok["mean_rows"]) == r["C"] and 0 < tok["busy"] < 1
        assert r["stages"]["decoder"]["batches"] >= 2 and r["stages"]["vocoder"]["p50_ms"] > 0
    out = capsys.readouterr().out
    assert "first audio p50/p95" in out and "underrun" in out and "stages: tokenizer" in out
    assert out.count("## placement: all on cpu") == 2 and "# side by side" in out
    table = out.split("# side by side")[1].splitlines()[2:4]       # each placement's own figures
    for C, line in zip((1, 2), table):
        cells = [c.strip() for c in line.split("|")]
        assert cells == [str(C)] + [side_by_side(r).strip() for r in rows if r["C"] == C]


def test_lanes_claim_a_turns_first_audio_first():
    """The benchmark's stages claim jobs as the workers do: the urgent lane first, each in order."""
    import queue

    from orchestrator.bench_stages import Lanes
    from services.common.entries import DECODER_JOBS, urgent_lane

    q: queue.Queue = queue.Queue()
    for i in range(3):
        q.put((DECODER_JOBS, f"later-{i}"))
    q.put((urgent_lane(DECODER_JOBS), "first"))
    q.put("flush")
    work = Lanes()
    assert [j for _, j in work.claim(q, 2)] == ["first", "later-0"] and work.control == ["flush"]
    q.put((urgent_lane(DECODER_JOBS), "first-b"))
    assert [j for _, j in work.claim(q, 5)] == ["first-b", "later-1", "later-2"]
    assert work.claim(q, 5, wait=0.01) == []
