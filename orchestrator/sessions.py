"""Sessions in Redis: settings, history, the token/code history, ownership of the running turn.

A session belongs to the identity that created it (its API key's name, services/common/auth.py):
its id is the caller's, and every key is namespaced by the owner, so another identity asking
for the same id finds nothing (NOT_FOUND), can create its own session of that id, and learns
nothing about the first. Ids are checked on every call (1-64 of A-Z a-z 0-9 _ -), so no id
can name another key of a session.

One hash per session, `session:{owner}:{id}`, expiring `ttl` seconds after the last activity;
sorted sets (uid -> expiry) count live sessions: `sessions` against `limits.max_sessions`,
`sessions:{owner}` against the owner's `quotas.sessions` (both expire once the sessions in them
could have: every key here has a TTL). Creating checks both and writes the session in one Lua
script, so replicas creating at once never exceed a cap. A turn's owner is
kept as `turn:{turn_id}:session` (the uid), so a resume names a turn of its own session only.

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

from services.common.errors import AlreadyExists, NotFound, QuotaExceeded, ResourceExhausted

ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
TURN_ID_RE = re.compile(r"[0-9a-f]{32}")        # uuid4().hex, made here
LIVE_SET = "sessions"

# KEYS[1] live set, KEYS[2] the owner's live set, KEYS[3] the session hash.
# ARGV[1] now (ms), ARGV[2] max sessions, ARGV[3] the owner's max, ARGV[4] uid, ARGV[5] ttl (s),
# ARGV[6..] field, value, ... Returns {outcome, ms until the earliest live session expires}.
_CREATE = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], 0, now)
if redis.call('EXISTS', KEYS[3]) == 1 then return {'exists', '0'} end
local function full(set, max)
  if redis.call('ZCARD', set) < tonumber(max) then return nil end
  local first = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')
  return tostring(tonumber(first[2]) - now)
end
local wait = full(KEYS[1], ARGV[2])
if wait then return {'full', wait} end
wait = full(KEYS[2], ARGV[3])
if wait then return {'owner', wait} end
local ttl = tonumber(ARGV[5])
redis.call('HSET', KEYS[3], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('ZADD', KEYS[1], now + ttl * 1000, ARGV[4])
redis.call('ZADD', KEYS[2], now + ttl * 1000, ARGV[4])
if redis.call('TTL', KEYS[2]) < ttl then redis.call('EXPIRE', KEYS[2], ttl) end
return {'ok', '0'}
"""


def check_session_id(session_id: str) -> None:
    if not ID_RE.fullmatch(session_id or ""):
        raise ValueError(f"session_id {session_id!r} is not valid: use 1-64 of A-Z a-z 0-9 _ -"
                         if session_id else "session_id is empty: create a session first (CreateSession)")


def check_turn_id(turn_id: str) -> None:
    if not TURN_ID_RE.fullmatch(turn_id):
        raise ValueError(f"turn id {turn_id!r} is not valid: use the turn_id of an event of the turn "
                         "(32 hexadecimal digits)")


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
    session_id: str                 # as its owner knows it
    settings: SessionSettingsRecord
    created_ms: int
    expires_ms: int
    owner: str = ""                 # the identity that created it
    turns: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    codes: np.ndarray = field(default_factory=lambda: np.zeros((0, 8), np.int32))
    active_turn: str = ""
    turn_starts: list[int] = field(default_factory=list)

    @property
    def uid(self) -> str:
        """Unique across identities: its Redis keys, the LLM's session (KV cache, affinity)."""
        return uid(self.owner, self.session_id)


def uid(owner: str, session_id: str) -> str:
    return f"{owner}:{session_id}"


def _key(session_uid: str) -> str:
    return f"session:{session_uid}"


def _owner_set(owner: str) -> str:
    return f"{LIVE_SET}:{owner}"


def turn_owner_key(turn_id: str) -> str:
    return f"turn:{turn_id}:session"


