"""ReplyMerger: ordering, gap-free numbering, the reference's inserted crossfade, interrupts."""
from __future__ import annotations

import numpy as np
import pytest

from orchestrator.merge import ReplyMerger
from services.common import entries as E
from services.common.audio import from_pcm16, to_pcm16
from services.common.crossfade import join_segments

T = "turn-1"


def chunk(seg: int, idx: int, samples: np.ndarray, final: bool = True) -> E.PcmChunk:
    return E.PcmChunk.from_pcm16(turn_id=T, segment=seg, chunk=idx, pcm16=to_pcm16(samples, limit=1.0),
                                 sample_rate=24000, final=final)


def audio_of(events) -> np.ndarray:
    parts = [from_pcm16(e.audio.pcm16) for e in events if e.HasField("audio")]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def feed_all(m: ReplyMerger, entries) -> list:
    out = []
    for e in entries:
        out.extend(m.feed(e))
    return out


def test_segments_join_with_the_reference_inserted_crossfade_in_any_arrival_order():
    rng = np.random.default_rng(0)
    a = (rng.uniform(-0.5, 0.5, 1440 * 2)).astype(np.float32)
    b1, b2 = (rng.uniform(-0.5, 0.5, 1920)).astype(np.float32), (rng.uniform(-0.5, 0.5, 960)).astype(np.float32)
    c = (rng.uniform(-0.5, 0.5, 1440)).astype(np.float32)
    m = ReplyMerger(T)
    # audio arrives before its announcements and out of order across segments and chunks
    events = feed_all(m, [
        E.TextDelta(turn_id=T, segment=0, text="Hi,"),
        chunk(2, 0, c),
        chunk(1, 1, b2),
        E.SegmentBoundary(turn_id=T, segment=0, kind="text"),
        chunk(0, 0, a),
        E.SegmentBoundary(turn_id=T, segment=0, kind="audio", audio_frames=6, chunks=1),
        chunk(1, 0, b1, final=False),
        E.SegmentBoundary(turn_id=T, segment=1, kind="audio", audio_frames=4, chunks=2),
        E.SegmentBoundary(turn_id=T, segment=2, kind="audio", audio_frames=3, chunks=1),
        E.TextDelta(turn_id=T, segment=1, text=" there"),
        E.TurnEnd(turn_id=T, reason="eos"),
    ])
    seqs = [e.audio.sequence for e in events if e.HasField("audio")]
    assert seqs == list(range(len(seqs)))
    q = lambda x: from_pcm16(to_pcm16(x, limit=1.0))                          # noqa: E731 (PCM16 rounding)
    import torch
    expected = join_segments([torch.from_numpy(q(a)), torch.from_numpy(np.concatenate([q(b1), q(b2)])),
                              torch.from_numpy(q(c))], 240).numpy()
    # the merger joins with the reference's join itself: equal to the sample after PCM16
    assert to_pcm16(audio_of(events), limit=1.0) == to_pcm16(expected, limit=1.0)
    assert len(audio_of(events)) == len(a) + len(b1) + len(b2) + len(c) + 2 * 240
    end = events[-1].end
    assert end.reason == "complete" and end.text == "Hi, there"
    assert end.audio_seconds == pytest.approx(len(expected) / 24000)
    assert [e.segment.kind for e in events if e.HasField("segment")].count(2) == 3   # AUDIO_END per segment


def test_end_waits_for_announced_audio_and_zero_frame_segments_emit_nothing():
    m = ReplyMerger(T)
    assert feed_all(m, [E.SegmentBoundary(turn_id=T, segment=0, kind="audio", audio_frames=0, chunks=0),
                        E.SegmentBoundary(turn_id=T, segment=1, kind="audio", audio_frames=2, chunks=1),
                        E.TurnEnd(turn_id=T, reason="eos")]) == []        # segment 1's audio is due
    out = m.feed(chunk(1, 0, np.zeros(1440, np.float32)))
    assert out[-1].HasField("end") and m.finished
    assert m.feed(chunk(1, 0, np.zeros(1440, np.float32))) == []            # a late duplicate is ignored


def test_interrupt_ends_now_with_only_what_was_sent():
    m = ReplyMerger(T)
    feed_all(m, [E.TextDelta(turn_id=T, segment=0, text="Hello"),
                        E.SegmentBoundary(turn_id=T, segment=0, kind="audio", audio_frames=8, chunks=2),
                        chunk(0, 0, np.zeros(1920, np.float32), final=False)])
    out = m.interrupt()
    assert out[-1].end.reason == "interrupted" and out[-1].end.text == "Hello"
    assert out[-1].end.audio_seconds == pytest.approx(1920 / 24000)
    assert m.feed(chunk(0, 1, np.zeros(1920, np.float32))) == []


def test_the_token_ids_of_the_text_sent_are_kept_for_the_history():
    def delta(segment: int, text: str, *ids: int) -> E.TextDelta:
        return E.TextDelta(turn_id=T, segment=segment, text=text, tokens=E.Array.of(ids, E.INT32))

    m = ReplyMerger(T)
    feed_all(m, [delta(0, "Hel", 11, 12), delta(0, "lo", 13), E.SegmentBoundary(turn_id=T, segment=0, kind="text"),
                 delta(1, "!", 14)])
    m.interrupt()
    assert m.feed(delta(1, " late", 15)) == []
    assert "".join(m.text) == "Hello!" and m.text_tokens == [11, 12, 13, 14]


def test_a_stage_error_ends_the_turn_with_it():
    m = ReplyMerger(T)
    out = feed_all(m, [E.TurnError(turn_id=T, stage="decoder", code=13, message="lost segment 0 chunk 0")])
    assert out[-1].error.code == 13 and "decoder" in out[-1].error.message and m.finished


def test_the_inserted_block_is_the_reference_join_to_the_sample():
    """The merger's block is the reference's rounding (linspace(1, 0), not 1 - linspace(0, 1)):
    for these samples the two differ after PCM16, so only the shared join passes."""
    import torch
    rng = np.random.default_rng(13)                    # a case where the two roundings differ
    q = lambda x: from_pcm16(to_pcm16(x, limit=1.0))   # noqa: E731
    tail, head = (q(rng.uniform(-0.9, 0.9, 240).astype(np.float32)) for _ in range(2))
    a = np.concatenate([q(rng.uniform(-0.5, 0.5, 720).astype(np.float32)), tail])
    b = np.concatenate([head, q(rng.uniform(-0.5, 0.5, 720).astype(np.float32))])
    m = ReplyMerger(T)
    events = feed_all(m, [chunk(0, 0, a), E.SegmentBoundary(turn_id=T, segment=0, kind="audio", audio_frames=2, chunks=1),
                          chunk(1, 0, b), E.SegmentBoundary(turn_id=T, segment=1, kind="audio", audio_frames=2, chunks=1),
                          E.TurnEnd(turn_id=T, reason="eos")])
    expected = join_segments([torch.from_numpy(a), torch.from_numpy(b)], 240).numpy()
    assert to_pcm16(audio_of(events), limit=1.0) == to_pcm16(expected, limit=1.0)
