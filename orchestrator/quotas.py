"""Per-identity limits, kept in Redis so that every conversation replica sees the same counts.

Each limit is checked and updated in one Lua script (atomic: two replicas admitting at once
cannot both take the last place), with Redis's own clock (TIME), so replicas whose clocks
differ agree. Over a limit a call gets QuotaExceeded: RESOURCE_EXHAUSTED with the seconds to
wait (services/common/grpc_status.py sends them as trailing metadata where Serve lets it).

- requests per minute and audio seconds per hour: GCRA (the generic cell rate algorithm, as
  in redis-cell and most API gateways): one key per identity holds the theoretical arrival
  time (TAT) of the next request. A request of cost c moves it by c * T (T = the period / the
  limit); it is admitted while TAT - now stays within the period, so the whole limit may be
  used in a burst and then refills evenly. The retry delay is exact.
  Audio: what the tokenizer took in is charged before the turn runs (refused if over); what
  the turn generated is charged when it ends, whatever it is (a long reply may overdraw; the
  next request then waits).
- concurrent turns: a sorted set of the identity's running turn ids. A turn leaves it when it
  ends; one whose replica died leaves it when `turns.is_over` says so (its caller stream
  ended or went silent), or at the latest after the turn TTL.
- live sessions: in orchestrator/sessions.py (the same script that creates the session).

Admission control is the same count over the whole stack: at most `limits.max_running_turns`
turns run at once (a sorted set of every running turn, healed the same way); beyond it a new
turn gets RESOURCE_EXHAUSTED at once, with a retry delay, instead of slowing every running
turn down. Both counts are taken in one script: a turn is in both sets or in neither.

Keys: quota:{identity}:rpm, quota:{identity}:audio (strings, expiring when spent budget has
refilled), quota:{identity}:turns and admission:turns (sorted sets, expiring with the turn TTL).
"""
from __future__ import annotations

from typing import Callable

from services.common.errors import QuotaExceeded, ResourceExhausted
from services.common.settings import QuotasSettings

# KEYS[1] the identity's TAT key. ARGV[1] T: ms per unit, ARGV[2] the period (ms), ARGV[3] cost
# (units), ARGV[4] mode: "admit" (refuse what does not fit), "force" (record anyway), "check"
# (cost 0, nothing written). Returns {admitted 0/1, retry after ms (string)}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local period = tonumber(ARGV[2])
local new = tat + tonumber(ARGV[3]) * tonumber(ARGV[1])
if ARGV[4] ~= 'force' and new - now > period then
  return {0, tostring(new - now - period)}
end
if ARGV[4] == 'check' then return {1, '0'} end
redis.call('SET', KEYS[1], tostring(new), 'PX', math.ceil(new - now) + 1000)
return {1, '0'}
"""

# KEYS[1] the identity's running turns, KEYS[2] the whole stack's (admission control). ARGV[1]
# the identity's limit, ARGV[2] the stack's, ARGV[3] turn id, ARGV[4] the turn TTL (s): older
# entries no longer count, and the sets expire after it. Both sets take the turn, or neither.
# Returns {admitted 0/1, which limit refused: "identity" | "capacity" | ""}.
_BEGIN_TURN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stale = now - tonumber(ARGV[4]) * 1000
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, stale)
redis.call('ZREMRANGEBYSCORE', KEYS[2], 0, stale)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return {0, 'identity'}
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then
  return {0, 'capacity'}
end
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], now, ARGV[3])
  redis.call('EXPIRE', KEYS[i], ARGV[4])
end
return {1, ''}
"""

RUNNING_KEY = "admission:turns"   # every running turn of the stack (limits.max_running_turns)
TURN_RETRY_S = 1.0   # a running turn's end is not predictable: look again after this


def _key(identity: str, what: str) -> str:
    return f"quota:{identity}:{what}"


