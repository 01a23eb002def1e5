"""What the LLM stage writes for a turn (publisher.py): text with its token ids, no per-frame
code entries, decode jobs with their own codes, and an end entry carrying the session's
history as the next turn extends it (protocol.Done.history / reply_codes)."""
from __future__ import annotations

import pytest

from services.common import entries
from services.llm.publisher import ChunkPolicy, TurnPublisher
from tests.llm.test_scheduler import (A, AG_END, AG_START, BANG, EOA, EOS, FRAME, PAD, SP_B, X, frames, seq,
                                      text)

F2, F3 = (6, 2, 3), (7, 3, 4)
USER = (9, 9, 9)                                  # the prompt's own audio (user speech)


def publish(s, chunks: ChunkPolicy = ChunkPolicy()) -> list[tuple[str, entries.Entry]]:
    out: list[tuple[str, entries.Entry]] = []
    pub = TurnPublisher("t", "sess", lambda target, e: out.append((target, e)), chunks=chunks, seed=1)
    for ev in s.events:
        pub.feed(ev)
    return out


def end_of(out) -> entries.TurnEnd:
    (end,) = [e for _, e in out if isinstance(e, entries.TurnEnd)]
    return entries.decode_entry(end.encode())      # as a reader gets it


def pads(ids) -> int:
    return sum(1 for t in ids if t == PAD)


def test_the_end_closes_the_final_audio_span_and_carries_the_reply_codes():
    s = seq(prompt=(A, PAD, A), pads=[USER])
    text(s, A, AG_START)
    frames(s, FRAME, F2, EOA)
    text(s, X, EOS)                                # the final audio segment follows (correction 11)
    frames(s, F3, EOA)
    d = s.done
    assert d.final_sequence[-2:] == (PAD, PAD)     # the reference's sequence: the EOA pad never forwarded
    assert d.history == d.final_sequence[:-1] + (AG_END,)
    assert d.reply_codes == (FRAME, F2, F3)        # generated frames only: no prompt row, no EOA row
    end = end_of(publish(s))
    assert end.tokens.numpy().tolist() == list(d.history)
    assert end.codes.numpy().tolist() == [list(FRAME), list(F2), list(F3)]
    # the session's invariant: one code row per audio pad (prompt's first, then the reply's)
    assert pads(end.tokens.numpy().tolist()) == 1 + len(end.codes.numpy())


def test_a_capped_segment_loses_its_last_pad_and_its_row():
    # the host writes audiogen_end over the capped segment's last pad (§11.2 e): that frame was
    # streamed and decoded, but it is not in the history
    s = seq(max_audio_frames=2)
    text(s, AG_START)
    frames(s, FRAME, F2)
    text(s, A, EOS)
    frames(s, F3, EOA)
    out = publish(s)
    jobs = [e for t, e in out if t in entries.lanes(entries.DECODER_JOBS)]
    assert [j.codes.numpy().tolist() for j in jobs] == [[list(FRAME), list(F2)], [list(F3)]]
    end = end_of(out)
    assert end.codes.numpy().tolist() == [list(FRAME), list(F3)]
    assert pads(end.tokens.numpy().tolist()) == len(end.codes.numpy())


@pytest.mark.parametrize("case", ["text_only", "max_rounds_text", "eos_alone", "cancelled_mid_audio", "forced"])
def test_history_without_a_final_end_of_audio_pad_is_the_sequence(case):
    if case == "text_only":
        s = seq(mode="text")
        text(s, A, SP_B, EOS)
    elif case == "eos_alone":
        s = seq()
        text(s, AG_START)
        frames(s, FRAME, EOA)
        text(s, EOS)
    elif case == "cancelled_mid_audio":
        s = seq()
        text(s, AG_START)
        frames(s, FRAME, F2)
        s.finish("cancelled")
    elif case == "forced":                         # forced schedules (benchmarks): no EOA decides
        s = seq(forced=[("text", 1), ("audio", 2)])
        text(s, A)
        frames(s, FRAME, EOA)
    else:
        from tests.llm.test_scheduler import rules
        s = seq(p=rules(max_rounds=1))
        text(s, AG_START)
        frames(s, FRAME, EOA)
        text(s, A, BANG)
    d = s.done
    assert d.history == d.final_sequence
    assert pads(d.history) == len(d.reply_codes)


