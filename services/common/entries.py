"""Stream entries: the typed records the stages exchange on Redis Streams, and their codec.

Plain data (dataclasses, numpy payloads, a flat bytes field map per entry): no Redis client and
no tracing import, so model-side code (the LLM's publisher, benchmarks on a GPU machine) can
build the entries the serving path sends. services/common/bus.py writes and reads them."""
from __future__ import annotations

import dataclasses
import functools
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

SCHEMA_VERSION = 1
DECODER_JOBS = "jobs:decoder"
VOCODER_JOBS = "jobs:vocoder"
TURN_KINDS = ("llm", "audio", "events")


class BusError(RuntimeError):
    """A malformed entry, a misconfigured client, or a Redis reply the bus cannot use."""


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
        if carrier is None:
            from services.common.telemetry import inject_context   # only the writers need tracing
            carrier = inject_context()
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
    """New reply text of text segment `segment` (0-based), in generation order. tokens: the
    ids of the generated tokens this text shows (the history of an interrupted turn keeps the
    tokens of the text its caller got)."""

    turn_id: str
    segment: int
    text: str
    tokens: tuple[int, ...] = ()


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
    'complete'. text: the full reply text. tokens: the session's model history after the turn
    as int32 LE (prompt and reply as the next turn extends them), empty when not applicable.
    codes: int32, shape `codes_shape` = (frames, codebooks): one row per audio pad the reply
    added to `tokens` (the prompt's own rows are the caller's)."""

    turn_id: str
    reason: str
    text: str = ""
    tokens: bytes = field(default=b"", repr=False)
    codes: bytes = field(default=b"", repr=False)
    codes_shape: tuple[int, ...] = (0, 0)

    @classmethod
    def with_tokens(cls, turn_id: str, reason: str, tokens: Sequence[int], codes: Any = None,
                    **kw: Any) -> "TurnEnd":
        """codes: (frames, codebooks) integers; None or no rows: none."""
        data, shape = _pack(codes, "<i4") if codes is not None and len(codes) else (b"", (0, 0))
        return cls(turn_id=turn_id, reason=reason, tokens=_pack(list(tokens), "<i4")[0], codes=data,
                   codes_shape=shape, **kw)

    def token_list(self) -> list[int]:
        return _unpack(self.tokens, (len(self.tokens) // 4,), "<i4", "end.tokens").tolist()

    def codes_array(self) -> np.ndarray:
        return _unpack(self.codes, self.codes_shape, "<i4", "end.codes")

    def _check(self) -> None:
        if len(self.tokens) % 4:
            raise BusError(f"end entry of turn {self.turn_id}: tokens is not whole int32s")
        if len(self.codes_shape) != 2:
            raise BusError(f"end.codes_shape must be (frames, codebooks); got {self.codes_shape}")
        self.codes_array()


@dataclass(frozen=True)
class TurnError(Entry, type_name="error"):
    """The turn failed in `stage`. code: a google.rpc.Code value (errors.Status: INTERNAL,
    UNAVAILABLE, ...); message: what a person can act on. (segment, chunk) name the lost piece
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
