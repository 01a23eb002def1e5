"""What a turn means (orchestrator/conversation.py), without Ray, Redis or gRPC: input checks,
sampling validation, prompts, the LLM request, and the history rules (normal, faithful,
interrupted, failed), including the hand-over from the LLM stage's end-of-turn entry."""
from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import torch

from orchestrator.conversation import (SAMPLING_LIMITS, Conversation, HistoryLimits, Reply, UserTurn, codes_to_b64,
                                       llm_request, sampling_overrides)
from orchestrator.sessions import Session, SessionSettingsRecord
from services.common import entries
from services.common.model_config import AudioTokenIds
from services.common.settings import LimitsSettings
from services.common.text_tokenizer import DEFAULT_SYSTEM_PROMPT
from services.llm.prompts import Audio, GeneratedAudio, Message, Prompt, PromptBuilder, ProtocolTokens
from services.llm.protocol import Sequence
from services.llm.publisher import TurnPublisher
from tests.llm.test_scheduler import A, AG_END, AG_START, EOA, EOS, FRAME, PAD, X, frames, rules, text

# ids shared with the protocol tests' vocabulary (PAD, AG_START, AG_END), the rest above it
AUDIO = AudioTokenIds(audio_start=20, audio_end=21, audio_pad=PAD, audio_delim=22, audiotext_start=23,
                      audiotext_end=24, audiotext_pad=25, audiogen_start=AG_START, audiogen_end=AG_END)
SYS, USR, ASST = 30, 31, 32
NB = 3                                              # codebooks, as in the protocol tests


class CharTokenizer:
    """One id per character: enough to tell prompts apart."""

    def encode(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = True) -> list[int]:
        return [1000 + ord(c) for c in text]


PROMPTS = PromptBuilder(CharTokenizer(), ProtocolTokens(AUDIO, EOS, SYS, USR, ASST, "<ag>", "<eos>"), NB)


def conv(max_text_chars: int = 100, context_tokens: int = 100_000, **limits) -> Conversation:
    """limits: LimitsSettings keys (max_history_turns, reply_reserve_tokens, ...)."""
    history = HistoryLimits.from_settings(LimitsSettings(**limits), context_tokens)
    return Conversation(PROMPTS, max_text_chars=max_text_chars, history=history)


def session(**settings) -> Session:
    return Session("s1", SessionSettingsRecord(**settings), created_ms=0, expires_ms=0, owner="alice",
                   codes=np.zeros((0, NB), np.int32))