def test_no_per_frame_entries_and_text_carries_its_token_ids():
    s = seq()
    text(s, A, SP_B, AG_START)
    frames(s, FRAME, F2, F3, EOA)
    text(s, X, EOS)
    frames(s, FRAME, EOA)
    out = publish(s, ChunkPolicy(first=1, growth=2.0, max_chunk=50))
    assert {t for t, _ in out} == {"llm", *entries.lanes(entries.DECODER_JOBS)}
    # the turn's stream gets as many entries for a 12-frame segment as for a 3-frame one
    longer = seq()
    text(longer, A, SP_B, AG_START)
    frames(longer, *[FRAME, F2, F3] * 4, EOA)
    text(longer, X, EOS)
    frames(longer, FRAME, EOA)
    llm_kinds = lambda o: [type(e).TYPE for t, e in o if t == "llm"]         # noqa: E731
    assert llm_kinds(publish(longer, ChunkPolicy(first=1, growth=2.0, max_chunk=50))) == llm_kinds(out)
    texts = [entries.decode_entry(e.encode()) for t, e in out if isinstance(e, entries.TextDelta)]
    assert [(d.text, d.tokens.numpy().tolist()) for d in texts] == [("a", [A]), (" b", [SP_B]), ("x", [X])]
    # the decoder still gets every frame: low-latency chunks of segment 0, then segment 1 whole
    jobs = [e for t, e in out if t in entries.lanes(entries.DECODER_JOBS)]
    seg0 = [j for j in jobs if j.segment == 0]
    assert len(seg0) >= 2 and seg0[-1].codes.numpy().tolist() == [list(FRAME), list(F2), list(F3)]
    assert [j.codes.numpy().tolist() for j in jobs if j.segment == 1] == [[list(FRAME)]]
    bounds = [e for _, e in out if isinstance(e, entries.SegmentBoundary) and e.kind == "audio"]
    assert [(b.audio_frames, b.chunks) for b in bounds] == [(3, len(seg0)), (1, 1)]


@pytest.mark.parametrize("chunks", [ChunkPolicy(), ChunkPolicy(first=1, growth=2.0, max_chunk=50)])
def test_only_the_turns_first_decode_job_is_urgent(chunks):
    """Its first audio: the decoder and vocoder take it before the later chunks of running
    turns. Everything after it has the audio before it playing ahead of it."""
    s = seq()
    text(s, A, AG_START)
    frames(s, FRAME, F2, F3, EOA)
    text(s, X, EOS)
    frames(s, FRAME, EOA)
    targets = [(t, e.segment, e.chunk) for t, e in publish(s, chunks) if isinstance(e, entries.DecodeJob)]
    assert len(targets) >= 2
    assert targets[0] == (entries.urgent_lane(entries.DECODER_JOBS), 0, 0)
    assert {t for t, *_ in targets[1:]} == {entries.DECODER_JOBS}


def test_lanes():
    d = entries.DECODER_JOBS
    assert entries.lanes(d) == (d + ":urgent", d) and entries.urgent_lane(d + ":urgent") == d + ":urgent"
    assert entries.next_lane(d + ":urgent", entries.VOCODER_JOBS) == entries.VOCODER_JOBS + ":urgent"
    assert entries.next_lane(d, entries.VOCODER_JOBS) == entries.VOCODER_JOBS


def test_end_entry_codes_are_checked():
    end = entries.TurnEnd.with_tokens("t", "eos", [A, PAD], [FRAME])
    fields = end.encode()
    fields[b"codes_shape"] = b"2,3"
    with pytest.raises(entries.BusError, match=r"end.codes: 12 bytes do not hold shape \(2, 3\)"):
        entries.decode_entry(fields)
    with pytest.raises(entries.BusError, match=r"end.codes must be \(frames, codebooks\)"):
        entries.decode_entry({**fields, b"codes_shape": b"3"})
    empty = entries.decode_entry(entries.TurnEnd.with_tokens("t", "eos", [A], ()).encode())
    assert empty.codes.shape == (0, 0) and empty.codes == entries.TurnEnd("t", "eos").codes
    assert empty.codes.numpy().reshape(-1, 3).shape == (0, 3)
