"""What a conversation turn means, in plain Python: its input, its prompt, the LLM request
built from it, and what the session's history becomes afterwards.

deployment.py converts protobuf to these types and back, calls the tokenizer and LLM
applications and keeps sessions in Redis (sessions.py); everything it decides about a turn is
here, so tests drive it without Ray, Redis or gRPC (tests/orchestrator/test_conversation.py).

The model history of a session (sessions.py: `tokens`, and one code row per audio pad in them)
after a turn:
  - normal: what the LLM stage says the next turn extends (its end-of-turn entry: the tokens,
    and the codes of the audio pads its reply added), after the prompt's own codes;
  - interrupted: only what the caller was sent: the prompt, then the ids of the text tokens it
    got (no audio);
  - failed: unchanged (the history a person reads still records the turn).
`faithful_history` sessions rebuild the whole prompt every turn instead, as the reference demo
does (§11.5), from their own record of the conversation: user codes or text, and per assistant
segment its text and 24 kHz audio, re-encoded through the tokenizer once; the codes are kept
and the waveform dropped (re-encoding is deterministic), so only the last reply's audio is stored.

History limits (`HistoryLimits`, the operator's limits.*): a turn's prompt is the system prompt,
the newest earlier turns that fit, and the new user turn. Earlier turns are dropped, oldest first,
  - beyond `max_turns - 1` of them (so a session keeps its last `max_turns` turns);
  - faithful sessions: while the audio they hold (user + assistant) exceeds `max_audio_seconds`;
  - when the prompt would leave less than `reply_reserve_tokens` of the model's context for the
    reply: then until the prompt fills at most `context_trim_to` of the context, so the following
    turns extend the cached sequence again instead of re-prefilling it every turn.
The system prompt is always kept. A new turn that does not fit even alone is INVALID_ARGUMENT.
The history a person reads (GetSession) keeps the entries of the last `max_turns` turns.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence

import numpy as np
import torch

from orchestrator.sessions import Session, SessionSettingsRecord
from services.common.text_tokenizer import DEFAULT_SYSTEM_PROMPT
from services.llm.prompts import Audio, GeneratedAudio, Message, Prompt, PromptBuilder
from services.llm.protocol import Request

@dataclass(frozen=True)
class HistoryLimits:
    """What a session's history keeps (see the module docstring; limits.* in the settings)."""

    context_tokens: int             # the LLM's longest sequence: LLMEngineSettings.context_tokens
    max_turns: int
    max_audio_seconds: float
    reply_reserve_tokens: int
    context_trim_to: float
    max_system_prompt_chars: int

    @classmethod
    def from_settings(cls, limits, context_tokens: int) -> "HistoryLimits":
        return cls(context_tokens, limits.max_history_turns, limits.max_history_audio_seconds,
                   limits.reply_reserve_tokens, limits.context_trim_to, limits.max_system_prompt_chars)

    @property
    def prompt_tokens(self) -> int:
        """The longest prompt: the context less the reply's reserve."""
        return self.context_tokens - self.reply_reserve_tokens

    def first_kept(self, lengths: Sequence[int], fixed: int, audio: Sequence[float] | None = None) -> int:
        """Index of the oldest earlier turn the prompt keeps. lengths: tokens of each earlier
        turn, oldest first; fixed: tokens of the rest (system prompt, new turn, reply prompt);
        audio: seconds of audio of each earlier turn (faithful sessions)."""
        n = len(lengths)
        first = max(0, n - (self.max_turns - 1))
        while audio is not None and first < n and sum(audio[first:]) > self.max_audio_seconds:
            first += 1
        total = fixed + sum(lengths[first:])
        if total > self.prompt_tokens:
            target = min(self.prompt_tokens, int(self.context_tokens * self.context_trim_to))
            while first < n and total > target:
                total -= lengths[first]
                first += 1
        if total > self.prompt_tokens:
            raise ValueError(f"the turn's prompt has {total} tokens (system prompt and this turn, no earlier turns); "
                             f"the model's context of {self.context_tokens} tokens, less {self.reply_reserve_tokens} "
                             "kept for the reply (limits.reply_reserve_tokens), holds at most "
                             f"{self.prompt_tokens}: send shorter audio or text")
        return first


@dataclass
class ChatPrompt(Prompt):
    """A turn's prompt and where each of its turns starts (token offsets; the last is the new
    turn), so that a later turn can drop the oldest ones at a turn boundary."""

    turn_starts: list[int] = field(default_factory=list)


