"""The protocol state machine and the scheduler, without a model (§11.2, §11.3, §11.6,
corrections 11, 12, 14)."""
from __future__ import annotations

import pytest

from services.llm.kv_slots import SessionTable, common_prefix

from services.llm.protocol import (AudioFrame, EngineError, Phase, ProtocolRules, ProtocolConfig, Request,

                                   SegmentEnd, SegmentStart, Sequence, TextToken, UnknownSessionError)

from services.llm.scheduler import Scheduler
from services.llm.stop import StopStrings

# a tiny vocabulary: id -> string
STRINGS = ["<|endoftext|>", "<audiogen_start_baichuan>", "<audiogen_end_baichuan>", "<audio_pad_baichuan>",
           "a", " b", ".", "!", "c,d", "x"]
EOS, AG_START, AG_END, PAD, A, SP_B, DOT, BANG, COMMA_IN, X = range(10)
K0 = 16               # codebook 0's end-of-audio class
C = 3                 # codebooks
FRAME = (5, 1, 2)
EOA = (K0, 0, 0)


class Tables:
    def stops(self, s):
        return StopStrings(s, STRINGS, "text")


def rules(**cfg):
    pc = ProtocolConfig.reference(STRINGS[AG_START], STRINGS[EOS])
    if cfg:
        pc = ProtocolConfig(**{**pc.__dict__, **cfg})
    return ProtocolRules(eos=EOS, audio_pad=PAD, audiogen_start=AG_START, audiogen_end=AG_END, eoa=K0, num_codebooks=C,
                    strip=(STRINGS[EOS], STRINGS[AG_START], STRINGS[AG_END]),
                    config=pc, stops=Tables(), decode=lambda ids: "".join(STRINGS[i] for i in ids))


def seq(prompt=(A, A, A), mode="spoken", max_len=10_000, pads=(), p=None, **kw):
    s = Sequence(Request(list(prompt), mode=mode, **kw), p or rules(), "r", 0, max_len, list(pads))
    assert s.advance(s.pending)                  # prefill in one go: a decision is due
    return s


def text(s, *ids):
    for t in ids:
        assert s.phase in (Phase.FIRST_TEXT, Phase.TEXT) and s.pending == 0
        s.on_text(t)
        if s.phase != Phase.DONE:
            s.advance(s.pending)


def frames(s, *codes):
    for c in codes:
        assert s.phase == Phase.AUDIO and s.pending == 0
        s.on_frame(c)
        if s.phase != Phase.DONE:
            s.advance(s.pending)


def ends(s, kind):
    return [e for e in s.events if isinstance(e, SegmentEnd) and e.kind == kind]


def test_spoken_turn():
    s = seq()
    assert s.phase == Phase.FIRST_TEXT and s.spec.params.temperature == 0.8 and s.spec.max_new == 50
    text(s, A, SP_B, AG_START)                   # the model asks for audio: stop string, no-op write
    assert ends(s, "text")[0].reason == "stop:<audiogen_start_baichuan>"
    assert s.phase == Phase.AUDIO and s.tokens[-1] == AG_START and s.kv_len == len(s.tokens)   # forwarded
    assert s.spec.params.top_k == 5 and s.spec.max_new == 500
    frames(s, FRAME, FRAME, EOA)
    a = ends(s, "audio")[0]
    assert a.codes == (FRAME, FRAME) and a.end_codes == EOA and a.reason == "eos"
    # the end-of-audio pad was never forwarded; the host writes audiogen_end over it
    assert s.tokens[-4:] == [AG_START, PAD, PAD, AG_END]
    assert s.phase == Phase.TEXT and s.spec.params.temperature == 0.3 and s.spec.params.repetition_penalty == 1.05
    assert s.pad_rows == [FRAME, FRAME]          # the overwritten pad's codes are gone
    text(s, A, BANG)                             # '!' stops a later segment; the host writes audiogen_start
    assert ends(s, "text")[1].token_ids == (A, BANG) and s.tokens[-1] == AG_START
    frames(s, FRAME, EOA)
    text(s, X, EOS)                              # EOS after > 1 token: the final audio segment still runs
    assert s.phase == Phase.AUDIO and s.tokens[-1] == AG_START and s.final_audio
    frames(s, FRAME, EOA)
    d = s.done
    # correction 11: the reply ends with the final segment's pads, no EOS, no audiogen_end
    assert d.reason == "eos" and d.final_sequence[-3:] == (AG_START, PAD, PAD)
    assert d.kv_len == len(d.final_sequence) - 1
    writes = [(old, new) for _, old, new in d.host_writes]
    assert writes == [(AG_START, AG_START), (PAD, AG_END), (BANG, AG_START), (PAD, AG_END), (EOS, AG_START)]
    assert [e.segment for e in s.events if isinstance(e, SegmentStart) and e.kind == "audio"] == [0, 1, 2]


