"""Sessions in Redis: settings, history, the token/code history, ownership of the running turn.

One hash per session, `session:{id}`, expiring `ttl` seconds after the last activity, and a
sorted set `sessions` (id -> expiry) to count live sessions against `max_sessions`; the set
itself expires once the longest-lived session could have (every key here has a TTL).

History is kept twice, for two readers:
  - `history`: what a person sees (role, text, audio seconds, interrupted), JSON;
  - `tokens` / `codes`: the model's view: the whole token sequence so far (int32) and one
    8-code row per `audio_pad` in it (int32, row-major). A new turn's prompt extends it, so
    the LLM replica that still holds the session's KV cache prefills only the new tokens, and
    any other replica can rebuild the cache from it after a failure. `turn_starts` (int32):
    where each turn starts in it, so the oldest turns can be dropped (conversation.py).
"""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from services.common.errors import AlreadyExists, NotFound, ResourceExhausted

ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LIVE_SET = "sessions"


@dataclass
class SessionSettingsRecord:
    system_prompt: str = ""
    spoken: bool = True
    faithful_history: bool = False
    low_latency_audio: bool = False
    ttl_seconds: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)   # only the fields the caller set


@dataclass
class Session:
    session_id: str
    settings: SessionSettingsRecord
    created_ms: int
    expires_ms: int
    turns: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    codes: np.ndarray = field(default_factory=lambda: np.zeros((0, 8), np.int32))
    active_turn: str = ""
    turn_starts: list[int] = field(default_factory=list)


def _key(session_id: str) -> str:
    return f"session:{session_id}"