# Caller overrides of the reference's per-phase sampling (§11.3), accepted within these bounds.
SAMPLING_LIMITS = {"temperature": (0.05, 2.0), "top_k": (1, 1000), "top_p": (0.05, 1.0)}

# re-encodes one assistant segment's 24 kHz mono PCM16 into codes [frames, codebooks] (tokenizer)
Reencode = Callable[[bytes], Awaitable[torch.Tensor]]


def sampling_overrides(fields: Mapping[str, Any]) -> dict:
    """The sampling fields a caller set (name -> value), checked against SAMPLING_LIMITS
    (ValueError naming the field and its range otherwise)."""
    out = dict(fields)
    for name, value in out.items():
        for key, (lo, hi) in SAMPLING_LIMITS.items():
            if name.endswith(key) and not lo <= value <= hi:
                raise ValueError(f"sampling.{name}={value:g} is out of range [{lo:g}, {hi:g}]")
    return out


def llm_request(turn_id: str, mode: str, prompt: Prompt, *, session_id: str | None = None,
                sampling: Mapping[str, Any] | None = None, greedy: bool = False,
                tts_chunks: Sequence[Sequence[int]] = ()) -> Request:
    """The LLM stage's request. sampling: a caller's overrides (validated): `greedy` and `seed`
    are fields of their own, the rest are the engine's per-phase overrides; `greedy` is the
    default when the caller did not say."""
    rest = dict(sampling or {})
    codes = prompt.audio_codes
    return Request(prompt_ids=list(prompt.ids), mode=mode,
                   audio_codes=None if codes is None or not len(codes) else np.asarray(codes, dtype=np.int64),
                   tts_chunks=[list(c) for c in tts_chunks], session_id=session_id,
                   greedy=bool(rest.pop("greedy", greedy)), seed=rest.pop("seed", None), sampling=rest or None,
                   request_id=turn_id)


def codes_to_b64(codes) -> str:
    return base64.b64encode(np.ascontiguousarray(np.asarray(codes), dtype="<i4").tobytes()).decode()


def codes_from_b64(data: str, codebooks: int) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(data), dtype="<i4").astype(np.int64).reshape(-1, codebooks))


@dataclass(frozen=True)
class UserTurn:
    """The user's part of a turn: typed text, or the tokenizer's codes of spoken audio."""

    text: str = ""
    codes: torch.Tensor | None = None       # [frames, codebooks]
    audio_seconds: float = 0.0

    @property
    def content(self):
        return [Audio(self.codes)] if self.codes is not None else self.text

    def entry(self) -> dict[str, Any]:
        return {"role": "user", "text": self.text, "audio_seconds": self.audio_seconds}


@dataclass
class Reply:
    """What a finished turn leaves for the history (turns.produce fills it from the streams)."""

    text: str = ""                                  # the reply text the caller got
    audio_seconds: float = 0.0
    interrupted: bool = False
    error: Any = None                               # why the turn failed; None if it did not
    history: list[int] | None = None                # the LLM's end-of-turn tokens (None: it sent none)
    reply_codes: np.ndarray | None = None           # [frames, codebooks]: the reply's audio pads in `history`
    text_tokens: list[int] = field(default_factory=list)              # ids of the text the caller got
    segments: list[tuple[str, bytes]] = field(default_factory=list)   # (text, 24 kHz PCM16) per segment
    segment_tokens: list[int] = field(default_factory=list)           # text tokens per segment (0: audio)
    segment_seconds: list[float] = field(default_factory=list)        # audio per segment (0: text)


@dataclass
class Turn:
    """A turn set up: who asked what, the prompt, and the LLM request built from it."""

    turn_id: str
    session: Session
    user: UserTurn
    prompt: Prompt
    request: Request


@dataclass
class TurnRecord:
    """What the session store records for a finished turn (SessionStore.end_turn), and for a
    faithful-history session the turn's own record to append (None otherwise)."""

    entries: list[dict[str, Any]]
    tokens: list[int] | None                       # None: keep the model history before the turn
    codes: np.ndarray | None
    faithful: dict[str, Any] | None = None
    turn_starts: list[int] | None = None           # where each turn of `tokens` starts
    keep_entries: int = 0                          # the person's history keeps its last this many entries


