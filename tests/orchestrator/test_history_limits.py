"""The history limits of orchestrator/conversation.py: a session keeps its last turns, a faithful
one its audio within bounds, and a long conversation keeps working at the model's context limit
by dropping its oldest turns at turn boundaries (without them, the engine refuses the prompt)."""
from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import torch

from orchestrator.conversation import Reply, SessionSettingsRecord, UserTurn
from services.common.text_tokenizer import DEFAULT_SYSTEM_PROMPT
from services.llm.prompts import Message
from tests.llm.test_scheduler import AG_END, AG_START, PAD
from tests.orchestrator.test_conversation import NB, PROMPTS, USR, codes, conv, pads, record, session

SYSTEM = [PROMPTS.tokens.system] + PROMPTS.encode(DEFAULT_SYSTEM_PROMPT)


def run_turn(c, sess, k: int, *, frames: int = 2, reply: str = "ok"):
    """Turn k: the user says "turn k" (text), the model answers `reply` and `frames` of audio
    (as the LLM stage's end entry gives them). Returns the turn's prompt."""
    user = UserTurn(text=f"turn {k}")
    p = c.history_prompt(sess, user)
    assert pads(p.ids) == (0 if p.audio_codes is None else len(p.audio_codes))
    rows = np.array([(k % 7, 1, 2)] * frames, np.int32)
    history = p.ids + PROMPTS.encode(reply) + [AG_START] + [PAD] * frames + [AG_END]
    record(c, sess, c.turn(f"t{k}", sess, user, p), Reply(text=reply, history=history, reply_codes=rows))
    return p


def kept_turns(ids: list[int]) -> list[int]:
    """The k of every "turn k" in a prompt (the user texts it holds), in order."""
    text = "".join(chr(t - 1000) if t >= 1000 else "|" for t in ids)
    return [int(part.split()[1]) for part in text.split("|") if part.startswith("turn ")]


def test_first_kept_rules():
    lim = conv(context_tokens=100, reply_reserve_tokens=10, context_trim_to=0.5, max_history_turns=4).limits
    assert lim.first_kept([10] * 3, 20) == 0                        # fits: keep all
    assert lim.first_kept([10] * 6, 20) == 3                        # at most 3 earlier turns
    assert lim.first_kept([30, 30, 30], 20) == 2                    # 110 > 90: trimmed to <= 50
    assert lim.first_kept([10, 10, 10], 20, audio=[500, 500, 300]) == 1   # 1300 s > 1200 s of audio
    with pytest.raises(ValueError, match=r"prompt has 91 tokens .* context of 100 tokens, less 10 .*"
                                         r"limits.reply_reserve_tokens.* at most 90"):
        lim.first_kept([5], 91)


def test_a_long_session_drops_its_oldest_turns_at_the_context_limit():
    context = 160
    c = conv(context_tokens=context, reply_reserve_tokens=20, context_trim_to=0.5)
    sess = session()
    trims, kept = 0, None
    for k in range(24):
        p = run_turn(c, sess, k)
        # the engine takes it: shorter than the context with the reply's reserve free
        assert len(p.ids) <= context - 20, f"turn {k}: a prompt of {len(p.ids)} tokens"
        assert p.ids[:len(SYSTEM)] == SYSTEM                         # the system prompt stays
        assert [p.ids[s] for s in p.turn_starts] == [USR] * len(p.turn_starts)
        now = kept_turns(p.ids)
        assert now[-1] == k and now == list(range(now[0], k + 1))    # the newest turns, in order
        if kept is not None and now[0] > kept[0]:
            trims += 1
            assert len(p.ids) <= context * 0.5                       # trimmed well below the limit
        kept = now
        # the stored history holds exactly the codes of its pads
        assert pads(sess.tokens) == len(sess.codes)
    assert trims >= 2 and kept[0] > 0


def test_trimming_keeps_the_code_rows_of_the_turns_kept():
    c = conv(context_tokens=120, reply_reserve_tokens=10, context_trim_to=0.5)
    sess = session()
    user_rows = []
    for k in range(16):
        user = UserTurn(codes=codes(*[(k, k, k)] * 3))
        user_rows.append([k, k, k])
        p = c.history_prompt(sess, user)
        audio = p.audio_codes.tolist()
        # every kept turn brings its user rows (k, k, k) x 3 and its reply rows (k + 50, 0, 0) x 2
        ks = sorted({r[0] for r in audio if r[0] < 50})
        assert ks == list(range(ks[0], k + 1))
        assert audio == [r for j in ks for r in [[j] * 3] * 3 + ([[j + 50, 0, 0]] * 2 if j < k else [])]
        reply = np.array([(k + 50, 0, 0)] * 2, np.int32)
        history = p.ids + [AG_START, PAD, PAD, AG_END]
        record(c, sess, c.turn(f"t{k}", sess, user, p), Reply(history=history, reply_codes=reply))
    assert ks[0] > 0


