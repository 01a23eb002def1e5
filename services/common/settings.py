"""Service configuration: one typed `Settings`, from defaults, a YAML file and the environment.

Precedence, lowest first:

1. the defaults below (they run the whole stack on one machine without a GPU, on the tiny
   random checkpoint);
2. a YAML file: `Settings.load(path)`, or the file named by `BAICHUAN_AUDIO_CONFIG`
   (see config/example.yaml for every key);
3. plain environment variables that deployments commonly set:
       MODEL_PATH -> model.path             REDIS_URL -> redis.url
       REDIS_USERNAME -> redis.username     REDIS_PASSWORD -> redis.password
       OTEL_EXPORTER_OTLP_ENDPOINT -> telemetry.otlp_endpoint
       OTEL_SERVICE_NAME -> telemetry.service_name
4. prefixed environment variables, one per key, sections joined by double underscores:
       BAICHUAN_AUDIO__REDIS__URL=redis://redis:6379/0
       BAICHUAN_AUDIO__STAGES__LLM__MAX_REPLICAS=4
       BAICHUAN_AUDIO__LIMITS__MAX_AUDIO_SECONDS=120

Values from the environment are converted to the key's type (booleans: true/false/1/0/yes/no/
on/off). Unknown keys and bad values are errors that name the key and where it came from.
The Redis password is a secret: it is accepted only from the environment and never appears in
`repr`, `to_dict()` or logs.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit, urlunsplit

import yaml

ENV_PREFIX = "BAICHUAN_AUDIO__"
CONFIG_ENV = "BAICHUAN_AUDIO_CONFIG"
PLAIN_ENV: dict[str, tuple[str, ...]] = {
    "MODEL_PATH": ("model", "path"),
    "REDIS_URL": ("redis", "url"),
    "REDIS_USERNAME": ("redis", "username"),
    "REDIS_PASSWORD": ("redis", "password"),
    "OTEL_EXPORTER_OTLP_ENDPOINT": ("telemetry", "otlp_endpoint"),
    "OTEL_SERVICE_NAME": ("telemetry", "service_name"),
}
# Keys that may only come from the environment (a secret in a YAML file ends up in git).
ENV_ONLY = {("redis", "password")}
SECRET = {("redis", "password")}


class SettingsError(ValueError):
    """A configuration key that is unknown or has a value of the wrong type or range."""


# --------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class ModelSettings:
    path: str = ""                  # checkpoint directory; "" = build the tiny random checkpoint
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU

    @property
    def is_tiny(self) -> bool:
        return self.path == ""


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    username: str = ""
    password: str = field(default="", repr=False)  # environment only; never logged
    connect_timeout_s: float = 5.0

    def redacted_url(self) -> str:
        """The URL with any password in it replaced by '***'."""
        return _redact_url(self.url)

    def __repr__(self) -> str:
        return (f"RedisSettings(url={self.redacted_url()!r}, username={self.username!r}, "
                f"password={'***' if self.password else ''!r}, "
                f"connect_timeout_s={self.connect_timeout_s!r})")


@dataclass(frozen=True)
class StageSettings:
    """One Ray Serve deployment. Replicas autoscale between min and max."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0  # autoscaling target per replica
    num_cpus: float = 0.25                # Ray CPU share; the defaults fit five stages on 2 cores
    num_gpus: float = 0.0                 # a share of one GPU (0.5 = two replicas per card)
    max_batch_size: int = 8               # requests (jobs) merged into one forward
    batch_wait_timeout_s: float = 0.01    # how long a partial batch waits for more requests


@dataclass(frozen=True)
class StagesSettings:
    tokenizer: StageSettings = field(default_factory=StageSettings)
    llm: StageSettings = field(default_factory=lambda: StageSettings(max_batch_size=16))
    decoder: StageSettings = field(default_factory=StageSettings)
    vocoder: StageSettings = field(default_factory=StageSettings)
    orchestrator: StageSettings = field(default_factory=lambda: StageSettings(max_batch_size=1))