class SessionStore:
    def __init__(self, client, *, default_ttl_s: int, max_sessions: int, num_codebooks: int):
        self.r = client      # a redis.Redis (protocol 2), opened by the deployment: no Redis import here
        self.default_ttl_s = default_ttl_s
        self.max_sessions = max_sessions
        self.num_codebooks = num_codebooks

    def _ttl(self, s: SessionSettingsRecord) -> int:
        return min(s.ttl_seconds, self._max_ttl()) if s.ttl_seconds else self.default_ttl_s

    def _max_ttl(self) -> int:
        """The longest a session may live idle (a caller's ttl_seconds is capped to it)."""
        return self.default_ttl_s * 24

    def create(self, settings: SessionSettingsRecord, session_id: str = "") -> Session:
        if session_id and not ID_RE.match(session_id):
            raise ValueError(f"session_id {session_id!r} is not valid: use 1-64 of A-Z a-z 0-9 _ -")
        now = int(time.time() * 1000)
        self.r.zremrangebyscore(LIVE_SET, 0, now)  # forget expired sessions
        if self.r.zcard(LIVE_SET) >= self.max_sessions:
            raise ResourceExhausted(f"{self.max_sessions} sessions are live (limits.max_sessions); "
                                    "delete idle sessions or raise the limit")
        sid = session_id or uuid.uuid4().hex
        ttl = self._ttl(settings)
        sess = Session(sid, settings, created_ms=now, expires_ms=now + ttl * 1000,
                       codes=np.zeros((0, self.num_codebooks), np.int32))
        fields = self._encode(sess)
        # HSETNX on the created field makes a caller-chosen id atomic
        if not self.r.hsetnx(_key(sid), "created_ms", str(now)):
            raise AlreadyExists(f"session {sid} already exists")
        pipe = self.r.pipeline()
        pipe.hset(_key(sid), mapping=fields)
        pipe.expire(_key(sid), ttl)
        pipe.zadd(LIVE_SET, {sid: now + ttl * 1000})
        pipe.expire(LIVE_SET, self._max_ttl())
        pipe.execute()
        return sess

    def get(self, session_id: str) -> Session:
        raw = self.r.hgetall(_key(session_id)) if session_id else {}
        if not raw or b"settings" not in raw:
            raise NotFound(f"session {session_id!r} not found (unknown, deleted or expired)")
        return self._decode(session_id, raw)

    # ---------------------------------------------------------------- faithful history
    # Per turn: the user part (codes or text) and the assistant's segments (text and its 24 kHz
    # audio), so the next prompt can be rebuilt as the reference demo does (§11.5): assistant
    # audio re-encoded from the waveform. Kept beside the session hash, with its expiry.
    def faithful_turns(self, session_id: str) -> list[dict[str, Any]]:
        raw = self.r.get(_key(session_id) + ":faithful")
        return json.loads(raw) if raw else []

    def save_faithful_turns(self, sess: Session, turns: list[dict[str, Any]]) -> None:
        self.r.set(_key(sess.session_id) + ":faithful", json.dumps(turns), ex=self._ttl(sess.settings))

    def delete(self, session_id: str) -> bool:
        pipe = self.r.pipeline()
        pipe.delete(_key(session_id) + ":faithful")
        pipe.delete(_key(session_id))
        pipe.zrem(LIVE_SET, session_id)
        return bool(pipe.execute()[1])

    def touch(self, sess: Session) -> None:
        ttl = self._ttl(sess.settings)
        sess.expires_ms = int(time.time() * 1000) + ttl * 1000
        pipe = self.r.pipeline()
        pipe.expire(_key(sess.session_id), ttl)
        pipe.expire(_key(sess.session_id) + ":faithful", ttl)
        pipe.hset(_key(sess.session_id), "expires_ms", str(sess.expires_ms))
        pipe.zadd(LIVE_SET, {sess.session_id: sess.expires_ms})
        pipe.expire(LIVE_SET, self._max_ttl())
        pipe.execute()

    def begin_turn(self, session_id: str, turn_id: str,
                   is_over: "Callable[[str], bool]" = lambda _turn: False) -> Session:
        """Mark `turn_id` as the session's running turn; RESOURCE_EXHAUSTED if another one runs.

        is_over(turn): the previous turn ended or was abandoned (its orchestrator replica died
        before recording it): then the session is not blocked by it."""
        sess = self.get(session_id)
        if sess.active_turn and not is_over(sess.active_turn):
            raise ResourceExhausted(f"session {session_id} already has a running turn "
                                    f"({sess.active_turn}); wait for it or Interrupt it")
        self.r.hset(_key(session_id), "active_turn", turn_id)
        sess.active_turn = turn_id
        self.touch(sess)
        return sess

    def end_turn(self, sess: Session, *, entries: list[dict[str, Any]], tokens: list[int] | None,
                 codes: np.ndarray | None, turn_starts: list[int] | None = None, keep_entries: int = 0) -> None:
        """Append the turn to the history (keeping its last `keep_entries` entries, 0: all);
        None tokens keep the previous model history (a turn that failed before the LLM produced
        a sequence)."""
        sess.history.extend(entries)
        if keep_entries:
            del sess.history[:-keep_entries]
        sess.turns += 1
        if tokens is not None:
            sess.tokens = list(tokens)
            sess.codes = codes if codes is not None else sess.codes
            sess.turn_starts = list(turn_starts or [])
        sess.active_turn = ""
        if self.r.exists(_key(sess.session_id)):  # deleted meanwhile: do not resurrect it
            self.r.hset(_key(sess.session_id), mapping=self._encode(sess))
            self.touch(sess)

    # ---------------------------------------------------------------- encoding
    def _encode(self, s: Session) -> dict[str, bytes | str]:
        codes = np.ascontiguousarray(s.codes, dtype="<i4")
        return {
            "settings": json.dumps(asdict(s.settings)),
            "created_ms": str(s.created_ms),
            "expires_ms": str(s.expires_ms),
            "turns": str(s.turns),
            "history": json.dumps(s.history, ensure_ascii=False),
            "tokens": np.asarray(s.tokens, dtype="<i4").tobytes(),
            "codes": codes.tobytes(),
            "active_turn": s.active_turn,
            "turn_starts": np.asarray(s.turn_starts, dtype="<i4").tobytes(),
        }

    def _decode(self, sid: str, raw: dict[bytes, bytes]) -> Session:
        settings = SessionSettingsRecord(**json.loads(raw[b"settings"]))
        codes = np.frombuffer(raw.get(b"codes", b""), dtype="<i4").reshape(-1, self.num_codebooks)
        return Session(
            session_id=sid, settings=settings,
            created_ms=int(raw[b"created_ms"]), expires_ms=int(raw.get(b"expires_ms", b"0")),
            turns=int(raw.get(b"turns", b"0")),
            history=json.loads(raw.get(b"history", b"[]")),
            tokens=np.frombuffer(raw.get(b"tokens", b""), dtype="<i4").tolist(),
            codes=codes.copy(),
            active_turn=raw.get(b"active_turn", b"").decode(),
            turn_starts=np.frombuffer(raw.get(b"turn_starts", b""), dtype="<i4").tolist(),
        )
