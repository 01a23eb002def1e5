"""Stream entries: the typed records the stages exchange on Redis Streams, and their codec.

Plain data (dataclasses, array payloads, a flat bytes field map per entry): no Redis client and
no tracing import, so model-side code (the LLM's publisher, benchmarks on a GPU machine) can
build the entries the serving path sends. services/common/bus.py writes and reads them.

The field encoding is explicit (no pickle): str as UTF-8, numbers in decimal, bools as 1/0, and
every array (codes, mel, tokens, PCM) as one `Array` in three fields: `{name}` (raw
little-endian bytes, row-major), `{name}_dtype` ('<i4') and `{name}_shape` ('3,8')."""
from __future__ import annotations

import dataclasses
import functools
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

SCHEMA_VERSION = 2        # 2: every array carries its dtype (`{name}_dtype`); tokens and PCM are arrays
DECODER_JOBS = "jobs:decoder"
VOCODER_JOBS = "jobs:vocoder"
URGENT = ":urgent"


def urgent_lane(stream: str) -> str:
    """`jobs:{stage}:urgent`: the lane of a work stream whose jobs a worker takes first. A turn's
    first piece of audio travels in it through the decoder and the vocoder, so a new turn's
    first audio does not queue behind the later chunks of running turns, which a player has
    buffered audio for."""
    return stream if stream.endswith(URGENT) else stream + URGENT


def lanes(stream: str) -> tuple[str, str]:
    """(urgent lane, stream): a work stream's lanes in the order a worker serves them."""
    return urgent_lane(stream), stream


def next_lane(job_stream: str, next_stream: str) -> str:
    """The next stage's lane for a job's result: urgent work stays urgent."""
    return urgent_lane(next_stream) if job_stream.endswith(URGENT) else next_stream
TURN_KINDS = ("llm", "audio", "events")


class BusError(RuntimeError):
    """A malformed entry, a misconfigured client, or a Redis reply the bus cannot use."""


class PermanentError(Exception):
    """Raised by a worker handler for a job that can never succeed (bad input): the job is
    dead-lettered at once instead of being retried until `max_deliveries`."""


# --------------------------------------------------------------------------- arrays

INT16, INT32, FLOAT32 = "<i2", "<i4", "<f4"