class SessionStore:
    def __init__(self, client, *, default_ttl_s: int, max_sessions: int, num_codebooks: int,
                 max_per_owner: "Callable[[str], int]" = lambda _owner: 1 << 30):
        self.r = client      # a redis.Redis (protocol 2), opened by the deployment: no Redis import here
        self.default_ttl_s = default_ttl_s
        self.max_sessions = max_sessions
        self.max_per_owner = max_per_owner     # owner -> its quotas.sessions
        self.num_codebooks = num_codebooks
        self._create = client.register_script(_CREATE)

    def _ttl(self, s: SessionSettingsRecord) -> int:
        return min(s.ttl_seconds, self._max_ttl()) if s.ttl_seconds else self.default_ttl_s

    def _max_ttl(self) -> int:
        """The longest a session may live idle (a caller's ttl_seconds is capped to it)."""
        return self.default_ttl_s * 24

    def create(self, owner: str, settings: SessionSettingsRecord, session_id: str = "") -> Session:
        """A new session of `owner`: its id is `session_id` (ALREADY_EXISTS if the owner has one
        of that id) or a new random one. RESOURCE_EXHAUSTED (with the wait) at either cap."""
        if session_id:
            check_session_id(session_id)
        now = int(time.time() * 1000)
        sid = session_id or uuid.uuid4().hex
        ttl = self._ttl(settings)
        sess = Session(sid, settings, created_ms=now, expires_ms=now + ttl * 1000, owner=owner,
                       codes=np.zeros((0, self.num_codebooks), np.int32))
        fields = [x for kv in self._encode(sess).items() for x in kv]
        per_owner = self.max_per_owner(owner)
        outcome, wait_ms = self._create(keys=[LIVE_SET, _owner_set(owner), _key(sess.uid)],
                                        args=[now, self.max_sessions, per_owner, sess.uid, ttl, *fields])
        outcome, wait = outcome.decode() if isinstance(outcome, bytes) else outcome, float(wait_ms) / 1000
        if outcome == "exists":
            raise AlreadyExists(f"you already have a session {sid!r}; choose another id or omit it")
        if outcome == "full":
            raise QuotaExceeded(f"{self.max_sessions} sessions are live (limits.max_sessions); "
                                f"retry after {wait:.0f} s, when the oldest expires", wait)
        if outcome == "owner":
            raise QuotaExceeded(f"{owner} has {per_owner} live sessions, its limit (quotas.sessions); delete one "
                                f"(DeleteSession) or retry after {wait:.0f} s, when the oldest expires", wait)
        self.r.expire(LIVE_SET, self._max_ttl())
        return sess

    def get(self, owner: str, session_id: str) -> Session:
        """`owner`'s session `session_id`; NOT_FOUND for anyone else's, as for an unknown one."""
        check_session_id(session_id)
        raw = self.r.hgetall(_key(uid(owner, session_id)))
        if not raw or b"settings" not in raw:      # the key is the owner's: nobody else can reach it
            raise NotFound(f"session {session_id!r} not found (unknown, deleted or expired)")
        return self._decode(session_id, raw)

    # ---------------------------------------------------------------- faithful history
    # Per turn: the user part (codes or text) and the assistant's segments (text and its 24 kHz
    # audio), so the next prompt can be rebuilt as the reference demo does (§11.5): assistant
    # audio re-encoded from the waveform. Kept beside the session hash, with its expiry.
    def faithful_turns(self, sess: Session) -> list[dict[str, Any]]:
        raw = self.r.get(_key(sess.uid) + ":faithful")
        return json.loads(raw) if raw else []

    def save_faithful_turns(self, sess: Session, turns: list[dict[str, Any]]) -> None:
        self.r.set(_key(sess.uid) + ":faithful", json.dumps(turns), ex=self._ttl(sess.settings))

    def delete(self, owner: str, session_id: str) -> None:
        """Delete `owner`'s session; NOT_FOUND if it has none of that id (a retried delete that
        gets NOT_FOUND is done)."""
        check_session_id(session_id)
        u = uid(owner, session_id)
        pipe = self.r.pipeline()
        pipe.delete(_key(u) + ":faithful")
        pipe.delete(_key(u))
        pipe.zrem(LIVE_SET, u)
        pipe.zrem(_owner_set(owner), u)
        if not pipe.execute()[1]:
            raise NotFound(f"session {session_id!r} not found (unknown, deleted or expired)")

    def touch(self, sess: Session) -> None:
        ttl = self._ttl(sess.settings)
        sess.expires_ms = int(time.time() * 1000) + ttl * 1000
        pipe = self.r.pipeline()
        pipe.expire(_key(sess.uid), ttl)
        pipe.expire(_key(sess.uid) + ":faithful", ttl)
        pipe.hset(_key(sess.uid), "expires_ms", str(sess.expires_ms))
        pipe.zadd(LIVE_SET, {sess.uid: sess.expires_ms})
        pipe.zadd(_owner_set(sess.owner), {sess.uid: sess.expires_ms})
        pipe.expire(_owner_set(sess.owner), ttl, gt=True)
        pipe.expire(LIVE_SET, self._max_ttl())
        pipe.execute()

    def _watched(self, key: str, body: "Callable[[Any], Any]") -> Any:
        """body(pipe) under WATCH `key` (optimistic locking: Redis MULTI/EXEC), run again when
        another client changed the key meanwhile; body reads with `pipe`, then pipe.multi()
        and queues its writes, or returns without writing."""
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    out = body(pipe)
                    if pipe.explicit_transaction:
                        pipe.execute()
                    return out
                except Exception as e:  # WatchError by name: this module does not import Redis
                    if type(e).__name__ != "WatchError":
                        raise
                finally:
                    pipe.reset()

    def begin_turn(self, owner: str, session_id: str, turn_id: str,
                   is_over: "Callable[[str], bool]" = lambda _turn: False) -> Session:
        """Mark `turn_id` as the session's running turn; RESOURCE_EXHAUSTED if another one runs.

        is_over(turn): the previous turn ended or was abandoned (its orchestrator replica died
        before recording it): then the session is not blocked by it. Check and mark are one
        transaction (WATCH/MULTI): of turns racing for a session, on any replicas, one wins."""
        check_session_id(session_id)
        key = _key(uid(owner, session_id))

        def body(pipe) -> Session:
            raw = pipe.hgetall(key)
            if not raw or b"settings" not in raw:
                raise NotFound(f"session {session_id!r} not found (unknown, deleted or expired)")
            sess = self._decode(session_id, raw)
            if sess.active_turn and not is_over(sess.active_turn):
                raise ResourceExhausted(f"session {session_id} already has a running turn "
                                        f"({sess.active_turn}); wait for it or Interrupt it")
            pipe.multi()
            pipe.hset(key, "active_turn", turn_id)
            pipe.set(turn_owner_key(turn_id), sess.uid, ex=max(self._ttl(sess.settings), self.default_ttl_s))
            sess.active_turn = turn_id
            return sess

        sess = self._watched(key, body)
        self.touch(sess)
        return sess

    def turn_of(self, sess: Session, turn_id: str) -> None:
        """NOT_FOUND unless `turn_id` is a turn of `sess` (and still known)."""
        check_turn_id(turn_id)
        owner = self.r.get(turn_owner_key(turn_id))
        if owner is None or owner.decode() != sess.uid:
            raise NotFound(f"turn {turn_id} of session {sess.session_id!r} is not known "
                           "(finished too long ago, never started, or of another session)")

    def end_turn(self, sess: Session, *, entries: list[dict[str, Any]], tokens: list[int] | None,
                 codes: np.ndarray | None, turn_starts: list[int] | None = None, keep_entries: int = 0,
                 turn_id: str | None = None) -> bool:
        """Append the turn to the history (keeping its last `keep_entries` entries, 0: all);
        None tokens keep the previous model history (a turn that failed before the LLM produced
        a sequence). Returns whether it was recorded.

        One transaction over the session as it is in Redis now (not `sess` as read when the
        turn began): only the fields a turn changes are written, and with `turn_id` only while
        that turn is still the session's running one, so a turn recorded twice (a producer
        that took over from a dead one) or abandoned (a newer turn began) changes nothing.
        A deleted session is not resurrected."""
        key = _key(sess.uid)

        def body(pipe) -> Session | None:
            raw = pipe.hgetall(key)
            if not raw or b"settings" not in raw:
                return None
            cur = self._decode(sess.session_id, raw)
            if turn_id is not None and cur.active_turn != turn_id:
                return None
            cur.history.extend(entries)
            if keep_entries:
                del cur.history[:-keep_entries]
            cur.turns += 1
            if tokens is not None:
                cur.tokens = list(tokens)
                cur.codes = codes if codes is not None else cur.codes
                cur.turn_starts = list(turn_starts or [])
            cur.active_turn = ""
            enc = self._encode(cur)
            pipe.multi()
            pipe.hset(key, mapping={k: enc[k] for k in ("history", "turns", "tokens", "codes", "turn_starts",
                                                        "active_turn")})
            return cur

        cur = self._watched(key, body)
        if cur is None:
            return False
        for f in ("history", "turns", "tokens", "codes", "turn_starts", "active_turn"):
            setattr(sess, f, getattr(cur, f))
        self.touch(sess)
        return True

    def rewrite(self, sess: Session, *, history: list[dict[str, Any]], tokens: list[int], codes: np.ndarray,
                turn_starts: list[int] | None = None) -> None:
        """Replace the session's history (a truncated last reply, conversation.truncate); no turn
        may run meanwhile (the caller checked)."""
        sess.history, sess.tokens, sess.codes = list(history), list(tokens), codes
        sess.turn_starts = list(turn_starts or [])
        if self.r.exists(_key(sess.uid)):  # deleted meanwhile: do not resurrect it
            self.r.hset(_key(sess.uid), mapping=self._encode(sess))
            self.touch(sess)

    # ---------------------------------------------------------------- encoding
    def _encode(self, s: Session) -> dict[str, bytes | str]:
        codes = np.ascontiguousarray(s.codes, dtype="<i4")
        return {
            "settings": json.dumps(asdict(s.settings)),
            "owner": s.owner,
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
            session_id=sid, settings=settings, owner=raw[b"owner"].decode(),
            created_ms=int(raw[b"created_ms"]), expires_ms=int(raw.get(b"expires_ms", b"0")),
            turns=int(raw.get(b"turns", b"0")),
            history=json.loads(raw.get(b"history", b"[]")),
            tokens=np.frombuffer(raw.get(b"tokens", b""), dtype="<i4").tolist(),
            codes=codes.copy(),
            active_turn=raw.get(b"active_turn", b"").decode(),
            turn_starts=np.frombuffer(raw.get(b"turn_starts", b""), dtype="<i4").tolist(),
        )