@dataclass(frozen=True)
class LimitsSettings:
    max_audio_seconds: float = 600.0      # longest user audio accepted per turn
    max_text_chars: int = 4000            # longest typed turn / TTS text
    max_sessions: int = 1000              # live sessions; more is RESOURCE_EXHAUSTED
    session_ttl_s: int = 1800             # session (and its turn streams) expire after idle
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC send/receive cap
    # per-turn caps on generation (LLM stage, gRPC and conversation paths alike); reaching one
    # ends the turn with reason "length". The KV budget per slot (llm.*) is a further bound.
    max_new_tokens: int = 8192            # tokens generated per turn: text tokens + one audio pad per frame
    max_audio_frames: int = 7500          # 12.5 Hz audio frames generated per turn (600 s)


@dataclass(frozen=True)
class LLMEngineSettings:
    kv_budget_tokens: int = 65536         # KV-cache capacity shared by all slots, in tokens
    max_slots: int = 16                   # sequences decoded together in one step
    prefill_chunk_tokens: int = 512       # long prompts are prefilled in chunks of this size
    # attention on CUDA: sdpa (fused kernels, faster) or math (the reference's numerics: fp32
    # scores; the only choice whose CUDA-graph replay equals eager execution bit for bit)
    attention: Literal["sdpa", "math"] = "sdpa"


@dataclass(frozen=True)
class DecoderSettings:
    """Low-latency audio: the first segment is decoded in growing chunks (12.5 Hz frames)."""

    first_chunk_frames: int = 4           # 320 ms of audio in the first chunk
    chunk_growth: float = 2.0             # each next chunk is this many times longer
    max_chunk_frames: int = 50            # ... up to this size


@dataclass(frozen=True)
class BusSettings:
    """Redis Streams bus (services/common/bus.py)."""

    turn_stream_maxlen: int = 20000       # approximate cap on entries per turn stream
    job_max_backlog: int = 10000          # submitting beyond this many waiting jobs fails
    visibility_timeout_ms: int = 30000    # a job unacked this long is re-claimed by another replica
    max_deliveries: int = 3               # then it goes to the dead-letter stream
    block_ms: int = 1000                  # blocking read timeout (also the stop-check period)
    reclaim_interval_ms: int = 5000       # how often a worker looks for stale jobs


@dataclass(frozen=True)
class TelemetrySettings:
    exporter: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str = ""               # e.g. http://otel-collector:4317; "" = exporter default
    service_name: str = "baichuan-audio"
    metrics_interval_s: float = 60.0