def test_a_session_keeps_its_last_turns():
    c = conv(max_history_turns=3)
    sess = session()
    for k in range(6):
        p = run_turn(c, sess, k)
    assert kept_turns(p.ids) == [3, 4, 5]                          # two earlier turns + the new one
    assert len(sess.history) == 6                                  # the person's history: 3 turns
    assert sess.history[0]["text"] == "turn 3" and sess.history[1]["text"] == "ok"


def test_sessions_recorded_without_turn_offsets_are_trimmed_at_user_turns():
    c = conv(context_tokens=160, reply_reserve_tokens=20)
    sess = session()
    for k in range(4):
        run_turn(c, sess, k)
    sess.turn_starts = []                                          # as sessions stored before them
    p = c.history_prompt(sess, UserTurn(text="turn 4"))
    assert kept_turns(p.ids)[-1] == 4 and len(p.ids) <= 140


def test_a_turn_too_large_alone_and_a_system_prompt_too_long_are_refused():
    c = conv(context_tokens=100, reply_reserve_tokens=20, max_system_prompt_chars=50)
    with pytest.raises(ValueError, match=r"limits.reply_reserve_tokens"):
        c.history_prompt(session(), UserTurn(text="x" * 80))
    with pytest.raises(ValueError, match=r"system_prompt of 51 characters is over the limit of 50 "
                                         r"\(limits.max_system_prompt_chars\)"):
        c.check_settings(SessionSettingsRecord(system_prompt="s" * 51))
    with pytest.raises(ValueError, match=r"system_prompt of 81 tokens leaves no room"):
        conv(context_tokens=100, reply_reserve_tokens=20).check_settings(SessionSettingsRecord(system_prompt="s" * 80))
    c.check_settings(SessionSettingsRecord(system_prompt="Be brief."))


def faithful_turn(k: int, seconds: float, frames: int = 2) -> dict:
    pcm = np.full(480 * frames, k, "<i2").tobytes()
    return {"user": {"text": f"turn {k}"}, "audio_seconds": seconds,
            "assistant": [{"text": "ok", "pcm16": base64.b64encode(pcm).decode()}]}


def test_faithful_history_limits_turns_audio_and_context():
    reencoded = []

    async def reencode(data: bytes) -> torch.Tensor:
        reencoded.append(data)
        return codes(*[(1, 1, 1)] * (len(data) // 960))

    def prompt(c, past, text="next"):
        return asyncio.run(c.faithful_prompt(session(faithful_history=True), past, UserTurn(text=text), reencode))

    # turns: at most 2 earlier ones; the dropped ones are never re-encoded
    past = [faithful_turn(k, 1.0) for k in range(5)]
    p, changed = prompt(conv(max_history_turns=3), past)
    assert changed and kept_turns(p.ids) == [3, 4] and len(reencoded) == 2 and len(past) == 2
    assert all("pcm16" not in t["assistant"][0] for t in past)      # codes kept, waveforms dropped
    # audio: the newest turns within max_history_audio_seconds
    past = [faithful_turn(k, 500.0) for k in range(4)]
    p, _ = prompt(conv(), past)
    assert kept_turns(p.ids) == [2, 3]
    # context: trimmed at turn boundaries, the messages exactly the reference's
    c = conv(context_tokens=150, reply_reserve_tokens=20, context_trim_to=0.5)
    past = [faithful_turn(k, 1.0, frames=6) for k in range(10)]
    p, _ = prompt(c, past)
    assert len(p.ids) <= 75 and kept_turns(p.ids)[-1] == 9 and len(past) == len(kept_turns(p.ids))
    want = PROMPTS.chat([Message("system", DEFAULT_SYSTEM_PROMPT)]
                        + [m for t in past for m in c._faithful_messages(t)] + [Message("user", "next")])
    assert p.ids == want.ids and torch.equal(p.audio_codes, want.audio_codes)