def codes(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def record(c: Conversation, sess: Session, turn, reply) -> None:
    """What SessionStore.end_turn does with a TurnRecord, in memory."""
    rec = c.finish(turn, reply)
    sess.history.extend(rec.entries)
    del sess.history[:-rec.keep_entries]
    if rec.tokens is not None:
        sess.tokens, sess.codes, sess.turn_starts = rec.tokens, rec.codes, list(rec.turn_starts or [])


def pads(ids) -> int:
    return sum(1 for t in ids if t == PAD)


# ---------------------------------------------------------------- input and sampling

def test_turn_input_checks():
    c = conv(max_text_chars=5)
    with pytest.raises(ValueError, match="no input: set audio .* or text"):
        c.check_input(None)
    with pytest.raises(ValueError, match="text of 6 characters is over the limit of 5"):
        c.check_input("text", "x" * 6)
    c.check_input("text", "hello")
    c.check_input("audio")
    for empty in ("", " \n\t"):     # found by tests/orchestrator/test_hostile.py: it was a turn
        with pytest.raises(ValueError, match="the turn's text is empty"):
            c.check_input("text", empty)
    with pytest.raises(ValueError, match="text is empty"):
        c.synthesize_request("t", "  ", {})
    with pytest.raises(ValueError, match="over the limit of 5"):
        c.synthesize_request("t", "x" * 6, {})


@pytest.mark.parametrize("name,value", [("text_temperature", 5.0), ("audio_temperature", 0.01), ("text_top_k", 0),
                                        ("audio_top_k", 1001), ("text_top_p", 1.5), ("audio_top_p", 0.0)])
def test_sampling_out_of_range_names_the_field_and_its_range(name, value):
    lo, hi = SAMPLING_LIMITS[name.split("_", 1)[1]]
    with pytest.raises(ValueError) as e:
        sampling_overrides({name: value})
    assert str(e.value) == f"sampling.{name}={value:g} is out of range [{lo:g}, {hi:g}]"


def test_sampling_within_limits_is_kept_as_set():
    s = {"text_temperature": 0.05, "audio_top_k": 1000, "text_top_p": 1.0, "seed": 7, "greedy": True}
    assert sampling_overrides(s) == s


# ---------------------------------------------------------------- the LLM request

def test_one_request_type_for_turns_and_one_shots():
    p = Prompt([1, PAD, 2], codes((5, 1, 2)))
    r = llm_request("t1", "spoken", p, session_id="s1",
                    sampling={"seed": 7, "greedy": False, "text_temperature": 0.5})
    assert (r.request_id, r.session_id, r.mode, r.prompt_ids) == ("t1", "s1", "spoken", [1, PAD, 2])
    assert (r.greedy, r.seed, r.sampling) == (False, 7, {"text_temperature": 0.5})
    assert r.audio_codes.dtype == np.int64 and r.audio_codes.tolist() == [[5, 1, 2]]
    r = llm_request("t2", "text", Prompt([1], codes().reshape(0, NB)))
    assert r.audio_codes is None and r.sampling is None and r.seed is None and not r.greedy
    c = conv()
    asr = c.transcribe_request("t3", codes((5, 1, 2), (6, 2, 3)))
    assert asr.mode == "asr" and asr.greedy and pads(asr.prompt_ids) == 2 and asr.session_id is None
    tts = c.synthesize_request("t4", "你好，欢迎收听今天的节目。我们马上开始！", {})
    assert tts.mode == "tts" and tts.greedy and tts.prompt_ids[-1] == AG_START and len(tts.tts_chunks) == 1
    assert not c.synthesize_request("t5", "hello", {"greedy": False, "audio_top_k": 3}).greedy
    turn = c.turn("t6", session(spoken=False, sampling={"greedy": True}), UserTurn(text="hi"), p)
    assert turn.request.mode == "text" and turn.request.greedy
    assert turn.request.session_id == "alice:s1"    # the LLM's session: unique across identities


# ---------------------------------------------------------------- history rules

def test_first_turn_starts_with_the_system_prompt():
    c = conv()
    p = c.history_prompt(session(), UserTurn(codes=codes((5, 1, 2))))
    assert p.ids == PROMPTS.chat([Message("system", DEFAULT_SYSTEM_PROMPT), Message("user", [Audio(codes((5, 1, 2)))])]).ids
    p = c.history_prompt(session(system_prompt="Be brief.", spoken=False), UserTurn(text="hi"))
    assert p.ids == PROMPTS.chat([Message("system", "Be brief."), Message("user", "hi")], spoken=False).ids
    assert p.audio_codes is None


def test_normal_turn_keeps_what_the_llm_says_and_the_next_prompt_extends_it():
    c = conv()
    sess = session()
    user = UserTurn(codes=codes((9, 9, 9)), audio_seconds=0.08)
    p = c.history_prompt(sess, user)
    turn = c.turn("t1", sess, user, p)
    history = p.ids + [A, AG_START, PAD, PAD, AG_END]     # closed by the LLM stage, not here
    record(c, sess, turn, Reply(text="a", audio_seconds=0.16, history=history,
                                reply_codes=np.array([(5, 1, 2), (6, 2, 3)], np.int32)))
    assert sess.tokens == history and sess.codes.tolist() == [[9, 9, 9], [5, 1, 2], [6, 2, 3]]
    assert sess.codes.dtype == np.int32
    assert sess.history == [{"role": "user", "text": "", "audio_seconds": 0.08},
                            {"role": "assistant", "text": "a", "audio_seconds": 0.16, "interrupted": False,
                             "reply_tokens": 5, "timeline": []}]      # for truncate (no segments given)
    nxt = c.history_prompt(sess, UserTurn(text="more"))
    assert nxt.ids == history + PROMPTS.chat([Message("user", "more")]).ids
    assert nxt.audio_codes.tolist() == sess.codes.tolist()


def test_a_history_whose_pads_and_rows_disagree_is_refused_not_patched():
    c = conv()
    sess = session()
    sess.tokens = [1, AG_START, PAD, PAD]                 # an unclosed end-of-audio pad
    sess.codes = np.array([(5, 1, 2)], np.int32)
    with pytest.raises(RuntimeError, match="session s1: history has 2 audio pads but 1 code rows"):
        c.history_prompt(sess, UserTurn(text="hi"))


def test_interrupted_turn_keeps_the_prompt_and_the_tokens_of_the_text_sent():
    c = conv()
    sess = session()
    user = UserTurn(text="hi")
    p = c.history_prompt(sess, user)
    # the model's own ids, which need not be what re-tokenizing the text would give
    reply = Reply(text="Hey", interrupted=True, text_tokens=[A, X], history=p.ids + [A, X, AG_START, PAD],
                  reply_codes=np.array([(5, 1, 2)], np.int32))
    record(c, sess, c.turn("t1", sess, user, p), reply)
    assert sess.tokens == p.ids + [A, X] and sess.codes.shape == (0, NB)
    assert sess.history[-1] == {"role": "assistant", "text": "Hey", "audio_seconds": 0.0, "interrupted": True,
                                "reply_tokens": 2, "timeline": []}
    spoken = UserTurn(codes=codes((9, 9, 9)))
    p2 = c.history_prompt(sess, spoken)
    record(c, sess, c.turn("t2", sess, spoken, p2), Reply(interrupted=True, text_tokens=[X], error="lost"))
    assert sess.tokens == p2.ids + [X] and sess.codes.tolist() == [[9, 9, 9]]


@pytest.mark.parametrize("reply", [
    # the LLM finished, a later stage failed: the caller did not get that reply
    Reply(text="x", error="decoder: lost segment 0", history=[1, 2, 7], reply_codes=np.zeros((0, NB), np.int32)),
    Reply(text="x"),                                  # no end entry from the LLM
    None,                                             # the orchestrator failed
])
def test_failed_turn_keeps_the_model_history_before_it(reply):
    c = conv()
    sess = session()
    sess.tokens, sess.codes = [1, 2], np.zeros((0, NB), np.int32)
    user = UserTurn(text="hi")
    rec = c.finish(c.turn("t1", sess, user, c.history_prompt(sess, user)), reply)
    assert rec.tokens is None and rec.codes is None and rec.faithful is None
    assert [e["role"] for e in rec.entries] == (["user"] if reply is None else ["user", "assistant"])


def test_faithful_turn_is_recorded_and_the_next_prompt_rebuilt_from_re_encoded_audio():
    c = conv()
    sess = session(faithful_history=True)
    user = UserTurn(codes=codes((9, 9, 9)))
    turn = c.turn("t1", sess, user, c.history_prompt(sess, user))
    pcm = np.arange(480, dtype="<i2").tobytes()
    reply = Reply(text="Hi there", segments=[("Hi", pcm), (" there", b"")], history=[1], reply_codes=None)
    rec = c.finish(turn, reply)
    assert rec.faithful == {"user": {"codes": codes_to_b64(codes((9, 9, 9)))}, "audio_seconds": 0.0,
                            "assistant": [{"text": "Hi", "pcm16": base64.b64encode(pcm).decode()},
                                          {"text": " there", "pcm16": ""}]}
    assert c.finish(turn, Reply(error="x", segments=[("Hi", pcm)])).faithful is None
    assert c.finish(c.turn("t", session(), user, turn.prompt), reply).faithful is None

    heard: list[bytes] = []

    async def reencode(data: bytes) -> torch.Tensor:
        heard.append(data)
        return codes((4, 4, 4), (3, 3, 3))

    past = [rec.faithful]
    p, changed = asyncio.run(c.faithful_prompt(sess, past, UserTurn(text="next"), reencode))
    assert changed and heard == [pcm] and "codes" in past[0]["assistant"][0] and "codes" not in past[0]["assistant"][1]
    assert "pcm16" not in past[0]["assistant"][0]          # re-encoded: its waveform is not kept
    expected = PROMPTS.chat([Message("system", DEFAULT_SYSTEM_PROMPT), Message("user", [Audio(codes((9, 9, 9)))]),
                             Message("assistant", ["Hi", GeneratedAudio(codes((4, 4, 4), (3, 3, 3))), " there"]),
                             Message("user", "next")])
    assert p.ids == expected.ids and torch.equal(p.audio_codes, expected.audio_codes)
    # re-encoding is deterministic: the kept codes serve the following turns
    p2, changed = asyncio.run(c.faithful_prompt(sess, past, UserTurn(text="next"), reencode))
    assert not changed and heard == [pcm] and p2.ids == p.ids
    text_turn = c.faithful_record(UserTurn(text="typed"), Reply())
    assert text_turn == {"user": {"text": "typed"}, "audio_seconds": 0.0, "assistant": []}


# ---------------------------------------------------------------- from the LLM stage to the next prompt

def test_the_llm_stage_end_entry_is_the_next_prompt_prefix():
    """Turn 1 through the protocol and the publisher as the LLM stage runs it; the next prompt
    extends the model's own sequence, its final end-of-audio pad closed, with one code row
    per pad, so the engine takes it and can reuse the KV cache of turn 1."""
    c = conv()
    sess = session()
    user = UserTurn(codes=codes((9, 9, 9)))
    p = c.history_prompt(sess, user)
    turn = c.turn("t1", sess, user, p)
    s = Sequence(turn.request, rules(), "t1", 0, 10_000, [tuple(r) for r in turn.request.audio_codes.tolist()])
    assert s.advance(s.pending)
    text(s, A, AG_START)
    frames(s, FRAME, (6, 2, 3), EOA)
    text(s, X, EOS)
    frames(s, (7, 3, 4), EOA)
    out = []
    pub = TurnPublisher("t1", "s1", lambda target, e: out.append(e))
    for ev in s.events:
        pub.feed(ev)
    end = entries.decode_entry(next(e for e in out if isinstance(e, entries.TurnEnd)).encode())
    delivered = [t for e in out if isinstance(e, entries.TextDelta) for t in e.tokens.numpy().tolist()]
    record(c, sess, turn, Reply(text="ax", history=end.tokens.numpy().tolist(), reply_codes=end.codes.numpy(),
                                text_tokens=delivered))
    assert sess.tokens == list(s.done.final_sequence[:-1]) + [AG_END]
    assert sess.codes.tolist() == [[9, 9, 9], list(FRAME), [6, 2, 3], [7, 3, 4]]
    nxt = c.history_prompt(sess, UserTurn(text="more"))
    assert pads(nxt.ids) == len(nxt.audio_codes)
    assert nxt.ids[:len(s.tokens) - 1] == s.tokens[:s.kv_len]            # everything turn 1 cached


# ---------------------------------------------------------------- truncate (Realtime API)

def spoken_reply_session(c: Conversation, interrupted: bool = False):
    """A session after one spoken reply: text "ab" (2 tokens), 2 frames (0.16 s) of audio, text
    "c" (1 token), 2 more frames. Interrupted: the history holds the text tokens only."""
    sess = session()
    user = UserTurn(text="hi")
    p = c.history_prompt(sess, user)
    reply_ids = [A, X, AG_START, PAD, PAD, AG_END, A, AG_START, PAD, PAD, AG_END]
    pcm = b"\0\0" * 3840                                        # 0.16 s at 24 kHz
    reply = Reply(text="abc", audio_seconds=0.32, interrupted=interrupted, text_tokens=[A, X, A],
                  history=p.ids + reply_ids, reply_codes=np.arange(4 * NB, dtype=np.int32).reshape(4, NB),
                  segments=[("ab", b""), ("", pcm), ("c", b""), ("", pcm)], segment_tokens=[2, 0, 1, 0],
                  segment_seconds=[0.0, 0.16, 0.0, 0.16])
    record(c, sess, c.turn("t1", sess, user, p), reply)
    return sess, p


@pytest.mark.parametrize("end_ms, reply, text, frames", [
    (0, [], "", 0),                                               # nothing heard
    (100, [A, X, AG_START, PAD, AG_END], "ab", 1),                # into the first audio: cut and closed
    (200, [A, X, AG_START, PAD, PAD, AG_END, A], "abc", 2),       # "c" heard, its audio not begun
    (320, [A, X, AG_START, PAD, PAD, AG_END, A, AG_START, PAD, PAD, AG_END], "abc", 4),   # all
])
def test_truncate_keeps_what_was_heard(end_ms, reply, text, frames):
    c = conv()
    sess, p = spoken_reply_session(c)
    rec = c.truncate(sess, end_ms)
    assert rec.tokens == p.ids + reply
    assert rec.codes.tolist() == np.arange(4 * NB).reshape(4, NB)[:frames].tolist()
    last = rec.entries[-1]
    assert (last["text"], last["truncated"]) == (text, True)
    assert abs(last["audio_seconds"] - min(end_ms, 320) / 1000) < 1e-6
    assert rec.entries[:-1] == sess.history[:-1]
    # the next prompt extends the truncated history
    sess.tokens, sess.codes, sess.history = rec.tokens, rec.codes, rec.entries
    assert c.history_prompt(sess, UserTurn(text="more")).ids[:len(rec.tokens)] == rec.tokens


def test_truncate_an_interrupted_reply_keeps_the_heard_text():
    c = conv()
    sess, p = spoken_reply_session(c, interrupted=True)
    assert sess.tokens == p.ids + [A, X, A]
    rec = c.truncate(sess, 100)
    assert rec.tokens == p.ids + [A, X] and rec.entries[-1]["text"] == "ab"


def test_truncate_refuses_what_it_cannot_cut():
    c = conv()
    sess, _ = spoken_reply_session(c)
    with pytest.raises(ValueError, match="past the reply's audio of 320 ms"):
        c.truncate(sess, 400)
    with pytest.raises(ValueError, match="negative"):
        c.truncate(sess, -1)
    with pytest.raises(ValueError, match="nothing to truncate"):
        c.truncate(session(), 10)