def test_later_stop_strings():
    s = seq()
    text(s, AG_START)
    frames(s, EOA)
    text(s, DOT, SP_B)                           # '.' + ' b': ". " across tokens (correction 10)
    assert ends(s, "text")[-1].reason == "stop:. " and s.tokens[-1] == AG_START
    frames(s, EOA)
    text(s, COMMA_IN)                            # a token containing ',' stops on ','
    assert ends(s, "text")[-1].reason == "stop:,"
    frames(s, EOA)
    text(s, DOT, A)                              # a bare '.' does not stop
    assert s.phase == Phase.TEXT


def test_first_segment_has_no_punctuation_stops():
    s = seq()
    text(s, BANG, DOT, SP_B, COMMA_IN)
    assert s.phase == Phase.FIRST_TEXT


def test_eos_alone_ends_the_reply():
    s = seq()
    text(s, AG_START)
    frames(s, FRAME, EOA)
    text(s, EOS)                                 # 1 new token: no final audio
    assert s.done.reason == "eos" and s.done.final_sequence[-1] == EOS
    s = seq()
    text(s, EOS)
    assert s.done.reason == "eos" and not ends(s, "audio")


def test_zero_frame_segment_emits_nothing():
    s = seq()
    text(s, A, AG_START)
    frames(s, EOA)                               # end of audio at frame 0 (correction 12)
    assert not any(isinstance(e, (AudioFrame, SegmentStart)) and getattr(e, "kind", "audio") == "audio"
                   for e in s.events if not isinstance(e, TextToken))
    assert not ends(s, "audio")
    assert s.phase == Phase.TEXT and s.tokens[-2:] == [AG_START, AG_END]


def test_text_only_reply_keeps_audiogen_start_as_text():
    s = seq(mode="text")
    assert s.spec.max_new == 1024 and s.spec.stops == (STRINGS[EOS],)
    text(s, A, AG_START, SP_B, BANG, EOS)        # correction 14: an ordinary token here
    assert s.done.reason == "eos" and s.done.final_sequence[-5:] == (A, AG_START, SP_B, BANG, EOS)
    assert not s.done.host_writes
    assert ends(s, "text")[0].text == "a b!"     # shown text: the two special strings removed


def test_max_new_tokens_then_audio():
    s = seq()
    text(s, *([A] * 49))
    assert s.phase == Phase.FIRST_TEXT
    text(s, X)                                   # the 50th token is overwritten by audiogen_start
    assert ends(s, "text")[0].reason == "max_new" and s.tokens[-1] == AG_START
    assert s.done is None and s.phase == Phase.AUDIO


def test_500_frame_cap():
    s = seq()
    text(s, AG_START)
    frames(s, *([FRAME] * 499))
    assert s.phase == Phase.AUDIO
    frames(s, FRAME)
    a = ends(s, "audio")[0]
    assert len(a.codes) == 500 and a.reason == "max_new" and a.end_codes == ()
    # the 500th frame's pad is not forwarded; it becomes audiogen_end
    assert s.phase == Phase.TEXT and s.tokens[-2:] == [PAD, AG_END] and len(s.pad_rows) == 499


