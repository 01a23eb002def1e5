"""The Redis Streams bus between the stages (architecture.md, "Data flow of one spoken turn").

Two kinds of stream:

    turn:{turn_id}:llm     text deltas, audio frames, segment boundaries, timing, end/error
    turn:{turn_id}:audio   PCM chunks keyed by (segment, chunk), boundaries, errors
    turn:{turn_id}:events  the merged reply as the caller receives it (ClientEvent), for resume
        Written by the stages, read in order by the orchestrator with XREAD. Capped with an
        approximate MAXLEN and expiring with the session (the expiry is refreshed on every
        write). A reader resumes after the last entry id it saw without loss or duplication.

    jobs:decoder, jobs:vocoder
        Work queues read through one consumer group per stream. A replica claims a job
        (XREADGROUP '>'), publishes its results, then acks (XACK + XDEL, so the stream length
        is the backlog). A job whose replica died is re-claimed after the visibility timeout
        (XAUTOCLAIM); after `max_deliveries` deliveries it goes to `jobs:{name}:dead` instead of
        looping forever. Results are published with `put_result_once`, keyed by
        (stage, turn, segment, chunk), so a job that is processed twice publishes once.

Entries are typed dataclasses with an explicit, flat field encoding (no pickle): str as UTF-8,
numbers in decimal, bools as 1/0, tensors as raw little-endian bytes with an explicit shape.
Each entry carries the W3C trace context (`traceparent`, `tracestate`) of the span that wrote
it; `Bus.add` fills it from the current span when the entry has none.

Consumer-group names and ids are plain strings. Redis Cluster is not supported: a result key
and its target stream are written by one script and must live on one server.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np
import redis

from services.common.telemetry import Metrics, get_metrics, inject_context, start_span

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DECODER_JOBS = "jobs:decoder"
VOCODER_JOBS = "jobs:vocoder"
TURN_KINDS = ("llm", "audio", "events")


class BusError(RuntimeError):
    """A malformed entry, a misconfigured client, or a Redis reply the bus cannot use."""


class BacklogFull(BusError):
    """A work stream already holds `job_max_backlog` jobs: the stage cannot keep up."""


class PermanentError(Exception):
    """Raised by a worker handler for a job that can never succeed (bad input): the job is
    dead-lettered at once instead of being retried until `max_deliveries`."""


# --------------------------------------------------------------------------- entries

_CODECS: dict[Any, tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = {
    str: (lambda v: v.encode("utf-8"), lambda b: b.decode("utf-8")),
    int: (lambda v: str(int(v)).encode(), lambda b: int(b)),
    float: (lambda v: repr(float(v)).encode(), lambda b: float(b)),  # repr round-trips exactly
    bool: (lambda v: b"1" if v else b"0", lambda b: {b"1": True, b"0": False}[b]),
    bytes: (lambda v: bytes(v), lambda b: bytes(b)),
    tuple[int, ...]: (lambda v: ",".join(str(int(x)) for x in v).encode(),
                      lambda b: tuple(int(x) for x in b.split(b",")) if b else ()),
}
_ENTRY_TYPES: dict[str, type["Entry"]] = {}


@dataclass(frozen=True)
class Entry:
    """Base of every stream entry. Subclasses declare `type_name` and their fields.

    traceparent / tracestate: W3C trace context of the span that wrote the entry ('' = none).
    """

    TYPE: ClassVar[str] = ""
    traceparent: str = field(default="", kw_only=True)
    tracestate: str = field(default="", kw_only=True)

    def __init_subclass__(cls, type_name: str = "", **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if type_name:
            if type_name in _ENTRY_TYPES:
                raise TypeError(f"entry type {type_name!r} is defined twice")
            cls.TYPE = type_name
            _ENTRY_TYPES[type_name] = cls

    def encode(self) -> dict[bytes, bytes]:
        """The flat field map written with XADD: `type`, `v`, then every field."""
        out = {b"type": self.TYPE.encode(), b"v": str(SCHEMA_VERSION).encode()}
        for name, t in _fields(type(self)).items():
            out[name.encode()] = _CODECS[t][0](getattr(self, name))
        return out

    def _check(self) -> None:
        """Raise BusError if the fields are inconsistent (payload sizes); run on decode."""

    def trace_carrier(self) -> dict[str, str]:
        return {"traceparent": self.traceparent, "tracestate": self.tracestate}

    def with_trace(self, carrier: Mapping[str, str] | None = None) -> "Entry":
        """This entry with the given trace context (default: the current span's), unless it
        already carries one."""
        if self.traceparent:
            return self
        carrier = inject_context() if carrier is None else carrier
        if not carrier.get("traceparent"):
            return self
        return dataclasses.replace(self, traceparent=carrier["traceparent"],
                                   tracestate=carrier.get("tracestate", ""))


@functools.cache
def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if t not in _CODECS:
            raise TypeError(f"{cls.__name__}.{f.name}: type {t} has no stream encoding")
        out[f.name] = t
    return out


def decode_entry(fields: Mapping[bytes | str, bytes | str]) -> Entry:
    """The typed entry of a raw XREAD/XREADGROUP field map. Fields unknown to this version are
    ignored (a newer writer may add some); a missing field without a default is an error."""
    raw = {(k.decode() if isinstance(k, bytes) else k): (v.encode() if isinstance(v, str) else v)
           for k, v in fields.items()}
    type_name = raw.get("type", b"").decode("utf-8", "replace")
    cls = _ENTRY_TYPES.get(type_name)
    if cls is None:
        raise BusError(f"stream entry has unknown type {type_name!r} (known: {', '.join(_ENTRY_TYPES)})")
    version = raw.get("v", b"").decode("utf-8", "replace")
    if version != str(SCHEMA_VERSION):
        raise BusError(f"{type_name} entry has schema version {version!r}; this code reads {SCHEMA_VERSION}")
    kwargs = {}
    defaults = {f.name for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    for name, t in _fields(cls).items():
        if name not in raw:
            if name in defaults:
                continue
            raise BusError(f"{type_name} entry lacks field {name!r}")
        try:
            kwargs[name] = _CODECS[t][1](raw[name])
        except (ValueError, KeyError, UnicodeDecodeError):
            raise BusError(f"{type_name} entry field {name!r} is not a valid {getattr(t, '__name__', t)}: "
                           f"{raw[name][:40]!r}") from None
    entry = cls(**kwargs)
    entry._check()
    return entry


def _pack(array: Any, dtype: str) -> tuple[bytes, tuple[int, ...]]:
    """Raw little-endian bytes and shape of `array` (numpy, CPU torch tensor or nested lists)."""
    src = np.asarray(array)
    dt = np.dtype(dtype)
    if dt.kind == "i" and src.size and src.dtype.kind not in "iub":
        raise BusError(f"integer payload expected (codes, token ids); got {src.dtype} values")
    a = np.ascontiguousarray(src, dtype=dt)
    return a.tobytes(), tuple(int(s) for s in a.shape)


def _unpack(data: bytes, shape: tuple[int, ...], dtype: str, what: str) -> np.ndarray:
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) if shape else 1
    if len(data) != n * dt.itemsize:
        raise BusError(f"{what}: {len(data)} bytes do not hold shape {shape} of {dt.name} "
                       f"({n * dt.itemsize} bytes)")
    return np.frombuffer(data, dtype=dt).reshape(shape)


# Work items ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeJob(Entry, type_name="decode_job"):
    """Codes of one audio segment (or low-latency chunk) to decode to mel (jobs:decoder).

    turn_id, segment, chunk: identify the piece; chunk is 0 for a whole segment (faithful mode).
    codes: int32 little-endian, shape `codes_shape` = (frames, codebooks), row-major.
    final: this is the last chunk of the segment.
    context_frames: leading frames of `codes` that are left context already decoded by the
        previous chunk (0 in faithful mode); their mel frames are decoded and then dropped.
    seed: CFM noise seed (0 = random).
    session_id: the session, for routing and logs.
    """

    turn_id: str
    segment: int
    chunk: int
    codes: bytes = field(repr=False)
    codes_shape: tuple[int, ...]
    final: bool = True
    context_frames: int = 0
    seed: int = 0
    session_id: str = ""

    @classmethod
    def from_codes(cls, turn_id: str, segment: int, chunk: int, codes: Any, **kw: Any) -> "DecodeJob":
        """`codes`: (frames, codebooks) integer array or CPU tensor."""
        data, shape = _pack(codes, "<i4")
        return cls(turn_id=turn_id, segment=segment, chunk=chunk, codes=data, codes_shape=shape, **kw)

    def codes_array(self) -> np.ndarray:
        """(frames, codebooks) int32, read-only view of the payload."""
        return _unpack(self.codes, self.codes_shape, "<i4", "decode_job.codes")

    def _check(self) -> None:
        if len(self.codes_shape) != 2:
            raise BusError(f"decode_job.codes_shape must be (frames, codebooks); got {self.codes_shape}")
        self.codes_array()


@dataclass(frozen=True)
class VocodeJob(Entry, type_name="vocode_job"):
    """A mel spectrogram to turn into 24 kHz audio (jobs:vocoder).

    turn_id, segment, chunk: as in the DecodeJob it came from.
    mel: float32 little-endian, shape `mel_shape` = (n_mels, frames), row-major.
    final: last chunk of the segment (the vocoder flushes its crossfade tail).
    context_frames: leading mel frames that belong to left context; synthesised for
        continuity, their samples are not published.
    seed: source-noise seed (0 = random).
    """

    turn_id: str
    segment: int
    chunk: int
    mel: bytes = field(repr=False)
    mel_shape: tuple[int, ...]
    final: bool = True
    context_frames: int = 0
    seed: int = 0
    session_id: str = ""

    @classmethod
    def from_mel(cls, turn_id: str, segment: int, chunk: int, mel: Any, **kw: Any) -> "VocodeJob":
        """`mel`: (n_mels, frames) float array or CPU fp32 tensor."""
        data, shape = _pack(mel, "<f4")
        return cls(turn_id=turn_id, segment=segment, chunk=chunk, mel=data, mel_shape=shape, **kw)

    def mel_array(self) -> np.ndarray:
        """(n_mels, frames) float32, read-only view of the payload."""
        return _unpack(self.mel, self.mel_shape, "<f4", "vocode_job.mel")

    def _check(self) -> None:
        if len(self.mel_shape) != 2:
            raise BusError(f"vocode_job.mel_shape must be (n_mels, frames); got {self.mel_shape}")
        self.mel_array()


# Turn events (turn:{id}:llm and turn:{id}:audio) -------------------------------------------

@dataclass(frozen=True)
class TextDelta(Entry, type_name="text"):
    """New reply text of text segment `segment` (0-based), in generation order."""

    turn_id: str
    segment: int
    text: str


@dataclass(frozen=True)
class AudioFrames(Entry, type_name="audio_frames"):
    """Audio codes the LLM generated for segment `segment`: int32 (frames, codebooks).
    `first_frame` is the index of the first of these frames within the segment."""

    turn_id: str
    segment: int
    first_frame: int
    codes: bytes = field(repr=False)
    codes_shape: tuple[int, ...]

    @classmethod
    def from_codes(cls, turn_id: str, segment: int, first_frame: int, codes: Any, **kw: Any) -> "AudioFrames":
        data, shape = _pack(codes, "<i4")
        return cls(turn_id=turn_id, segment=segment, first_frame=first_frame, codes=data,
                   codes_shape=shape, **kw)

    def codes_array(self) -> np.ndarray:
        return _unpack(self.codes, self.codes_shape, "<i4", "audio_frames.codes")

    def _check(self) -> None:
        self.codes_array()


@dataclass(frozen=True)
class PcmChunk(Entry, type_name="pcm"):
    """A piece of reply audio: mono little-endian int16 at `sample_rate`.
    (segment, chunk) orders it within the turn; `final` marks the segment's last chunk."""

    turn_id: str
    segment: int
    chunk: int
    pcm16: bytes = field(repr=False)
    sample_rate: int
    final: bool = True

    @property
    def samples(self) -> int:
        return len(self.pcm16) // 2

    def _check(self) -> None:
        if len(self.pcm16) % 2:
            raise BusError(f"pcm entry of turn {self.turn_id} has an odd byte count {len(self.pcm16)}")


@dataclass(frozen=True)
class SegmentBoundary(Entry, type_name="segment"):
    """A segment ended. kind 'text': its text is complete and its audio follows; kind 'audio':
    its codes are complete, `audio_frames` 12.5 Hz frames in `chunks` decode chunks (so the
    reader knows how many PCM chunks to wait for; 0 frames means no audio)."""

    turn_id: str
    segment: int
    kind: str
    audio_frames: int = 0
    chunks: int = 0

    def _check(self) -> None:
        if self.kind not in ("text", "audio"):
            raise BusError(f"segment entry kind must be 'text' or 'audio'; got {self.kind!r}")


@dataclass(frozen=True)
class Timing(Entry, type_name="timing"):
    """A named moment of the turn (e.g. 'llm_first_token', 'llm_done') as wall-clock unix ms
    from the writing process; the orchestrator turns it into ms since turn start."""

    turn_id: str
    name: str
    unix_ms: float


@dataclass(frozen=True)
class TurnEnd(Entry, type_name="end"):
    """The writer is done with this turn. reason: 'eos', 'length', 'cancelled' (LLM) or
    'complete'. text: the full reply text. tokens: the final token sequence as int32 LE
    (the session history), empty when not applicable."""

    turn_id: str
    reason: str
    text: str = ""
    tokens: bytes = field(default=b"", repr=False)

    @classmethod
    def with_tokens(cls, turn_id: str, reason: str, tokens: Sequence[int], **kw: Any) -> "TurnEnd":
        return cls(turn_id=turn_id, reason=reason, tokens=_pack(list(tokens), "<i4")[0], **kw)

    def token_list(self) -> list[int]:
        return _unpack(self.tokens, (len(self.tokens) // 4,), "<i4", "end.tokens").tolist()

    def _check(self) -> None:
        if len(self.tokens) % 4:
            raise BusError(f"end entry of turn {self.turn_id}: tokens is not whole int32s")


@dataclass(frozen=True)
class TurnError(Entry, type_name="error"):
    """The turn failed in `stage`. code: a google.rpc.Code value (e.g. 13 INTERNAL,
    14 UNAVAILABLE); message: what a person can act on. (segment, chunk) name the lost piece
    when known, else -1."""

    turn_id: str
    stage: str
    code: int
    message: str
    segment: int = -1
    chunk: int = -1


@dataclass(frozen=True)
class ClientEvent(Entry, type_name="client_event"):
    """One event of the reply exactly as the caller receives it (turn:{id}:events): a
    serialized baichuan_audio.v1.TurnEvent without its event_id, which is this entry's id.
    A caller that reconnects resumes by reading after the last id it got."""

    turn_id: str
    payload: bytes = field(repr=False)
    last: bool = False      # the end of the turn (EndOfTurn or a fatal error)


ENTRY_TYPES: Mapping[str, type[Entry]] = _ENTRY_TYPES


# --------------------------------------------------------------------------- messages

def id_ms(entry_id: str) -> int:
    """The millisecond timestamp part of a stream entry id ('1700000000000-3')."""
    return int(entry_id.split("-", 1)[0])


@dataclass(frozen=True)
class Message:
    """An entry read from a stream, with its id (pass it back to `read` to resume after it)."""

    stream: str
    id: str
    entry: Entry


@dataclass(frozen=True)
class Job(Message):
    """An entry claimed from a work stream by `consumer` of `group`.
    deliveries: how many times Redis has delivered it (1 on first claim)."""

    group: str = ""
    consumer: str = ""
    deliveries: int = 1

    @property
    def lag_ms(self) -> float:
        """Time between the XADD of the job and now (queue lag on first delivery)."""
        return max(0.0, time.time() * 1000.0 - id_ms(self.id))


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
_SUBMIT = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return redis.error_reply('BACKLOG ' .. KEYS[1] .. ' holds ' .. ARGV[1] .. ' jobs')
end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
"""


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
        turn_maxlen: int = 20000,
        job_max_backlog: int = 10000,
        max_deliveries: int = 3,
        username: str | None = None,
        password: str | None = None,
        connect_timeout_s: float = 5.0,
        socket_timeout_s: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        if isinstance(redis_or_url, str):
            # The socket timeout bounds every blocking read: `block_ms` must stay below it.
            self.redis = redis.Redis.from_url(
                redis_or_url, protocol=2, decode_responses=False, username=username or None,
                password=password or None, socket_connect_timeout=connect_timeout_s,
                socket_timeout=socket_timeout_s, health_check_interval=30)
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
        self.max_block_ms = int(socket_timeout_s * 1000) - 500
        self.turn_ttl_s = int(turn_ttl_s)
        self.turn_maxlen = int(turn_maxlen)
        self.job_max_backlog = int(job_max_backlog)
        self.max_deliveries = int(max_deliveries)
        self.metrics = metrics
        self._put_once = self.redis.register_script(_PUT_ONCE)
        self._submit = self.redis.register_script(_SUBMIT)

    @classmethod
    def from_settings(cls, settings: Any, **kw: Any) -> "Bus":
        """A bus configured by `Settings` (redis, bus and limits.session_ttl_s)."""
        r, b = settings.redis, settings.bus
        return cls(r.url, username=r.username, password=r.password,
                   connect_timeout_s=r.connect_timeout_s, turn_ttl_s=settings.limits.session_ttl_s,
                   turn_maxlen=b.turn_stream_maxlen, job_max_backlog=b.job_max_backlog,
                   max_deliveries=b.max_deliveries, **kw)

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

    def add(self, stream: str, entry: Entry, maxlen: int | None = None, ttl_s: int | None = None) -> str:
        """XADD `entry` (with the current trace context if it has none); returns the entry id.

        maxlen: approximate cap (MAXLEN ~); ttl_s: (re)set the stream's expiry. Both default to
        the stream's policy: turn streams get `turn_maxlen` and `turn_ttl_s`, others neither."""
        default_ttl, default_maxlen = self._policy(stream)
        maxlen = default_maxlen if maxlen is None else maxlen
        ttl_s = default_ttl if ttl_s is None else ttl_s
        fields = entry.with_trace().encode()
        if not ttl_s:
            return _s(self.redis.xadd(stream, fields, maxlen=maxlen or None, approximate=True))
        pipe = self.redis.pipeline(transaction=True)  # the entry never exists without an expiry
        pipe.xadd(stream, fields, maxlen=maxlen or None, approximate=True)
        pipe.expire(stream, ttl_s)
        return _s(pipe.execute()[0])

    def publish(self, turn_id: str, kind: str, entry: Entry) -> str:
        """Add `entry` to the turn stream `turn:{turn_id}:{kind}` (capped, expiry refreshed)."""
        return self.add(self.turn_stream(turn_id, kind), entry)

    def submit(self, stream: str, job: Entry) -> str:
        """Add a job to a work stream; BacklogFull if it already holds `job_max_backlog` jobs."""
        try:
            return _s(self._submit(keys=[stream], args=[self.job_max_backlog, *_flat(job.with_trace().encode())]))
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
        published, entry_id = self._put_once(keys=[result_key, stream],
                                             args=[key_ttl, stream_ttl, maxlen, *fields])
        return bool(published), _s(entry_id)

    def refresh_turn(self, turn_id: str, ttl_s: int | None = None) -> None:
        """Push back the expiry of both turn streams (a reader still attached)."""
        pipe = self.redis.pipeline(transaction=False)
        for kind in TURN_KINDS:
            pipe.expire(self.turn_stream(turn_id, kind), ttl_s or self.turn_ttl_s)
        pipe.execute()

    def delete_turn(self, turn_id: str) -> None:
        self.redis.delete(*(self.turn_stream(turn_id, k) for k in TURN_KINDS))

    # ---- reading in order

    def read(self, streams: Mapping[str, str], block_ms: int | None = None,
             count: int | None = None) -> list[Message]:
        """Entries after the given ids (XREAD), in stream order; '0' reads from the start, '$'
        only what arrives from now. Waits up to `block_ms` for the first entry (None: no wait).
        To resume, pass the id of the last message seen for each stream."""
        self._check_block(block_ms)
        reply = self.redis.xread(dict(streams), count=count, block=block_ms)
        return [Message(_s(name), _s(eid), decode_entry(fields))
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

    def claim_next(self, stream: str, group: str, consumer: str, block_ms: int | None = None,
                   count: int = 1) -> list[Job]:
        """Up to `count` jobs never delivered to the group (XREADGROUP '>'), waiting up to
        `block_ms`. They stay pending for `consumer` until acked."""
        self._check_block(block_ms)
        reply = self.redis.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
        jobs = []
        for _name, entries in reply or []:
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

    def read_dead(self, stream: str, count: int = 100) -> list[tuple[Message, dict[str, str]]]:
        """Dead-lettered jobs of `stream`, oldest first, with their dead_* fields (operators)."""
        out = []
        for eid, fields in self.redis.xrange(self.dead_letter_stream(stream), count=count):
            meta = {_s(k): _s(v) for k, v in fields.items() if _s(k).startswith("dead_")}
            out.append((Message(self.dead_letter_stream(stream), _s(eid), decode_entry(fields)), meta))
        return out


# --------------------------------------------------------------------------- worker loop

Result = tuple[str, Entry, str]  # (stream, entry, result key)
Handler = Callable[[Job], Sequence[Result]]
# Batched: all jobs of one claim at once; per job, its results or the exception it failed with.
BatchHandler = Callable[[list[Job]], Sequence["Sequence[Result] | BaseException"]]


@dataclass
class WorkerStats:
    claimed: int = 0
    reclaimed: int = 0
    completed: int = 0        # jobs whose results were published and that were acked
    duplicates: int = 0       # results not published because a copy already was
    failed: int = 0           # handler raised; left pending for a retry
    dead_lettered: int = 0    # by PermanentError or by reclaim after max_deliveries


def _finish(bus: Bus, job: Job, outcome: "Sequence[Result] | BaseException", stats: WorkerStats,
            dead_lettered: Callable[[Job, str], None]) -> None:
    """Publish a job's results then ack it, or dead-letter / leave it pending on failure."""
    if isinstance(outcome, PermanentError):
        reason = f"{type(outcome).__name__}: {outcome}"
        bus.dead_letter(job, reason)
        dead_lettered(job, reason)
        return
    if isinstance(outcome, BaseException):
        # Left pending: after the visibility timeout some worker (maybe this one) reclaims it,
        # until max_deliveries sends it to the dead-letter stream.
        log.error("%s: handler failed on job %s (delivery %d)", job.stream, job.id, job.deliveries,
                  exc_info=outcome)
        stats.failed += 1
        return
    # Results first, ack last: a crash in between re-delivers the job, and the once-only keys
    # stop its results from being published twice. A result without a trace context continues
    # the current span (single-job mode) or, in a batch, the job's own trace.
    carrier = job.entry.trace_carrier()
    for stream, entry, key in outcome:
        published, _ = bus.put_result_once(key, stream, entry.with_trace(inject_context() or carrier))
        stats.duplicates += not published
    bus.ack(job)
    stats.completed += 1


def _job_attrs(job: Job) -> dict[str, Any]:
    return {"job.stream": job.stream, "job.id": job.id, "job.deliveries": job.deliveries,
            "turn.id": getattr(job.entry, "turn_id", "")}


def _run_jobs(bus: Bus, jobs: list[Job], handler: Callable, batched: bool, stats: WorkerStats,
              stage: str, dead_lettered: Callable[[Job, str], None]) -> None:
    if not batched:
        for job in jobs:
            with start_span(f"{stage}.job", parent_carrier=job.entry.trace_carrier(),
                            attributes=_job_attrs(job)):
                try:
                    outcome = handler(job)
                except Exception as e:
                    outcome = e
                _finish(bus, job, outcome, stats, dead_lettered)
        return
    # One span for the forward over the batch; each job's results continue that job's trace.
    with start_span(f"{stage}.batch", attributes={"batch.size": len(jobs)}):
        try:
            outcomes = list(handler(jobs))
            if len(outcomes) != len(jobs):
                raise BusError(f"batched handler returned {len(outcomes)} outcomes for {len(jobs)} jobs")
        except Exception as e:
            outcomes = [e] * len(jobs)
    for job, outcome in zip(jobs, outcomes):  # outside the span: results take the job's trace
        _finish(bus, job, outcome, stats, dead_lettered)


def run_worker(
    bus: Bus,
    stream: str,
    group: str,
    consumer: str,
    handler: "Handler | BatchHandler",
    stop_event: threading.Event,
    visibility_timeout_ms: int = 30000,
    block_ms: int = 1000,
    count: int = 1,
    reclaim_interval_ms: int = 5000,
    max_deliveries: int | None = None,
    on_dead_letter: Callable[[Job, str], None] | None = None,
    stage: str | None = None,
    batched: bool = False,
) -> WorkerStats:
    """Serve a work stream until `stop_event` is set; returns what it did.

    Each round: every `reclaim_interval_ms`, jobs idle for `visibility_timeout_ms` are
    reclaimed (and poison ones dead-lettered), else up to `count` new jobs are claimed, waiting
    at most `block_ms` (the stop check period). A claim returns at once with whatever is
    waiting, so batches fill up under load without adding latency when idle.

    `handler(job)` returns the job's results as (stream, entry, result_key); with
    `batched=True`, `handler(jobs)` gets all claimed jobs and returns, per job in order, its
    results or the exception it failed with. Results are published once each, then the job is
    acked. A handler exception leaves the job pending for a retry; a PermanentError
    dead-letters it at once. `on_dead_letter(job, reason)` runs for every dead-lettered job
    (e.g. to tell the turn that a chunk is lost).

    `visibility_timeout_ms` must exceed the longest handler run, or a slow job is also run by
    a second worker (harmless for the client thanks to the once-only results, wasted work).
    `worker_options(settings)` gives these timings from the settings.
    """
    stage = stage or stream.split(":")[-1]
    stats = WorkerStats()
    metrics = bus.metrics or get_metrics()

    def dead_lettered(job: Job, reason: str) -> None:
        stats.dead_lettered += 1
        if on_dead_letter is not None:
            on_dead_letter(job, reason)

    bus.ensure_group(stream, group)
    next_reclaim = 0.0
    backoff = 0.1
    while not stop_event.is_set():
        try:
            jobs: list[Job] = []
            now = time.monotonic()
            if now >= next_reclaim:
                next_reclaim = now + reclaim_interval_ms / 1000.0
                jobs = bus.reclaim_stale(stream, group, consumer, visibility_timeout_ms,
                                         count=count, max_deliveries=max_deliveries,
                                         on_dead_letter=dead_lettered)
                stats.reclaimed += len(jobs)
            if not jobs:
                jobs = bus.claim_next(stream, group, consumer, block_ms=block_ms, count=count)
                stats.claimed += len(jobs)
                for job in jobs:
                    metrics.record_queue_lag(stage, job.lag_ms)
            if jobs:
                try:
                    _run_jobs(bus, jobs, handler, batched, stats, stage, dead_lettered)
                except (redis.ConnectionError, redis.TimeoutError):
                    raise
                except Exception:  # publishing failed: the jobs stay pending for a retry
                    log.exception("%s: could not publish the results of jobs %s", stream,
                                  [j.id for j in jobs])
                    stats.failed += 1
            backoff = 0.1
        except redis.ResponseError as e:
            if "NOGROUP" in str(e):  # the stream was deleted (e.g. FLUSHALL): recreate, go on
                bus.ensure_group(stream, group)
                continue
            raise
        except (redis.ConnectionError, redis.TimeoutError) as e:
            log.warning("%s: redis unavailable (%s); retrying in %.1f s", stream, e, backoff)
            stop_event.wait(backoff)
            backoff = min(5.0, backoff * 2)
    return stats


def worker_options(settings: Any) -> dict[str, int]:
    """run_worker's timing keywords from `Settings.bus`."""
    b = settings.bus
    return {"visibility_timeout_ms": b.visibility_timeout_ms, "block_ms": b.block_ms,
            "reclaim_interval_ms": b.reclaim_interval_ms, "max_deliveries": b.max_deliveries}


def start_worker(bus: Bus, stream: str, group: str, consumer: str, handler: "Handler | BatchHandler",
                 stop_event: threading.Event, **kw: Any) -> threading.Thread:
    """`run_worker` on a daemon thread named after the consumer; its stats land in
    `thread.stats` when it returns."""
    def target() -> None:
        thread.stats = run_worker(bus, stream, group, consumer, handler, stop_event, **kw)  # type: ignore[attr-defined]

    thread = threading.Thread(target=target, name=f"worker-{consumer}", daemon=True)
    thread.stats = None  # type: ignore[attr-defined]
    thread.start()
    return thread
