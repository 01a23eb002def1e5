"""The Redis Streams bus between the stages (architecture.md, "Data flow of one spoken turn").

Two kinds of stream:

    turn:{turn_id}:llm     text deltas, segment boundaries, timing, end/error
    turn:{turn_id}:audio   PCM chunks keyed by (segment, chunk), boundaries, errors
    turn:{turn_id}:events  the merged reply as the caller receives it (ClientEvent), for resume
        Written by the stages, read in order by the orchestrator with XREAD. Capped with an
        approximate MAXLEN and expiring with the session (the expiry is refreshed on every
        write). A reader resumes after the last entry id it saw without loss or duplication.
        When a turn ends, its stage streams are deleted and its events kept for resume for
        `finished_turn_ttl_s` (`end_turn`).

    jobs:decoder, jobs:vocoder (and their urgent lanes jobs:decoder:urgent, jobs:vocoder:urgent)
        Work queues read through one consumer group per stream; a worker serves a stage's urgent
        lane before its other jobs (a turn's first audio, entries.urgent_lane). A replica claims a job
        (XREADGROUP '>'), publishes its results, then acks (XACK + XDEL, so the stream length
        is the backlog). A job whose replica died is re-claimed after the visibility timeout
        (XAUTOCLAIM); after `max_deliveries` deliveries it goes to `jobs:{name}:dead` instead of
        looping forever. Results are published with `put_result_once`, keyed by
        (stage, turn, segment, chunk), so a job that is processed twice publishes once.
        The loop that serves a work stream is services/common/worker.py.

Entries (services/common/entries.py) are typed dataclasses with an explicit, flat field encoding
(no pickle): str as UTF-8, numbers in decimal, bools as 1/0, arrays as raw little-endian bytes
with an explicit dtype and shape. Each entry carries the W3C trace context (`traceparent`, `tracestate`) of
the span that wrote it; `Bus.add` fills it from the current span when the entry has none.

Consumer-group names and ids are plain strings. Redis Cluster is not supported: a result key
and its target stream are written by one script and must live on one server.

Every key written here has a TTL except the fixed-name work streams, which are bounded in length
instead (the backlog check, MAXLEN on the dead-letter streams). A Redis at its memory limit
(maxmemory with noeviction) refuses writes: every write here then raises `RedisFull`, a
ResourceExhausted, and `check_writable` finds out without writing anything.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Mapping, Sequence

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from services.common.entries import TURN_KINDS, BusError, Entry, Job, StreamEntry, decode_entry
from services.common.errors import ResourceExhausted
from services.common.telemetry import Metrics

log = logging.getLogger(__name__)

# A key never created: `SET ... XX` on it changes nothing, but Redis refuses it (as every write)
# while it is at its memory limit, which is what `check_writable` asks.
WRITE_PROBE_KEY = "bus:write-probe"
FULL_RETRY_INTERVAL_S = 0.5       # how often a write refused by a full Redis is tried again


class BacklogFull(BusError):
    """A work stream already holds `job_max_backlog` jobs: the stage cannot keep up."""


class RedisFull(ResourceExhausted):
    """Redis refused a write: it is at its memory limit (maxmemory, policy noeviction)."""


@contextmanager
def _writing():
    try:
        yield
    except redis.exceptions.OutOfMemoryError:
        raise RedisFull("Redis is at its memory limit (maxmemory) and refuses writes; retry later "
                        "(operators: raise maxmemory or lower limits.session_ttl_s, see README "
                        '"Redis memory")') from None


class RedisHealth:
    """Whether Redis answers, as the bus's commands find out (every command reports through
    `_WatchedRetry`). Once one fails for want of an answer, `down` holds until a PING, tried
    on a thread every PROBE_INTERVAL_S, gets one: callers check `down` first and fail at once
    instead of each waiting out the socket timeout (on an event loop, one after the other)."""

    PROBE_INTERVAL_S = 0.5

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.client: "redis.Redis | None" = None
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def answered(self) -> None:
        self.down_since = None

    def failed(self) -> None:
        with self._lock:
            if self.down_since is not None:
                return
            self.down_since = time.monotonic()
        log.warning("Redis is not answering; calls fail with UNAVAILABLE until it does")
        threading.Thread(target=self._probe, name="redis-probe", daemon=True).start()

    def _probe(self) -> None:
        while self.down_since is not None:
            time.sleep(self.PROBE_INTERVAL_S)
            try:
                if self.client is not None:
                    self.client.ping()      # answered() through the retry policy
            except Exception:  # noqa: BLE001 - still down
                pass
        log.warning("Redis answers again")


class _WatchedRetry(Retry):
    """redis-py's retry policy for the stack's clients: one quick reconnect after a dropped
    connection (Redis restarted, a failover), nothing on a timeout (redis-py 8's default
    retries ten times with backoff up to 10 s, so a Redis that stopped answering held every
    call for minutes; now it fails within `redis.socket_timeout_s`), and every outcome
    reported to the client's RedisHealth."""

    def __init__(self, health: RedisHealth):
        super().__init__(ExponentialBackoff(cap=0.2, base=0.05), 1, supported_errors=(redis.ConnectionError,))
        self.health = health

    def __deepcopy__(self, memo):      # redis-py copies the policy into every connection
        return _WatchedRetry(self.health)

    def call_with_retry(self, do, fail, *args, **kwargs):
        try:
            out = super().call_with_retry(do, fail, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError):
            self.health.failed()
            raise
        self.health.answered()
        return out