@dataclass(frozen=True)
class ServingSettings:
    host: str = "0.0.0.0"
    grpc_port: int = 9000
    reflection: bool = True               # gRPC server reflection (grpcurl, grpc_cli)


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    stages: StagesSettings = field(default_factory=StagesSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    llm: LLMEngineSettings = field(default_factory=LLMEngineSettings)
    decoder: DecoderSettings = field(default_factory=DecoderSettings)
    bus: BusSettings = field(default_factory=BusSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    serving: ServingSettings = field(default_factory=ServingSettings)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None,
             env: Mapping[str, str] | None = None) -> "Settings":
        """Defaults, then the YAML file (`path`, else $BAICHUAN_AUDIO_CONFIG, else none), then
        the environment (`env`, default os.environ). Raises SettingsError naming the bad key."""
        env = os.environ if env is None else env
        origins: dict[tuple[str, ...], str] = {}
        data: dict[str, Any] = {}
        if path is None and env.get(CONFIG_ENV):
            path = env[CONFIG_ENV]
        if path is not None:
            data = _read_yaml(Path(path))
            _walk_yaml(cls, data, (), str(path), origins)
        for name, keypath in PLAIN_ENV.items():
            if name in env:
                _set(data, keypath, _from_string(cls, keypath, env[name], f"environment variable {name}"))
                origins[keypath] = f"environment variable {name}"
        for name in sorted(env):  # sorted: the same error whatever the dict order
            if not name.startswith(ENV_PREFIX):
                continue
            keypath = tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__"))
            src = f"environment variable {name}"
            _lookup_type(cls, keypath, src)  # unknown key -> error
            _set(data, keypath, _from_string(cls, keypath, env[name], src))
            origins[keypath] = src
        settings = _merge(cls(), data)
        _validate(settings, origins)
        return settings

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict for logging: secrets removed, URL passwords redacted."""
        d = dataclasses.asdict(self)
        for keypath in SECRET:
            _set(d, keypath, "***" if _get(d, keypath) else "")
        d["redis"]["url"] = self.redis.redacted_url()
        return d


# --------------------------------------------------------------------------- loading

def _redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SettingsError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dotted(keypath: tuple[str, ...]) -> str:
    return ".".join(keypath)


def _lookup_type(cls: type, keypath: tuple[str, ...], source: str) -> Any:
    """The declared type of `keypath` under `cls`; SettingsError naming `source` if unknown."""
    t: Any = cls
    for i, part in enumerate(keypath):
        if not (dataclasses.is_dataclass(t) and part in _hints(t)):
            where = _dotted(keypath[:i]) or "the top level"
            known = ", ".join(_hints(t)) if dataclasses.is_dataclass(t) else "(none: it is a value)"
            raise SettingsError(
                f"{source}: unknown key {_dotted(keypath)!r} ({part!r} is not a key of {where}; "
                f"known: {known})")
        t = _hints(t)[part]
    return t


def _walk_yaml(cls: type, data: dict, prefix: tuple[str, ...], source: str,
               origins: dict[tuple[str, ...], str]) -> None:
    """Check every YAML key exists and every leaf has the right type; record where it came from."""
    hints = _hints(cls)
    for key, value in data.items():
        keypath = prefix + (str(key),)
        if key not in hints:
            known = ", ".join(hints)
            raise SettingsError(f"{source}: unknown key {_dotted(keypath)!r} (known under "
                                f"{_dotted(prefix) or 'the top level'}: {known})")
        t = hints[key]
        if keypath in ENV_ONLY:
            env_name = next(n for n, k in PLAIN_ENV.items() if k == keypath)
            raise SettingsError(
                f"{source}: {_dotted(keypath)} must not be in a file (it is a secret); set the "
                f"environment variable {env_name} or {ENV_PREFIX}{'__'.join(keypath).upper()}")
        if dataclasses.is_dataclass(t):
            if value is None:
                data[key] = {}
                continue
            if not isinstance(value, dict):
                raise SettingsError(f"{source}: {_dotted(keypath)} must be a mapping of keys, "
                                    f"got {value!r}")
            _walk_yaml(t, value, keypath, source, origins)
        else:
            data[key] = _check_value(t, value, keypath, source)
            origins[keypath] = source


def _check_value(t: Any, value: Any, keypath: tuple[str, ...], source: str) -> Any:
    """A YAML value of the declared type `t` (ints accepted for floats, nothing else coerced)."""
    key = _dotted(keypath)
    if typing.get_origin(t) is Literal:
        choices = typing.get_args(t)
        if value not in choices:
            raise SettingsError(f"{source}: {key} must be one of {', '.join(map(str, choices))}; "
                                f"got {value!r}")
        return value
    if t is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{source}: {key} must be true or false; got {value!r}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{source}: {key} must be an integer; got {value!r}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{source}: {key} must be a number; got {value!r}")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise SettingsError(f"{source}: {key} must be a string (quote it in YAML); got {value!r}")
        return value
    raise SettingsError(f"{source}: {key} has an unsupported type {t!r}")  # a bug in this file


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _from_string(cls: type, keypath: tuple[str, ...], raw: str, source: str) -> Any:
    """An environment string converted to the declared type of `keypath`."""
    t = _lookup_type(cls, keypath, source)
    key = _dotted(keypath)
    if dataclasses.is_dataclass(t):
        raise SettingsError(f"{source}: {key} is a section, not a value; set one of its keys "
                            f"({', '.join(_hints(t))})")
    s = raw.strip()
    try:
        if t is bool:
            if s.lower() in _TRUE:
                return True
            if s.lower() in _FALSE:
                return False
            raise ValueError
        if t is int:
            return int(s, 10)
        if t is float:
            return float(s)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}[t]
        raise SettingsError(f"{source}: {key} must be {kind}; got {raw!r}") from None
    return _check_value(t, raw, keypath, source)  # str and Literal: the raw string itself


def _set(d: dict, keypath: tuple[str, ...], value: Any) -> None:
    for part in keypath[:-1]:
        d = d.setdefault(part, {})
    d[keypath[-1]] = value


def _get(d: dict, keypath: tuple[str, ...]) -> Any:
    for part in keypath:
        d = d[part]
    return d


def _merge(base: Any, data: dict) -> Any:
    """`base` (a dataclass instance) with the values of the checked nested dict `data` replaced,
    recursively; keys not given keep their defaults (including per-stage default factories)."""
    changes = {}
    for k, v in data.items():
        cur = getattr(base, k)
        changes[k] = _merge(cur, v or {}) if dataclasses.is_dataclass(cur) else v
    return dataclasses.replace(base, **changes)


# --------------------------------------------------------------------------- validation

def _validate(s: Settings, origins: dict[tuple[str, ...], str]) -> None:
    def fail(keypath: tuple[str, ...], msg: str) -> None:
        src = origins.get(keypath, "default")
        raise SettingsError(f"{src}: {_dotted(keypath)} {msg}")

    def positive(section: str, obj: Any, *names: str, allow_zero: bool = False) -> None:
        for n in names:
            v = getattr(obj, n)
            if v < 0 or (v == 0 and not allow_zero):
                fail(tuple(section.split(".")) + (n,), f"must be {'>= 0' if allow_zero else '> 0'}; got {v!r}")

    for name in _hints(StagesSettings):
        st: StageSettings = getattr(s.stages, name)
        sec = f"stages.{name}"
        positive(sec, st, "min_replicas", "num_cpus", "num_gpus", "batch_wait_timeout_s", allow_zero=True)
        positive(sec, st, "max_replicas", "max_batch_size", "target_ongoing_requests")
        if st.min_replicas > st.max_replicas:
            fail(("stages", name, "min_replicas"),
                 f"({st.min_replicas}) is larger than stages.{name}.max_replicas ({st.max_replicas})")
        if st.num_gpus > 1 and st.num_gpus != int(st.num_gpus):
            fail(("stages", name, "num_gpus"), f"must be a share <= 1 or a whole number; got {st.num_gpus}")
    positive("limits", s.limits, "max_audio_seconds", "max_text_chars", "max_sessions", "session_ttl_s",
             "max_message_bytes", "max_new_tokens", "max_audio_frames")
    positive("llm", s.llm, "kv_budget_tokens", "max_slots", "prefill_chunk_tokens")
    positive("decoder", s.decoder, "first_chunk_frames", "max_chunk_frames")
    if s.decoder.chunk_growth < 1:
        fail(("decoder", "chunk_growth"), f"must be >= 1; got {s.decoder.chunk_growth}")
    if s.decoder.first_chunk_frames > s.decoder.max_chunk_frames:
        fail(("decoder", "first_chunk_frames"),
             f"({s.decoder.first_chunk_frames}) is larger than decoder.max_chunk_frames "
             f"({s.decoder.max_chunk_frames})")
    positive("bus", s.bus, "turn_stream_maxlen", "job_max_backlog", "visibility_timeout_ms",
             "max_deliveries", "block_ms", "reclaim_interval_ms")
    if s.bus.block_ms >= s.bus.visibility_timeout_ms:
        fail(("bus", "block_ms"), f"({s.bus.block_ms}) must be shorter than bus.visibility_timeout_ms "
                                  f"({s.bus.visibility_timeout_ms})")
    positive("telemetry", s.telemetry, "metrics_interval_s")
    positive("redis", s.redis, "connect_timeout_s")
    if not 1 <= s.serving.grpc_port <= 65535:
        fail(("serving", "grpc_port"), f"must be a TCP port 1..65535; got {s.serving.grpc_port}")
    scheme = urlsplit(s.redis.url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        fail(("redis", "url"), f"must start with redis://, rediss:// or unix://; got {s.redis.redacted_url()!r}")