class Quotas:
    def __init__(self, client, settings: QuotasSettings, *, turn_ttl_s: int, max_running_turns: int = 2**31 - 1):
        self.r = client          # a redis.Redis, opened by the deployment
        self.settings = settings
        self.turn_ttl_s = turn_ttl_s
        self.max_running_turns = max_running_turns
        self._gcra = client.register_script(_GCRA)
        self._begin = client.register_script(_BEGIN_TURN)

    def _take(self, identity: str, what: str, limit: float, period_s: float, cost: float, mode: str,
              refusal: str) -> None:
        """Count `cost` in the identity's GCRA bucket `what` (`limit` per `period_s`); if it does
        not fit, QuotaExceeded: `refusal` and the seconds until it would."""
        ok, retry_ms = self._gcra(keys=[_key(identity, what)],
                                  args=[period_s * 1000.0 / limit, period_s * 1000.0, cost, mode])
        if not int(ok):
            wait = float(retry_ms) / 1000.0
            raise QuotaExceeded(f"{refusal}; retry after {wait:.1f} s", wait)

    def request(self, identity: str) -> None:
        """One call of `identity` (every call but health checks)."""
        limit = self.settings.of(identity).requests_per_minute
        self._take(identity, "rpm", limit, 60.0, 1, "admit", f"{identity} is over its limit of {limit} requests "
                   "per minute (quotas.requests_per_minute)")

    def check_audio(self, identity: str) -> None:
        """Refuse a turn while the identity's audio budget is spent (by earlier replies)."""
        limit = self.settings.of(identity).audio_seconds_per_hour
        self._take(identity, "audio", limit, 3600.0, 0, "check", f"{identity} used its {limit:g} audio seconds "
                   "of the last hour (quotas.audio_seconds_per_hour)")

    def charge_audio(self, identity: str, seconds: float, *, force: bool = False) -> None:
        """Charge `seconds` of audio: the input of a turn (refused if over the budget, not
        charged then), or with force the generated reply (always charged)."""
        if seconds <= 0:
            return
        limit = self.settings.of(identity).audio_seconds_per_hour
        if seconds > limit and not force:   # never fits: no retry will help
            raise ResourceExhausted(f"{identity}: this audio ({seconds:.1f} s) is longer than the hourly budget of "
                                    f"{limit:g} audio seconds (quotas.audio_seconds_per_hour); send shorter audio")
        self._take(identity, "audio", limit, 3600.0, seconds, "force" if force else "admit",
                   f"{identity}: this audio ({seconds:.1f} s) does not fit what is left of the hourly budget of "
                   f"{limit:g} audio seconds (quotas.audio_seconds_per_hour)")

    def _heal(self, key: str, is_over: Callable[[str], bool]) -> None:
        """Drop the turns of `key` that ended or were abandoned (their replica died)."""
        for member in self.r.zrange(key, 0, -1):
            tid = member.decode() if isinstance(member, bytes) else member
            if is_over(tid):          # ended, or its replica died (a turn setting up is not over)
                self.r.zrem(key, tid)

    def begin_turn(self, identity: str, turn_id: str, is_over: Callable[[str], bool]) -> None:
        """Count `turn_id` as running, for the identity and for the stack; QuotaExceeded if
        the identity runs its limit already, or the stack runs limits.max_running_turns.
        is_over(turn): the turn ended or was abandoned (turns.is_over)."""
        limit = self.settings.of(identity).turns
        key = _key(identity, "turns")
        self._heal(key, is_over)
        args = [limit, self.max_running_turns, turn_id, self.turn_ttl_s]
        ok, which = self._begin(keys=[key, RUNNING_KEY], args=args)
        if not int(ok) and _text(which) == "capacity":   # look for turns that ended unseen, once
            self._heal(RUNNING_KEY, is_over)
            ok, which = self._begin(keys=[key, RUNNING_KEY], args=args)
        if int(ok):
            return
        if _text(which) == "capacity":
            raise QuotaExceeded(f"the service is at capacity: {self.max_running_turns} turns are running "
                                f"(limits.max_running_turns); retry after {TURN_RETRY_S:.1f} s", TURN_RETRY_S)
        raise QuotaExceeded(f"{identity} already runs {limit} turns at once (quotas.turns); wait for one "
                            f"to end or Interrupt it; retry after {TURN_RETRY_S:.1f} s", TURN_RETRY_S)

    def remaining(self, identity: str) -> list[dict]:
        """What is left of the identity's rate limits now, as the OpenAI Realtime
        `rate_limits.updated` lists them: name, limit, remaining, reset_seconds (until the
        whole limit is back). Read only: nothing is charged."""
        q = self.settings.of(identity)
        sec, usec = self.r.time()
        now = sec * 1000.0 + usec / 1000.0
        out = []
        for what, name, limit, period_s in (("rpm", "requests", q.requests_per_minute, 60.0),
                                            ("audio", "audio_seconds", q.audio_seconds_per_hour, 3600.0)):
            raw = self.r.get(_key(identity, what))
            used_ms = max(0.0, float(raw) - now) if raw else 0.0       # TAT - now: the spent part
            spent = used_ms / (period_s * 1000.0 / limit)
            out.append({"name": name, "limit": limit, "remaining": max(0, int(limit - spent)),
                        "reset_seconds": round(used_ms / 1000.0, 3)})
        return out

    def end_turn(self, identity: str, turn_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.zrem(_key(identity, "turns"), turn_id)
        pipe.zrem(RUNNING_KEY, turn_id)
        pipe.execute()


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