def test_max_audio_frames_override():
    s = seq(max_audio_frames=3)
    text(s, AG_START)
    frames(s, FRAME, FRAME, FRAME)
    assert len(ends(s, "audio")[0].codes) == 3 and s.phase == Phase.TEXT


def test_tts_chunks():
    s = seq(prompt=(A, AG_START), mode="tts", tts_chunks=[[SP_B, AG_START], [X, X, AG_START]])
    assert s.phase == Phase.AUDIO and s.spec.params.greedy and s.spec.max_new == 700
    frames(s, FRAME, EOA)
    assert s.tokens == [A, AG_START, PAD, AG_END, SP_B, AG_START]
    frames(s, FRAME, FRAME, EOA)
    assert s.tokens[-4:] == [AG_END, X, X, AG_START]
    frames(s, FRAME, EOA)
    assert s.done.reason == "eos" and len(ends(s, "audio")) == 3
    assert s.done.final_sequence[-2:] == (PAD, PAD)
    assert sum(1 for e in s.effects if e[0] == "clear_codes") == 3    # a fresh code history per segment


def test_tts_chunk_prefill_is_chunked():
    s = Sequence(Request([A, AG_START], mode="tts", tts_chunks=[[X] * 5 + [AG_START]]), rules(), "r", 0, 100, [])
    assert s.advance(2)
    s.on_frame(EOA)
    assert s.pending == 7                         # audiogen_end + the chunk
    assert not s.advance(3) and s.advance(4)
    assert s.phase == Phase.AUDIO


def test_max_rounds():
    s = seq(p=rules(max_rounds=1))
    text(s, AG_START)
    frames(s, FRAME, EOA)
    text(s, A, BANG)
    assert s.done.reason == "max_rounds" and s.done.final_sequence[-1] == BANG   # left unvoiced, unwritten


def test_greedy_request():
    s = seq(greedy=True)
    assert s.spec.params.greedy and s.spec.params.repetition_penalty == 1.1
    text(s, AG_START)
    assert s.spec.params.greedy and s.spec.params.repetition_penalty == 1.3


def test_sampling_overrides_apply_per_phase_kind():
    s = seq(sampling={"text_temperature": 0.6, "audio_top_k": 3})
    first = s.spec.params
    assert (first.temperature, first.top_k, first.repetition_penalty) == (0.6, 20, 1.1)
    text(s, AG_START)
    audio = s.spec.params
    assert (audio.temperature, audio.top_k, audio.top_p, audio.repetition_penalty) == (0.5, 3, 0.85, 1.3)
    with pytest.raises(EngineError, match="temperature"):
        seq(sampling={"text_temperature": 0.0})
    with pytest.raises(EngineError, match="unknown"):
        seq(sampling={"temperature": 0.5})


def test_forced_schedule():
    s = seq(forced=[("text", 2), ("audio", 3), ("text", 1)])
    text(s, EOS, EOS)                            # EOS is ignored
    assert s.phase == Phase.AUDIO and s.tokens[-1] == AG_START
    frames(s, EOA, EOA, FRAME)                   # end-of-audio is ignored too
    assert len(ends(s, "audio")[0].codes) == 3 and s.phase == Phase.TEXT
    text(s, A)
    assert s.done.reason == "forced"


def test_context_limit_during_generation():
    prompt = (A, A, A)
    s = seq(prompt, max_len=len(prompt) + 2)
    text(s, A, A)                                # the prompt and 2 tokens fill the slot
    assert s.phase == Phase.FIRST_TEXT
    text(s, A)
    assert s.done.reason == "length" and ends(s, "text")[0].reason == "length"


def test_cancel_mid_segment():
    s = seq()
    text(s, AG_START)
    frames(s, FRAME)
    s.finish("cancelled")
    assert s.done.reason == "cancelled" and ends(s, "audio")[0].reason == "cancelled"