def unreachable(exc: BaseException) -> bool:
    """Redis did not answer (connection refused or dropped, or a timeout)."""
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


# --------------------------------------------------------------------------- scripts

# Publish a result once per key, atomically. A Lua script runs to completion before any other
# command, and Redis persists/replicates its effects as one MULTI/EXEC, so nobody observes the
# key without the entry or the entry without the key, even across a server restart with AOF.
# The client may die before sending the script (no key, no entry: the re-delivered job publishes
# it) or after it ran (key and entry: the re-delivery finds the key and publishes nothing); there
# is no point in between. SET NX + XADD from the client, even in MULTI, needs the key's outcome
# before deciding to XADD, which MULTI cannot express; WATCH would work but costs round trips.
# The key stores the entry id so a caller can tell where the first copy went.
#   KEYS[1] result key   KEYS[2] stream
#   ARGV[1] key ttl s    ARGV[2] stream ttl s (0: leave the stream's expiry alone)
#   ARGV[3] maxlen (0: no cap)   ARGV[4..] field, value, field, value, ...
_PUT_ONCE = """
local prev = redis.call('GET', KEYS[1])
if prev then return {0, prev} end
local id
if tonumber(ARGV[3]) > 0 then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
else
  id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
end
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
return {1, id}
"""

# Add a job unless the work stream already holds ARGV[1] entries (waiting + in flight): a
# clear error is better than trimming jobs nobody has done (MAXLEN would drop them silently).
# With KEYS[2] (a record list), also RPUSH ARGV[2] to it and expire it in ARGV[3] s, only if
# the job went in. ARGV[4...]: the job's fields.
_SUBMIT = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return redis.error_reply('BACKLOG ' .. KEYS[1] .. ' holds ' .. ARGV[1] .. ' jobs')
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
if KEYS[2] then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return id
"""


# (list key, item): what a write also pushes to a list in the same transaction (Bus.add)
Record = tuple[str, bytes]


def _flat(fields: Mapping[bytes, bytes]) -> list[bytes]:
    out: list[bytes] = []
    for k, v in fields.items():
        out += (k, v)
    return out


# --------------------------------------------------------------------------- the bus

class Bus:
    """Typed access to the streams. Thread-safe: one instance can serve many threads (redis-py
    takes a pooled connection per command).

    `redis_or_url`: a URL or a `redis.Redis` made with `decode_responses=False` (payloads are
    binary) and RESP2 (`protocol=2`; RESP3 changes XREADGROUP's reply shape).
    """

    def __init__(
        self,
        redis_or_url: "str | redis.Redis",
        *,
        turn_ttl_s: int = 1800,
        finished_turn_ttl_s: int = 120,
        turn_maxlen: int = 20000,
        job_max_backlog: int = 10000,
        max_deliveries: int = 3,
        username: str | None = None,
        password: str | None = None,
        connect_timeout_s: float = 5.0,
        socket_timeout_s: float = 3.0,
        metrics: Metrics | None = None,
        tls: Mapping[str, Any] | None = None,
        lease_ttl_s: float = 10.0,
    ) -> None:
        self.health = RedisHealth()
        if isinstance(redis_or_url, str):
            # The socket timeout bounds every blocking read: `block_ms` must stay below it.
            # tls: redis-py's ssl_* options for a rediss:// URL (RedisSettings.client_options).
            self.redis = redis.Redis.from_url(
                redis_or_url, protocol=2, decode_responses=False, username=username or None,
                password=password or None, socket_connect_timeout=connect_timeout_s,
                socket_timeout=socket_timeout_s, health_check_interval=30, retry=_WatchedRetry(self.health),
                **(tls or {}))
        else:
            kw = redis_or_url.connection_pool.connection_kwargs
            if kw.get("decode_responses"):
                raise BusError("the Redis client for the bus must have decode_responses=False "
                               "(entries carry binary payloads)")
            # redis-py 8 defaults to RESP3 when protocol is not given
            if str(kw.get("protocol")) != "2":
                raise BusError(f"the Redis client for the bus must be made with protocol=2 (RESP2: "
                               f"XREADGROUP's reply shape); it has protocol={kw.get('protocol')}")
            self.redis = redis_or_url
            socket_timeout_s = kw.get("socket_timeout") or 5.0  # redis-py's default
        self.health.client = self.redis
        self.max_block_ms = int(socket_timeout_s * 1000) - 500
        self.turn_ttl_s = int(turn_ttl_s)
        self.finished_turn_ttl_s = int(finished_turn_ttl_s)
        self.turn_maxlen = int(turn_maxlen)
        self.job_max_backlog = int(job_max_backlog)
        self.max_deliveries = int(max_deliveries)
        self.lease_ttl_s = float(lease_ttl_s)
        self.metrics = metrics
        self._put_once = self.redis.register_script(_PUT_ONCE)
        self._submit = self.redis.register_script(_SUBMIT)

    @classmethod
    def from_settings(cls, settings: Any, **kw: Any) -> "Bus":
        """A bus configured by `Settings` (redis, bus and limits.session_ttl_s)."""
        r, b = settings.redis, settings.bus
        tls = {k: v for k, v in r.client_options().items() if k.startswith("ssl_")}
        return cls(r.url, username=r.username, password=r.password, tls=tls,
                   connect_timeout_s=r.connect_timeout_s, socket_timeout_s=r.socket_timeout_s,
                   lease_ttl_s=b.lease_ttl_s, turn_ttl_s=settings.limits.session_ttl_s,
                   finished_turn_ttl_s=b.finished_turn_ttl_s, turn_maxlen=b.turn_stream_maxlen,
                   job_max_backlog=b.job_max_backlog, max_deliveries=b.max_deliveries, **kw)

    def _check_block(self, block_ms: int | None) -> None:
        if block_ms is not None and (block_ms == 0 or block_ms > self.max_block_ms):
            raise ValueError(f"block_ms={block_ms} must be between 1 and {self.max_block_ms} "
                             f"(below the client's socket timeout; 0 would block forever)")

    # ---- names

    @staticmethod
    def turn_stream(turn_id: str, kind: str) -> str:
        """`turn:{turn_id}:llm` or `turn:{turn_id}:audio`."""
        if kind not in TURN_KINDS:
            raise ValueError(f"turn stream kind must be one of {TURN_KINDS}; got {kind!r}")
        return f"turn:{turn_id}:{kind}"

    @staticmethod
    def dead_letter_stream(stream: str) -> str:
        """`jobs:{name}:dead` for `jobs:{name}`."""
        return f"{stream}:dead"

    @staticmethod
    def result_key(stage: str, turn_id: str, segment: int, chunk: int) -> str:
        """The once-only key of the result of one (turn, segment, chunk) piece of a stage."""
        return f"result:{stage}:{turn_id}:{segment}:{chunk}"

    def _policy(self, stream: str) -> tuple[int, int]:
        """(ttl_s, maxlen) for writes: turn streams expire and are capped; work streams neither
        (their length is bounded by acks and `submit`'s backlog check)."""
        if stream.startswith("turn:"):
            return self.turn_ttl_s, self.turn_maxlen
        return 0, 0

    # ---- writing

    def add(self, stream: str, entry: Entry, maxlen: int | None = None, ttl_s: int | None = None,
            record: Record | None = None) -> str:
        """XADD `entry` (with the current trace context if it has none); returns the entry id.

        maxlen: approximate cap (MAXLEN ~); ttl_s: (re)set the stream's expiry. Both default to
        the stream's policy: turn streams get `turn_maxlen` and `turn_ttl_s`, others neither.
        record: (list key, item) RPUSHed in the same transaction, the list expiring with the
        turn's TTL (a turn's reply record, services/llm/continuation.py)."""
        default_ttl, default_maxlen = self._policy(stream)
        maxlen = default_maxlen if maxlen is None else maxlen
        ttl_s = default_ttl if ttl_s is None else ttl_s
        fields = entry.with_trace().encode()
        with _writing():
            if not ttl_s and record is None:
                return _s(self.redis.xadd(stream, fields, maxlen=maxlen or None, approximate=True))
            pipe = self.redis.pipeline(transaction=True)  # the entry never exists without an expiry
            pipe.xadd(stream, fields, maxlen=maxlen or None, approximate=True)
            if ttl_s:
                pipe.expire(stream, ttl_s)
            if record is not None:
                pipe.rpush(record[0], record[1])
                pipe.expire(record[0], self.turn_ttl_s)
            return _s(pipe.execute()[0])

    def publish(self, turn_id: str, kind: str, entry: Entry, retry_full_s: float = 0.0,
                record: Record | None = None) -> str:
        """Add `entry` to the turn stream `turn:{turn_id}:{kind}` (capped, expiry refreshed).
        retry_full_s: while Redis is full, try again for this long (a turn's end or error,
        which its reader must get once Redis takes writes again) before raising RedisFull.
        record: as for `add`."""
        deadline = time.monotonic() + retry_full_s
        while True:
            try:
                return self.add(self.turn_stream(turn_id, kind), entry, record=record)
            except RedisFull:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(FULL_RETRY_INTERVAL_S)

    def submit(self, stream: str, job: Entry, record: Record | None = None) -> str:
        """Add a job to a work stream; BacklogFull if it already holds `job_max_backlog` jobs.
        record: as for `add`, pushed only if the job went in (one script)."""
        keys, head = [stream], [self.job_max_backlog, b"", 0]
        if record is not None:
            keys, head = [stream, record[0]], [self.job_max_backlog, record[1], self.turn_ttl_s]
        try:
            with _writing():
                return _s(self._submit(keys=keys, args=[*head, *_flat(job.with_trace().encode())]))
        except redis.ResponseError as e:
            if str(e).startswith("BACKLOG"):
                raise BacklogFull(f"{stream} already holds {self.job_max_backlog} jobs "
                                  f"(bus.job_max_backlog); the stage is not keeping up") from None
            raise

    def put_result_once(self, result_key: str, stream: str, entry: Entry,
                        ttl_s: int | None = None, maxlen: int | None = None) -> tuple[bool, str]:
        """Add `entry` to `stream` unless a result was already published under `result_key`.

        Returns (published, entry id of the one published copy). The key lives `ttl_s` (default
        the session TTL), which must outlast any re-delivery of the job that made the result."""
        default_ttl, default_maxlen = self._policy(stream)
        key_ttl = int(ttl_s or self.turn_ttl_s)
        stream_ttl = default_ttl if ttl_s is None else (ttl_s if default_ttl else 0)
        maxlen = default_maxlen if maxlen is None else maxlen
        fields = _flat(entry.with_trace().encode())
        with _writing():
            published, entry_id = self._put_once(keys=[result_key, stream],
                                                 args=[key_ttl, stream_ttl, maxlen, *fields])
        return bool(published), _s(entry_id)

    def check_writable(self) -> None:
        """RedisFull if Redis refuses writes now (at its memory limit); writes nothing."""
        with _writing():
            self.redis.set(WRITE_PROBE_KEY, b"", xx=True)

    def refresh_turn(self, turn_id: str, ttl_s: int | None = None) -> None:
        """Push back the expiry of both turn streams (a reader still attached)."""
        pipe = self.redis.pipeline(transaction=False)
        for kind in TURN_KINDS:
            pipe.expire(self.turn_stream(turn_id, kind), ttl_s or self.turn_ttl_s)
        pipe.execute()

    def delete_turn(self, turn_id: str) -> None:
        self.redis.delete(*(self.turn_stream(turn_id, k) for k in TURN_KINDS))

    def end_turn(self, turn_id: str) -> None:
        """A turn has ended: its stage streams go (only the turn's producer reads them) and its
        caller events stay `finished_turn_ttl_s` for a resume. Neither command needs memory,
        so this works while Redis is full."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self.turn_stream(turn_id, "llm"), self.turn_stream(turn_id, "audio"))
        pipe.expire(self.turn_stream(turn_id, "events"), self.finished_turn_ttl_s)
        pipe.execute()

    # ---- leases: who is working on a turn
    # A process that works on a turn holds `turn:{id}:lease:{role}`, renewed by a
    # services/common/leases.py Leases thread; a process killed with -9 renews nothing, so
    # whoever waits on the turn knows within `lease_ttl_s` instead of a stall timeout.

    @staticmethod
    def lease_key(turn_id: str, role: str) -> str:
        return f"turn:{turn_id}:lease:{role}"

    def holds_lease(self, turn_id: str, role: str) -> bool:
        return bool(self.redis.exists(self.lease_key(turn_id, role)))

    # ---- reading in order

    def read(self, streams: Mapping[str, str], block_ms: int | None = None,
             count: int | None = None) -> list[StreamEntry]:
        """Entries after the given ids (XREAD), in stream order; '0' reads from the start, '$'
        only what arrives from now. Waits up to `block_ms` for the first entry (None: no wait).
        To resume, pass the id of the last message seen for each stream."""
        self._check_block(block_ms)
        reply = self.redis.xread(dict(streams), count=count, block=block_ms)
        return [StreamEntry(_s(name), _s(eid), decode_entry(fields))
                for name, entries in (reply or []) for eid, fields in entries]

    # ---- work streams

    def ensure_group(self, stream: str, group: str) -> None:
        """Create the consumer group (and the stream) if missing. It starts at id 0 so jobs
        submitted before any worker started are not skipped."""
        try:
            self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def claim_next(self, stream: str | Sequence[str], group: str, consumer: str, block_ms: int | None = None,
                   count: int = 1) -> list[Job]:
        """Up to `count` jobs never delivered to the group (XREADGROUP '>'), waiting up to
        `block_ms`. They stay pending for `consumer` until acked.

        Several streams are lanes in priority order: the batch is filled from the first lane,
        then the next; only when all are empty does it wait, on all of them (a wait that wakes
        on several lanes at once may return up to `count` jobs per lane)."""
        self._check_block(block_ms)
        streams = [stream] if isinstance(stream, str) else list(stream)
        jobs: list[Job] = []
        for s in streams:
            if len(jobs) >= count:
                break
            jobs += self._claim({s: ">"}, group, consumer, count - len(jobs), None)
        if not jobs and block_ms is not None:
            jobs = self._claim({s: ">" for s in streams}, group, consumer, count, block_ms)
        return jobs

    def _claim(self, streams: dict[str, str], group: str, consumer: str, count: int,
               block_ms: int | None) -> list[Job]:
        reply = self.redis.xreadgroup(group, consumer, streams, count=count, block=block_ms)
        jobs = []
        for name, entries in reply or []:
            stream = _s(name)
            for eid, fields in entries:
                try:
                    entry = decode_entry(fields)
                except BusError as e:  # would fail on every delivery: dead-letter it now
                    self._dead_letter_raw(stream, group, _s(eid), fields, 1, f"undecodable: {e}")
                    continue
                jobs.append(Job(stream, _s(eid), entry, group=group, consumer=consumer, deliveries=1))
        return jobs

    def ack(self, job: Job) -> bool:
        """Done: remove the job from the pending list and from the stream (XACK + XDEL in one
        transaction). False if it was already acked (by another consumer that also did it)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(job.stream, job.group, job.id)
        pipe.xdel(job.stream, job.id)
        acked, _ = pipe.execute()
        return bool(acked)

    def deliveries(self, stream: str, group: str, ids: Iterable[str]) -> dict[str, int]:
        """Delivery counts of pending jobs (XPENDING); ids no longer pending are absent."""
        ids = list(ids)
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.xpending_range(stream, group, min=i, max=i, count=1)
        out = {}
        for i, rows in zip(ids, pipe.execute()):
            for row in rows:
                out[_s(row["message_id"])] = int(row["times_delivered"])
        return out

    def reclaim_stale(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                      count: int = 10, max_deliveries: int | None = None,
                      on_dead_letter: Callable[[Job, str], None] | None = None) -> list[Job]:
        """Take over jobs pending longer than `min_idle_ms` (their consumer died or hung) with
        XAUTOCLAIM; each returned job's `deliveries` counts this delivery. Jobs delivered more
        than `max_deliveries` times (default the bus's) are moved to the dead-letter stream
        instead, and `on_dead_letter(job, reason)` is called for each."""
        limit = self.max_deliveries if max_deliveries is None else max_deliveries
        claimed: list[tuple[str, Any]] = []
        cursor: Any = "0-0"
        while len(claimed) < count:
            cursor, entries, deleted = self.redis.xautoclaim(
                stream, group, consumer, min_idle_ms, start_id=cursor, count=count - len(claimed))
            claimed += [(_s(eid), fields) for eid, fields in entries if eid is not None]
            if deleted:  # trimmed or deleted while pending: XAUTOCLAIM drops them from the PEL
                log.warning("%s: pending jobs %s were deleted before being acked",
                            stream, [_s(d) for d in deleted])
            if _s(cursor) == "0-0":
                break
        if not claimed:
            return []
        counts = self.deliveries(stream, group, [eid for eid, _ in claimed])
        jobs = []
        for eid, fields in claimed:
            if eid not in counts:
                continue  # acked meanwhile by its old consumer, which came back and finished it
            try:
                entry = decode_entry(fields)
            except BusError as e:
                self._dead_letter_raw(stream, group, eid, fields, counts[eid], f"undecodable: {e}")
                continue
            job = Job(stream, eid, entry, group=group, consumer=consumer, deliveries=counts[eid])
            if job.deliveries > limit:
                reason = f"delivered {job.deliveries} times (max_deliveries {limit})"
                self.dead_letter(job, reason)
                if on_dead_letter is not None:
                    on_dead_letter(job, reason)
            else:
                jobs.append(job)
        return jobs

    def hand_back(self, stream: str, group: str, consumer: str, idle_ms: int) -> int:
        """A consumer that stops: make its pending jobs look `idle_ms` idle (XCLAIM ... IDLE),
        so the next `reclaim_stale` of another consumer (min_idle_ms <= idle_ms) takes them at
        once instead of after the visibility timeout. Returns how many."""
        rows = self.redis.xpending_range(stream, group, min="-", max="+", count=1000, consumername=consumer)
        ids = [_s(r["message_id"]) for r in rows]
        if ids:
            self.redis.xclaim(stream, group, consumer, 0, ids, idle=idle_ms, justid=True)
        return len(ids)

    def dead_letter(self, job: Job, reason: str) -> str:
        """Move `job` to `{stream}:dead` with its reason, original id and delivery count, and
        remove it from the work stream, in one transaction. Returns the dead-letter entry id."""
        return self._dead_letter_raw(job.stream, job.group, job.id, job.entry.encode(),
                                     job.deliveries, reason)

    def _dead_letter_raw(self, stream: str, group: str, eid: str, fields: Mapping, deliveries: int,
                         reason: str) -> str:
        log.error("%s: job %s dead-lettered: %s", stream, eid, reason)
        dead = dict(fields)
        dead.update({b"dead_reason": reason.encode(), b"dead_id": eid.encode(),
                     b"dead_deliveries": str(deliveries).encode(), b"dead_group": group.encode()})
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.dead_letter_stream(stream), dead, maxlen=self.job_max_backlog, approximate=True)
        pipe.xack(stream, group, eid)
        pipe.xdel(stream, eid)
        return _s(pipe.execute()[0])

    def read_dead(self, stream: str, count: int = 100) -> list[tuple[StreamEntry, dict[str, str]]]:
        """Dead-lettered jobs of `stream`, oldest first, with their dead_* fields (operators)."""
        out = []
        for eid, fields in self.redis.xrange(self.dead_letter_stream(stream), count=count):
            meta = {_s(k): _s(v) for k, v in fields.items() if _s(k).startswith("dead_")}
            out.append((StreamEntry(self.dead_letter_stream(stream), _s(eid), decode_entry(fields)), meta))
        return out


def reply_record_key(turn_id: str) -> str:
    """The list of what a turn's LLM stage published of the reply (services/llm/continuation.py)."""
    return f"turn:{turn_id}:reply"
