"""Continuing a reply from what was published of it (continuation.py), without a model: for every
point at which a replica could die (after each recorded item), the decisions rebuilt from the
record and replayed on the original prompt give the sequence the dead replica had, and deciding
on as it would have gives the same history and publishes exactly the entries it had not."""
from __future__ import annotations

import json

import pytest

from services.common import entries
from services.llm.continuation import continuation_seed, decisions
from services.llm.protocol import EngineError, Phase, Request, Sequence
from services.llm.publisher import ChunkPolicy, TurnPublisher
from tests.llm.test_scheduler import A, AG_START, BANG, C, EOA, EOS, K0, PAD, SP_B, X, rules

PROMPT, PROMPT_PADS = (A, PAD, A), [(9, 9, 9)]


def frames(n: int, first: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    return [("audio", (1 + (first + i) % 7, i % 3, 2)) for i in range(n)]


def t(*ids) -> list[tuple[str, int]]:
    return [("text", i) for i in ids]


END = [("audio", EOA)]
SCRIPTS = {
    # stops on <audiogen_start> and on a shown "!", an audio round of no frame, EOS then the final audio
    "spoken": (t(A, SP_B, AG_START) + frames(7) + END + t(A, BANG) + END + t(X, EOS) + frames(3, 5) + END, {}),
    # a segment cut at its frame cap: its last pad is overwritten (§11.2 e)
    "capped": (t(AG_START) + frames(3) + t(A, EOS) + frames(2, 3) + END, {"max_audio_frames": 3}),
    "text_only": (t(A, SP_B, EOS), {"mode": "text"}),
    "length": (t(A, AG_START) + frames(9), {"max_new_tokens": 8}),
}
CHUNKS = {"faithful": ChunkPolicy(), "low_latency": ChunkPolicy(2, 2.0, 4)}


def run(script, replay=(), **kw) -> tuple[Sequence, int]:
    """The sequence after `script` (after replaying `replay` first); how many decisions it took."""
    s = Sequence(Request(list(PROMPT), replay=list(replay), **kw), rules(), "t", 0, 10_000, list(PROMPT_PADS))
    if s.phase != Phase.DONE:
        assert s.advance(s.pending)              # the prefill (the prompt, and the reply replayed)
    n = 0
    for kind, x in script:
        if s.phase == Phase.DONE:
            break
        assert kind == ("audio" if s.phase == Phase.AUDIO else "text"), (kind, s.phase)
        s.on_text(x) if kind == "text" else s.on_frame(x)
        n += 1
        if s.phase != Phase.DONE:
            s.advance(s.pending)
    assert s.phase == Phase.DONE
    return s, n


def publish(s, chunks, skip=0) -> tuple[list[bytes], list[bytes]]:
    """(the recorded items, every entry published, encoded) of `s`'s events."""
    items, out = [], []

    def recorded(target, e, item):
        items.append(item)
        out.append(e.encode())

    pub = TurnPublisher("t", "sess", lambda target, e: out.append(e.encode()), chunks=chunks, seed=1,
                        recorded=recorded, skip=skip)
    for ev in s.events:
        pub.feed(ev)
    return items, out


@pytest.mark.parametrize("chunks", sorted(CHUNKS))
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_continuation_from_any_point_goes_on_exactly_after_what_was_published(name, chunks):
    script, kw = SCRIPTS[name]
    s, used = run(script, **kw)
    items, out = publish(s, CHUNKS[chunks])
    assert items, "nothing recorded"
    for cut in range(len(items) + 1):
        so_far = decisions([json.loads(i) for i in items[:cut]], K0, C)
        assert so_far.items == cut
        # what was published comes from a prefix of the decisions made (the rest is made anew)
        assert so_far.decisions == script[:len(so_far.decisions)], cut
        s2, _ = run(script[len(so_far.decisions):used], replay=so_far.decisions, **kw)
        assert s2.done.history == s.done.history, cut
        assert s2.done.reply_codes == s.done.reply_codes, cut
        items2, out2 = publish(s2, CHUNKS[chunks], skip=so_far.items)
        assert items2 == items[cut:], cut          # each item once: none again, none missing
        assert out2 == out[len(out) - len(out2):] and len(out2) == len(out) - cut, cut


def test_the_replayed_prompt_is_the_reply_in_the_protocol_layout():
    # text " b" closed by <audiogen_start>, two frames, the end-of-audio pad overwritten
    so_far = t(A, SP_B, AG_START) + frames(2) + END + t(A)
    s = Sequence(Request(list(PROMPT), replay=so_far), rules(), "t", 0, 10_000, list(PROMPT_PADS))
    assert s.tokens == [*PROMPT, A, SP_B, AG_START, PAD, PAD, rules().audiogen_end, A]
    assert s.pad_rows == PROMPT_PADS + [f for _, f in frames(2)]
    assert s.phase == Phase.TEXT and s.n_text == 1 and s.n_audio == 1 and s.kv_len == 0
    assert s.seg_ids == [A] and s.seg_shown == "a"


def test_a_record_that_does_not_fit_the_protocol_is_refused():
    with pytest.raises(EngineError, match="audio decision"):
        Sequence(Request(list(PROMPT), replay=frames(1)), rules(), "t", 0, 10_000, list(PROMPT_PADS))
    with pytest.raises(ValueError, match="without a text segment"):
        decisions([{"k": "a", "s": 0, "c": 0, "f": [[1, 2, 3]]}], K0, C)


def test_each_continuation_samples_with_its_own_seed_derived_from_the_turn():
    assert continuation_seed("turn", None, 1) == continuation_seed("turn", None, 1)
    seeds = {continuation_seed("turn", None, 1), continuation_seed("turn", None, 2),
             continuation_seed("other", None, 1), continuation_seed("turn", 7, 1)}
    assert len(seeds) == 4 and all(0 <= x < 2 ** 48 for x in seeds)


def test_decode_jobs_and_their_record_carry_the_same_frames():
    s, _ = run(SCRIPTS["spoken"][0])
    items, out = publish(s, CHUNKS["low_latency"])
    jobs = [entries.decode_entry(e) for e in out if entries.decode_entry(e).__class__ is entries.DecodeJob]
    recs = [json.loads(i) for i in items if json.loads(i)["k"] == "a"]
    assert len(jobs) == len(recs) > 1
    for j, r in zip(jobs, recs):
        assert (j.segment, j.chunk) == (r["s"], r["c"])
        assert j.codes.numpy()[j.context_frames:].tolist() == r["f"]
