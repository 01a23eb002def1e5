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
segment its text and 24 kHz audio, re-encoded through the tokenizer once and then kept.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence

import numpy as np
import torch

from orchestrator.sessions import Session
from services.common.text_tokenizer import DEFAULT_SYSTEM_PROMPT
from services.llm.prompts import Audio, GeneratedAudio, Message, Prompt, PromptBuilder
from services.llm.protocol import Request

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


class Conversation:
    def __init__(self, prompts: PromptBuilder, *, max_text_chars: int):
        self.prompts = prompts
        self.num_codebooks = prompts.num_codebooks
        self.audio_pad = prompts.tokens.audio.audio_pad
        self.max_text_chars = max_text_chars

    # ---------------------------------------------------------------- input
    def check_text(self, text: str) -> None:
        if len(text) > self.max_text_chars:
            raise ValueError(f"text of {len(text)} characters is over the limit of {self.max_text_chars} "
                             "(limits.max_text_chars)")

    def check_input(self, kind: str | None, text: str = "") -> None:
        """A turn's input: `kind` is "audio", "text" or None (the caller set neither)."""
        if kind is None:
            raise ValueError("the turn has no input: set audio (a WAV/FLAC file or PCM16) or text")
        if kind == "text":
            self.check_text(text)

    # ---------------------------------------------------------------- prompts
    def _system(self, sess: Session) -> Message:
        return Message("system", sess.settings.system_prompt or DEFAULT_SYSTEM_PROMPT)

    def history_prompt(self, sess: Session, user: UserTurn) -> Prompt:
        """The session's model history (the LLM's own sequence, its KV cache reusable) + this
        user turn; the first turn starts with the system prompt."""
        spoken = sess.settings.spoken
        if not sess.tokens:
            return self.prompts.chat([self._system(sess), Message("user", user.content)], spoken=spoken)
        n_pads = sum(1 for t in sess.tokens if t == self.audio_pad)
        if n_pads != sess.codes.shape[0]:
            raise RuntimeError(f"session {sess.session_id}: history has {n_pads} audio pads but "
                               f"{sess.codes.shape[0]} code rows")
        cont = self.prompts.chat([Message("user", user.content)], spoken=spoken)
        codes = [torch.from_numpy(sess.codes.astype(np.int64))]
        if cont.audio_codes is not None:
            codes.append(cont.audio_codes)
        return Prompt(list(sess.tokens) + cont.ids, torch.cat(codes))

    async def faithful_prompt(self, sess: Session, past: list[dict[str, Any]], user: UserTurn,
                              reencode: Reencode) -> tuple[Prompt, bool]:
        """The reference's multi-turn prompt (§11.5): the whole conversation rebuilt from `past`
        (the session's faithful record), each assistant segment's audio re-encoded from its
        waveform (codes re-quantised from the vocoded audio, not the generated ones). Segments
        re-encoded here get their codes in `past`; True if there were any (save it then:
        re-encoding is deterministic, so later turns reuse them)."""
        nb = self.num_codebooks
        changed = False
        messages = [self._system(sess)]
        for t in past:
            u = t["user"]
            messages.append(Message("user", [Audio(codes_from_b64(u["codes"], nb))] if "codes" in u else u["text"]))
            parts: list = []
            for seg in t["assistant"]:
                if seg["text"]:
                    parts.append(seg["text"])
                if seg.get("pcm16") and "codes" not in seg:
                    seg["codes"] = codes_to_b64(await reencode(base64.b64decode(seg["pcm16"])))
                    changed = True
                if "codes" in seg:
                    parts.append(GeneratedAudio(codes_from_b64(seg["codes"], nb)))
            messages.append(Message("assistant", parts or ""))
        messages.append(Message("user", user.content))
        return self.prompts.chat(messages, spoken=sess.settings.spoken), changed

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
        return {"user": u, "assistant": [{"text": text, "pcm16": base64.b64encode(pcm).decode()}
                                         for text, pcm in reply.segments]}

    def finish(self, turn: Turn, reply: Reply | None) -> TurnRecord:
        """What to record for a turn; `reply` None: the orchestrator failed before it ended."""
        if reply is None:
            return TurnRecord([turn.user.entry()], None, None)
        entry = {"role": "assistant", "text": reply.text, "audio_seconds": reply.audio_seconds,
                 "interrupted": reply.interrupted}
        tokens, codes = self.history_after(turn.prompt, reply)
        faithful = (self.faithful_record(turn.user, reply)
                    if turn.session.settings.faithful_history and reply.error is None else None)
        return TurnRecord([turn.user.entry(), entry], tokens, codes, faithful)