@dataclass(frozen=True)
class Array:
    """An n-d array payload: `data` holds `shape` of `dtype` (a little-endian numpy dtype
    string such as '<i4'), row-major. Entries declare the dtype and dimensions of each array
    field (`array_field`) and check them when built or decoded."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes = field(repr=False)

    @classmethod
    def of(cls, values: Any, dtype: str) -> "Array":
        """`values` (numpy array, torch tensor on any device, nested lists) as `dtype`."""
        if hasattr(values, "detach"):  # a torch tensor, without importing torch here
            values = values.detach().cpu().numpy()
        src = np.asarray(values)
        dt = np.dtype(dtype)
        if dt.kind in "iu" and src.size and src.dtype.kind not in "iub":
            raise BusError(f"integer payload expected (codes, token ids); got {src.dtype} values")
        a = np.ascontiguousarray(src, dtype=dt)
        return cls(dt.str, tuple(int(n) for n in a.shape), a.tobytes())

    def check(self, what: str, dtype: str | None = None, dims: Sequence[str] | None = None) -> None:
        """Raise BusError naming `what` unless `data` holds `shape` of `dtype`, and the dtype
        and number of dimensions are the expected ones (when given)."""
        try:
            dt = np.dtype(self.dtype)
        except (TypeError, ValueError):
            dt = None
        if dt is None or dt.str != self.dtype or dt.kind not in "iuf":
            raise BusError(f"{what} has dtype {self.dtype!r}; expected a little-endian number type "
                           f"such as {dtype or INT32!r}")
        if dtype is not None and self.dtype != dtype:
            raise BusError(f"{what} has dtype {self.dtype!r}; expected {dtype!r}")
        if dims is not None and len(self.shape) != len(dims):
            raise BusError(f"{what} must be ({', '.join(dims)}); got shape {self.shape}")
        if any(n < 0 for n in self.shape):
            raise BusError(f"{what} has a negative dimension in shape {self.shape}")
        n = int(np.prod(self.shape)) if self.shape else 1
        if len(self.data) != n * dt.itemsize:
            raise BusError(f"{what}: {len(self.data)} bytes do not hold shape {self.shape} of {dt.name} "
                           f"({n * dt.itemsize} bytes)")

    def numpy(self) -> np.ndarray:
        """A read-only view of the payload."""
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape)

    def tensor(self, dtype: str | None = None) -> Any:
        """A writable torch tensor copy, as numpy dtype `dtype` (e.g. 'int64') when given."""
        import torch  # only the stages that compute need torch; readers of entries do not

        return torch.from_numpy(np.array(self.numpy(), dtype=dtype))


def array_field(dtype: str, *dims: str, **kw: Any) -> Any:
    """A dataclass field of an entry holding an Array of `dtype` with the named dimensions."""
    return field(metadata={"array": (dtype, dims)}, **kw)


NO_TOKENS = Array(INT32, (0,), b"")        # the empty defaults of token and code fields
NO_CODES = Array(INT32, (0, 0), b"")


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

    def __post_init__(self) -> None:
        for name, (dtype, dims) in _arrays(type(self)).items():
            getattr(self, name).check(f"{self.TYPE}.{name}", dtype, dims)

    def encode(self) -> dict[bytes, bytes]:
        """The flat field map written with XADD: `type`, `v`, then every field (three per
        array: the bytes, `{name}_dtype` and `{name}_shape`)."""
        out = {b"type": self.TYPE.encode(), b"v": str(SCHEMA_VERSION).encode()}
        for name, t in _fields(type(self)).items():
            value = getattr(self, name)
            if t is Array:
                out[name.encode()] = value.data
                out[f"{name}_dtype".encode()] = _CODECS[str][0](value.dtype)
                out[f"{name}_shape".encode()] = _CODECS[tuple[int, ...]][0](value.shape)
            else:
                out[name.encode()] = _CODECS[t][0](value)
        return out

    def _check(self) -> None:
        """Raise BusError if the fields are inconsistent; run on decode (arrays are checked
        whenever an entry is built)."""

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
        if t not in _CODECS and t is not Array:
            raise TypeError(f"{cls.__name__}.{f.name}: type {t} has no stream encoding")
        if (t is Array) != ("array" in f.metadata):
            raise TypeError(f"{cls.__name__}.{f.name}: an Array field is declared with array_field")
        out[f.name] = t
    return out


@functools.cache
def _arrays(cls: type) -> dict[str, tuple[str, tuple[str, ...]]]:
    """(dtype, dimension names) of each Array field of `cls`."""
    return {f.name: f.metadata["array"] for f in dataclasses.fields(cls) if "array" in f.metadata}


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

    def value(name: str, t: Any) -> Any:
        try:
            return _CODECS[t][1](raw[name])
        except (ValueError, KeyError, UnicodeDecodeError):
            raise BusError(f"{type_name} entry field {name!r} is not a valid {getattr(t, '__name__', t)}: "
                           f"{raw[name][:40]!r}") from None

    for name, t in _fields(cls).items():
        wire = (name, f"{name}_dtype", f"{name}_shape") if t is Array else (name,)
        if name in defaults and not any(w in raw for w in wire):
            continue
        for w in wire:
            if w not in raw:
                raise BusError(f"{type_name} entry lacks field {w!r}")
        if t is Array:
            kwargs[name] = Array(value(wire[1], str), value(wire[2], tuple[int, ...]), raw[name])
        else:
            kwargs[name] = value(name, t)
    entry = cls(**kwargs)  # checks the arrays
    entry._check()
    return entry


# Work items ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class AudioPieceJob(Entry):
    """What the decode and vocode jobs of one piece of audio share (each adds its array).

    turn_id, segment, chunk: identify the piece; chunk is 0 for a whole segment (faithful mode).
    final: this is the last chunk of the segment (carried on to its PcmChunk).
    context_frames: leading frames of the array that are left context already decoded by the
        previous chunk (0 in faithful mode): synthesised for continuity, then dropped.
    seed: the noise seed of this piece (CFM noise, vocoder source noise; 0 = random).
    session_id: the session, for routing and logs.
    """

    turn_id: str
    segment: int
    chunk: int
    final: bool = field(default=True, kw_only=True)
    context_frames: int = field(default=0, kw_only=True)
    seed: int = field(default=0, kw_only=True)
    session_id: str = field(default="", kw_only=True)


@dataclass(frozen=True)
class DecodeJob(AudioPieceJob, type_name="decode_job"):
    """Codes of one audio segment (or low-latency chunk) to decode to mel (jobs:decoder).
    codes: int32 (frames, codebooks)."""

    codes: Array = array_field(INT32, "frames", "codebooks")

    @classmethod
    def from_codes(cls, turn_id: str, segment: int, chunk: int, codes: Any, **kw: Any) -> "DecodeJob":
        """`codes`: (frames, codebooks) integer array or tensor."""
        return cls(turn_id=turn_id, segment=segment, chunk=chunk, codes=Array.of(codes, INT32), **kw)


@dataclass(frozen=True)
class VocodeJob(AudioPieceJob, type_name="vocode_job"):
    """A mel spectrogram to turn into 24 kHz audio (jobs:vocoder), from the DecodeJob of the
    same piece. mel: float32 (n_mels, frames)."""

    mel: Array = array_field(FLOAT32, "n_mels", "frames")

    @classmethod
    def from_mel(cls, turn_id: str, segment: int, chunk: int, mel: Any, **kw: Any) -> "VocodeJob":
        """`mel`: (n_mels, frames) float array or tensor."""
        return cls(turn_id=turn_id, segment=segment, chunk=chunk, mel=Array.of(mel, FLOAT32), **kw)


# Turn events (turn:{id}:llm and turn:{id}:audio) -------------------------------------------

@dataclass(frozen=True)
class TextDelta(Entry, type_name="text"):
    """New reply text of text segment `segment` (0-based), in generation order. tokens: the
    ids of the generated tokens this text shows (the history of an interrupted turn keeps the
    tokens of the text its caller got)."""

    turn_id: str
    segment: int
    text: str
    tokens: Array = array_field(INT32, "tokens", default=NO_TOKENS)


@dataclass(frozen=True)
class PcmChunk(Entry, type_name="pcm"):
    """A piece of reply audio: mono int16 samples at `sample_rate`.
    (segment, chunk) orders it within the turn; `final` marks the segment's last chunk."""

    turn_id: str
    segment: int
    chunk: int
    pcm16: Array = array_field(INT16, "samples")
    sample_rate: int
    final: bool = True

    @classmethod
    def from_pcm16(cls, turn_id: str, segment: int, chunk: int, pcm16: bytes, sample_rate: int,
                   **kw: Any) -> "PcmChunk":
        """`pcm16`: mono little-endian int16 bytes (audio.to_pcm16)."""
        return cls(turn_id=turn_id, segment=segment, chunk=chunk, sample_rate=sample_rate,
                   pcm16=Array(INT16, (len(pcm16) // 2,), bytes(pcm16)), **kw)

    @property
    def samples(self) -> int:
        return self.pcm16.shape[0]


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
    'complete'. text: the full reply text. tokens: the session's model history after the turn,
    int32 (prompt and reply as the next turn extends them), empty when not applicable.
    codes: int32 (frames, codebooks): one row per audio pad the reply added to `tokens` (the
    prompt's own rows are the caller's); (0, 0) when there are none."""

    turn_id: str
    reason: str
    text: str = ""
    tokens: Array = array_field(INT32, "tokens", default=NO_TOKENS)
    codes: Array = array_field(INT32, "frames", "codebooks", default=NO_CODES)

    @classmethod
    def with_tokens(cls, turn_id: str, reason: str, tokens: Sequence[int], codes: Any = None,
                    **kw: Any) -> "TurnEnd":
        """codes: (frames, codebooks) integers; None or no rows: none."""
        rows = Array.of(codes, INT32) if codes is not None and len(codes) else NO_CODES
        return cls(turn_id=turn_id, reason=reason, tokens=Array.of(list(tokens), INT32), codes=rows, **kw)


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
class StreamEntry:
    """An entry read from a stream, with its id (pass it back to `read` to resume after it)."""

    stream: str
    id: str
    entry: Entry


@dataclass(frozen=True)
class Job(StreamEntry):
    """An entry claimed from a work stream by `consumer` of `group`.
    deliveries: how many times Redis has delivered it (1 on first claim)."""

    group: str = ""
    consumer: str = ""
    deliveries: int = 1

    @property
    def lag_ms(self) -> float:
        """Time between the XADD of the job and now (queue lag on first delivery)."""
        return max(0.0, time.time() * 1000.0 - id_ms(self.id))
