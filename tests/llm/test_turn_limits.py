"""The operator's per-turn limits (limits.max_new_tokens, limits.max_audio_frames) end a
request with reason "length", over all of its segments."""
from __future__ import annotations

from services.llm.protocol import Phase
from tests.llm.test_scheduler import AG_START, EOA, FRAME, A, ends, frames, seq, text


def test_max_new_tokens_counts_text_and_audio_pads_over_the_turn():
    s = seq(max_new_tokens=6)
    text(s, A, AG_START)                      # 2 tokens; audiogen_start ends the text segment
    frames(s, FRAME, FRAME, FRAME)            # 3 pads: 5 tokens
    assert s.phase == Phase.AUDIO
    frames(s, FRAME)                          # the 6th generated token
    assert s.phase == Phase.DONE and s.done.reason == "length"
    assert [len(e.codes) for e in ends(s, "audio")] == [4]


def test_max_turn_frames_spans_segments():
    s = seq(max_turn_frames=5)
    text(s, AG_START)
    frames(s, FRAME, FRAME, FRAME, EOA)       # segment 0: 3 frames, then the text phase
    text(s, A, AG_START)
    frames(s, FRAME)
    assert s.phase == Phase.AUDIO
    frames(s, FRAME)                          # the 5th frame of the turn
    assert s.done.reason == "length"
    assert [len(e.codes) for e in ends(s, "audio")] == [3, 2]


def test_no_limits_no_early_end():
    s = seq()
    text(s, AG_START)
    frames(s, *([FRAME] * 20))
    assert s.phase == Phase.AUDIO and s.done is None