class Conversation:
    def __init__(self, prompts: PromptBuilder, *, max_text_chars: int, history: HistoryLimits):
        self.prompts = prompts
        self.num_codebooks = prompts.num_codebooks
        self.audio_pad = prompts.tokens.audio.audio_pad
        self.max_text_chars = max_text_chars
        self.limits = history

    # ---------------------------------------------------------------- input
    def check_text(self, text: str) -> None:
        if len(text) > self.max_text_chars:
            raise ValueError(f"text of {len(text)} characters is over the limit of {self.max_text_chars} "
                             "(limits.max_text_chars)")

    def check_settings(self, settings: SessionSettingsRecord) -> None:
        """A new session's settings: its system prompt within limits and leaving room for turns."""
        text, lim = settings.system_prompt, self.limits
        if len(text) > lim.max_system_prompt_chars:
            raise ValueError(f"system_prompt of {len(text)} characters is over the limit of "
                             f"{lim.max_system_prompt_chars} (limits.max_system_prompt_chars)")
        n = len(self._system_ids(settings))
        if n >= lim.prompt_tokens:
            raise ValueError(f"system_prompt of {n} tokens leaves no room for a turn: the model's context of "
                             f"{lim.context_tokens} tokens, less {lim.reply_reserve_tokens} kept for the reply "
                             "(limits.reply_reserve_tokens), holds prompts of at most "
                             f"{lim.prompt_tokens} tokens")

    def check_input(self, kind: str | None, text: str = "") -> None:
        """A turn's input: `kind` is "audio", "text" or None (the caller set neither)."""
        if kind is None:
            raise ValueError("the turn has no input: set audio (a WAV/FLAC file or PCM16) or text")
        if kind == "text":
            if not text.strip():      # the model would answer an empty user message
                raise ValueError("the turn's text is empty: type something, or send audio")
            self.check_text(text)

    # ---------------------------------------------------------------- prompts
    def _system(self, sess: Session) -> Message:
        return Message("system", sess.settings.system_prompt or DEFAULT_SYSTEM_PROMPT)

    def _system_ids(self, settings: SessionSettingsRecord) -> list[int]:
        """The system message's ids: a chat prompt starts with them (roles end a text part)."""
        return [self.prompts.tokens.system] + self.prompts.encode(settings.system_prompt or DEFAULT_SYSTEM_PROMPT)

    def _turn_starts(self, sess: Session) -> list[int]:
        """Where each turn of the session's model history starts. A session recorded before turn
        offsets were kept: at each user role token (one a reply generated would be taken too)."""
        if sess.turn_starts or not sess.tokens:
            return list(sess.turn_starts)
        return [i for i, t in enumerate(sess.tokens) if t == self.prompts.tokens.user]

    def history_prompt(self, sess: Session, user: UserTurn) -> ChatPrompt:
        """The session's model history (the LLM's own sequence, its KV cache reusable) + this
        user turn; the first turn starts with the system prompt. The oldest turns are dropped
        as the history limits say (module docstring)."""
        spoken = sess.settings.spoken
        cont = self.prompts.chat([Message("user", user.content)], spoken=spoken)
        tokens, codes = list(sess.tokens), sess.codes
        if not tokens:
            tokens, codes = self._system_ids(sess.settings), np.zeros((0, self.num_codebooks), np.int32)
        n_pads = sum(1 for t in tokens if t == self.audio_pad)
        if n_pads != codes.shape[0]:
            raise RuntimeError(f"session {sess.session_id}: history has {n_pads} audio pads but "
                               f"{codes.shape[0]} code rows")
        starts = self._turn_starts(sess)
        bounds = starts + [len(tokens)]
        prefix = bounds[0]                                  # the system message
        first = self.limits.first_kept([b - a for a, b in zip(bounds, bounds[1:])], prefix + len(cont.ids))
        if first:                                           # drop turns [0, first) and their code rows
            cut = bounds[first]
            dropped = sum(1 for t in tokens[prefix:cut] if t == self.audio_pad)
            before = sum(1 for t in tokens[:prefix] if t == self.audio_pad)
            tokens = tokens[:prefix] + tokens[cut:]
            codes = np.concatenate([codes[:before], codes[before + dropped:]])
            starts = [s - (cut - prefix) for s in starts[first:]]
        parts = [torch.from_numpy(codes.astype(np.int64))]
        if cont.audio_codes is not None:
            parts.append(cont.audio_codes)
        all_codes = torch.cat(parts)
        return ChatPrompt(tokens + cont.ids, all_codes if len(all_codes) else None,
                          turn_starts=starts + [len(tokens)])

    async def faithful_prompt(self, sess: Session, past: list[dict[str, Any]], user: UserTurn,
                              reencode: Reencode) -> tuple[Prompt, bool]:
        """The reference's multi-turn prompt (§11.5): the conversation rebuilt from `past` (the
        session's faithful record), each assistant segment's audio re-encoded from its waveform
        (codes re-quantised from the vocoded audio, not the generated ones), the oldest turns
        dropped as the history limits say. `past` is updated in place: turns dropped, segments
        re-encoded here get their codes and lose their waveform; True if it changed (save it
        then: re-encoding is deterministic, so later turns reuse the codes)."""
        spoken = sess.settings.spoken
        first = self.limits.first_kept([0] * len(past), 0, [t.get("audio_seconds", 0.0) for t in past])
        changed = bool(first)
        del past[:first]
        turns = []
        for t in past:
            changed |= await self._reencode(t, reencode)
            turns.append(self._faithful_messages(t))
        gen = len(self.prompts.chat([], spoken=spoken).ids)       # the reply prompt closing a chat
        lengths = [len(self.prompts.chat(m, spoken=spoken).ids) - gen for m in turns]
        new = len(self.prompts.chat([self._system(sess), Message("user", user.content)], spoken=spoken).ids)
        first = self.limits.first_kept(lengths, new)
        if first:
            del past[:first], turns[:first]
            changed = True
        messages = [self._system(sess)] + [m for t in turns for m in t] + [Message("user", user.content)]
        return self.prompts.chat(messages, spoken=spoken), changed

    @staticmethod
    async def _reencode(turn: dict[str, Any], reencode: Reencode) -> bool:
        """Codes for the turn's assistant audio not re-encoded yet (its waveform then dropped)."""
        changed = False
        for seg in turn["assistant"]:
            if seg.get("pcm16") and "codes" not in seg:
                seg["codes"] = codes_to_b64(await reencode(base64.b64decode(seg["pcm16"])))
            if "codes" in seg and "pcm16" in seg:
                del seg["pcm16"]
                changed = True
        return changed

    def _faithful_messages(self, turn: dict[str, Any]) -> list[Message]:
        """One recorded turn as its user and assistant messages."""
        nb = self.num_codebooks
        u = turn["user"]
        parts: list = []
        for seg in turn["assistant"]:
            if seg["text"]:
                parts.append(seg["text"])
            if "codes" in seg:
                parts.append(GeneratedAudio(codes_from_b64(seg["codes"], nb)))
        return [Message("user", [Audio(codes_from_b64(u["codes"], nb))] if "codes" in u else u["text"]),
                Message("assistant", parts or "")]

    # ---------------------------------------------------------------- LLM requests
    def turn(self, turn_id: str, sess: Session, user: UserTurn, prompt: Prompt) -> Turn:
        s = sess.settings
        return Turn(turn_id, sess, user, prompt, llm_request(
            turn_id, "spoken" if s.spoken else "text", prompt, session_id=sess.uid, sampling=s.sampling))

    def transcribe_request(self, turn_id: str, codes: torch.Tensor) -> Request:
        """The base ASR demo: greedy, no session."""
        return llm_request(turn_id, "asr", self.prompts.asr(codes), greedy=True)

    def synthesize_request(self, turn_id: str, text: str, sampling: Mapping[str, Any]) -> Request:
        """The base TTS demo (greedy unless the caller asks for sampling), no session."""
        if not text.strip():
            raise ValueError("text is empty: nothing to synthesize")
        self.check_text(text)
        chunks = self.prompts.tts_chunks(text)
        return llm_request(turn_id, "tts", Prompt(chunks[0]), sampling=sampling, greedy=True, tts_chunks=chunks[1:])

    # ---------------------------------------------------------------- after the turn
    def truncate(self, sess: Session, audio_end_ms: float) -> TurnRecord:
        """The session's last reply cut to what the caller heard: its first `audio_end_ms` of
        audio (the OpenAI Realtime `conversation.item.truncate`). From the reply's timeline (text
        and audio segments in order, recorded by `finish`): a text segment was heard when
        playback passed the point where its speech starts (the model speaks a segment's text in
        the audio segment after it); audio is kept frame by frame, at the reply's own seconds
        per frame. The model history keeps the reply's tokens up to the first one not heard (an
        open audio segment closed), the readable history the heard text and audio length.
        Returns the record to store (entries: the whole readable history)."""
        if audio_end_ms < 0:
            raise ValueError(f"audio_end_ms={audio_end_ms:g} is negative")
        last = sess.history[-1] if sess.history else {}
        if last.get("role") != "assistant" or "timeline" not in last:
            raise ValueError("the session's last item is not a finished reply of this session's model history "
                             "(nothing to truncate; faithful_history sessions cannot be truncated)")
        total_s = sum(seg[1] for seg in last["timeline"])
        if audio_end_ms / 1000.0 > total_s + 1e-3:
            raise ValueError(f"audio_end_ms={audio_end_ms:g} is past the reply's audio of {total_s * 1000:.0f} ms")
        heard, t = audio_end_ms / 1000.0, 0.0
        keep_tokens = keep_chars = 0
        keep_s = 0.0
        for n_tokens, seconds, chars in last["timeline"]:
            if n_tokens and heard > t:                 # its speech starts at t: heard
                keep_tokens += n_tokens
                keep_chars += chars
            keep_s += min(seconds, max(0.0, heard - t))
            t += seconds
        tokens = list(sess.tokens)
        start = len(tokens) - last["reply_tokens"]
        a = self.prompts.tokens.audio
        specials = {a.audiogen_start, a.audiogen_end, a.audio_pad}
        reply = tokens[start:]
        pads = sum(1 for x in reply if x == a.audio_pad)
        keep_frames = round(keep_s * pads / total_s) if pads and total_s else 0
        kept: list[int] = []
        n_text = n_pads = 0
        for x in reply:
            if x == a.audio_pad:
                if n_pads == keep_frames:
                    break
                n_pads += 1
            elif x not in specials:
                if n_text == keep_tokens:
                    break
                n_text += 1
            kept.append(x)
        if kept and kept[-1] == a.audiogen_start:          # an audio segment not begun: dropped
            kept.pop()
        elif [x for x in kept if x in (a.audiogen_start, a.audiogen_end)][-1:] == [a.audiogen_start]:
            kept.append(a.audiogen_end)                       # one cut short: closed
        before = sum(1 for x in tokens[:start] if x == a.audio_pad)
        entry = dict(last, text=last["text"][:keep_chars], audio_seconds=round(keep_s, 4), truncated=True,
                     reply_tokens=len(kept), timeline=[])
        history = sess.history[:-1] + [entry]
        return TurnRecord(history, tokens[:start] + kept, sess.codes[:before + n_pads].copy(),
                          turn_starts=list(sess.turn_starts) or None)

    def history_after(self, prompt: Prompt, reply: Reply) -> tuple[list[int] | None, np.ndarray | None]:
        """(tokens, codes) of the session's model history after the turn; (None, None) keeps
        the one before it."""
        before = (prompt.audio_codes.numpy() if prompt.audio_codes is not None
                  else np.zeros((0, self.num_codebooks), np.int64))
        if reply.interrupted:
            # only what the caller was sent: the text's own token ids; its audio is dropped
            return list(prompt.ids) + list(reply.text_tokens), before.astype(np.int32)
        if reply.error is not None or reply.history is None:
            return None, None
        generated = np.asarray(reply.reply_codes if reply.reply_codes is not None else ()).reshape(-1, self.num_codebooks)
        return list(reply.history), np.concatenate([before, generated]).astype(np.int32)

    def faithful_record(self, user: UserTurn, reply: Reply) -> dict[str, Any]:
        """One turn of a faithful-history session's record (see faithful_prompt)."""
        u = {"text": user.text} if user.codes is None else {"codes": codes_to_b64(user.codes)}
        return {"user": u, "audio_seconds": user.audio_seconds + reply.audio_seconds,
                "assistant": [{"text": text, "pcm16": base64.b64encode(pcm).decode()} for text, pcm in reply.segments]}

    def finish(self, turn: Turn, reply: Reply | None) -> TurnRecord:
        """What to record for a turn; `reply` None: the orchestrator failed before it ended."""
        keep = 2 * self.limits.max_turns                    # a turn leaves at most 2 entries
        if reply is None:
            return TurnRecord([turn.user.entry()], None, None, keep_entries=keep)
        entry = {"role": "assistant", "text": reply.text, "audio_seconds": reply.audio_seconds,
                 "interrupted": reply.interrupted}
        tokens, codes = self.history_after(turn.prompt, reply)
        if tokens is not None and not turn.session.settings.faithful_history:
            # what `truncate` needs: the reply's length in the model history and its timeline
            entry["reply_tokens"] = len(tokens) - len(turn.prompt.ids)
            entry["timeline"] = [[n, round(sec, 4), len(text)] for (text, _), n, sec
                                 in zip(reply.segments, reply.segment_tokens, reply.segment_seconds)]
        faithful = (self.faithful_record(turn.user, reply)
                    if turn.session.settings.faithful_history and reply.error is None else None)
        starts = getattr(turn.prompt, "turn_starts", None) if tokens is not None else None
        return TurnRecord([turn.user.entry(), entry], tokens, codes, faithful, starts or None, keep)