def test_effects_mirror_token_changes():
    s = seq()
    s.effects.clear()
    text(s, A, BANG)                             # no stop in the first segment
    text(s, AG_START)
    assert ("add", [A]) in s.effects and ("replace", AG_START, AG_START) in s.effects
    assert s.effects[-1] == ("clear_codes",)
    frames(s, FRAME)
    assert s.effects[-2:] == [("add", [PAD]), ("codes", FRAME)]


# ---------------------------------------------------------------------------- scheduler

def _waiting(n, sched, sessions=None, sid=None):
    s = Sequence(Request([A] * n, session_id=sid), rules(), f"r{n}", 0, 1000, [])
    sched.add(s)
    return s


def test_chunked_prefill_does_not_stall_decoding():
    table = SessionTable(4)
    sch = Scheduler(table, max_batch=4, prefill_budget=4)
    short = _waiting(2, sch)
    w = sch.plan()
    assert [(x.seq, x.n, x.decide) for x in w] == [(short, 2, True)]
    short.advance(2)
    short.on_text(A)                             # now decoding
    long_ = _waiting(10, sch)
    other = _waiting(3, sch)
    w = sch.plan()
    assert [(x.seq.id, x.n, x.decide) for x in w] == [("r2", 1, True), ("r10", 4, False)]
    for x in w:
        x.seq.advance(x.n)
    short.on_text(A)
    w = sch.plan()
    assert [(x.seq.id, x.n, x.decide) for x in w] == [("r2", 1, True), ("r10", 4, False)]
    for x in w:
        x.seq.advance(x.n)
    short.on_text(A)
    w = sch.plan()
    assert [(x.seq.id, x.n, x.decide) for x in w] == [("r2", 1, True), ("r10", 2, True), ("r3", 2, False)]
    assert {s.slot for s in (short, long_, other)} == {0, 1, 2}


def test_admission_waits_for_slots():
    table = SessionTable(1)
    sch = Scheduler(table, max_batch=4, prefill_budget=100)
    a, b = _waiting(3, sch), _waiting(4, sch)
    assert [x.seq for x in sch.plan()] == [a]
    a.finish("cancelled")
    assert sch.retire() == [a] and table.free == [0]
    assert [x.seq for x in sch.plan()] == [b]


def test_sessions_lru_eviction():
    t = SessionTable(2)
    s1, s2, s3 = t.open("s1"), t.open("s2"), t.open("s3")
    seqs = {}
    for sid in (s1, s2):
        t.reserve(sid)
        q = Sequence(Request([A, A], session_id=sid), rules(), sid, 0, 100, [])
        q.slot = t.acquire(sid)
        q.advance(2)
        t.release(q)
        seqs[sid] = q
    assert t.sessions[s1].cached == [A, A]
    t.reserve(s3)
    assert t.acquire(s3) is not None             # no free slot: s1 (least recently used) loses its KV
    assert t.sessions[s1].slot is None and t.sessions[s1].cached == [] and t.sessions[s2].slot is not None
    t.reserve(s2)                                # busy sessions are never evicted
    assert t.acquire(None) is None
    with pytest.raises(EngineError, match="already has a turn"):
        t.reserve(s2)
    with pytest.raises(UnknownSessionError, match="unknown session 'nope'"):
        t.reserve("nope")
    with pytest.raises(EngineError, match="turn in progress"):
        t.close(s2)
    assert t.evictions == 1


def test_common_prefix_compares_pad_codes():
    p = [A, PAD, PAD, X]
    assert common_prefix(p, [FRAME, FRAME], [A, PAD, PAD, A], [FRAME, FRAME], PAD) == 3
    assert common_prefix(p, [FRAME, EOA], [A, PAD, PAD, X], [FRAME, FRAME], PAD) == 2
    assert common_prefix(p, [FRAME, FRAME], [A], [], PAD) == 1


def test_reuse_keeps_the_last_prompt_token_to_run():
    s = Sequence(Request([A, PAD, X]), rules(), "r", 0, 100, [FRAME])
    s.reuse_prefix(3)
    assert s.kv_len == 2 and s.pads_fwd == 1 and s.pending == 1
    assert s.chunk(1) == ([X], [])
