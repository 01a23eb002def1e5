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
       BAICHUAN_AUDIO_API_KEYS -> auth.api_keys
       BAICHUAN_AUDIO_INTERNAL_KEYS -> auth.internal_keys
4. prefixed environment variables, one per key, sections joined by double underscores:
       BAICHUAN_AUDIO__REDIS__URL=redis://redis:6379/0
       BAICHUAN_AUDIO__STAGES__LLM__MAX_REPLICAS=4
       BAICHUAN_AUDIO__LIMITS__MAX_AUDIO_SECONDS=120

The sections are pydantic models and the sources are pydantic-settings' (environment with a
prefix and a nested delimiter, YAML file, defaults merged key by key). Values in the file must
have the key's type (an integer is fine for a number); values from the environment are
converted to it (booleans: true/false/1/0/yes/no/on/off). Unknown keys and bad values are
errors (SettingsError) that name the key and where it came from. The Redis password and the
API keys are secrets: they are accepted only from the environment (or, for keys, a file the
settings name, such as a mounted Secret) and never appear in `repr`, `to_dict()` or logs. `Settings()` is the defaults alone; `Settings.load()` reads the file and environment.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Optional, get_args
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

from services.common.audio_limits import DEFAULT_AUDIO_LIMITS as _AUDIO

ENV_PREFIX = "BAICHUAN_AUDIO__"
CONFIG_ENV = "BAICHUAN_AUDIO_CONFIG"
PLAIN_ENV: dict[str, tuple[str, ...]] = {   # every key here is a string: taken as is
    "MODEL_PATH": ("model", "path"),
    "REDIS_URL": ("redis", "url"),
    "REDIS_USERNAME": ("redis", "username"),
    "REDIS_PASSWORD": ("redis", "password"),
    "OTEL_EXPORTER_OTLP_ENDPOINT": ("telemetry", "otlp_endpoint"),
    "OTEL_SERVICE_NAME": ("telemetry", "service_name"),
    "BAICHUAN_AUDIO_API_KEYS": ("auth", "api_keys"),
    "BAICHUAN_AUDIO_INTERNAL_KEYS": ("auth", "internal_keys"),
}
# Keys that may only come from the environment (a secret in a YAML file ends up in git).
ENV_ONLY = {("redis", "password"), ("auth", "api_keys"), ("auth", "internal_keys")}


# The name of an API key (the caller's identity): services/common/auth.py checks the keys.
IDENTITY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
IDENTITY_RULE = "1-64 of A-Z a-z 0-9 _ -, starting with a letter or digit"


class SettingsError(ValueError):
    """A configuration key that is unknown or has a value of the wrong type or range."""


def _rule(holds: Callable[[Any], bool], text: str) -> AfterValidator:
    """A check on a key's converted value; the message names the value as the key holds it."""
    def check(value: Any) -> Any:
        if not holds(value):
            raise ValueError(f"{text}; got {value!r}")
        return value
    return AfterValidator(check)


Positive = _rule(lambda v: v > 0, "must be > 0")
NonNegative = _rule(lambda v: v >= 0, "must be >= 0")
AtLeastOne = _rule(lambda v: v >= 1, "must be >= 1")
GpuShare = _rule(lambda v: v <= 1 or v == int(v), "must be a share <= 1 or a whole number")
TcpPort = _rule(lambda v: 1 <= v <= 65535, "must be a TCP port 1..65535")


def _redis_url(url: str) -> str:
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"must start with redis://, rediss:// or unix://; got {_redact_url(url)!r}")
    return url


class _Section(BaseModel):
    # strict: a file value must already have the key's type (no "1" for 1, no 1 for true)
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


# --------------------------------------------------------------------------- sections

class ModelSettings(_Section):
    path: str = ""                  # checkpoint directory; "" = build the tiny random checkpoint
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU

    @property
    def is_tiny(self) -> bool:
        return self.path == ""


class RedisSettings(_Section):
    url: Annotated[str, AfterValidator(_redis_url)] = "redis://127.0.0.1:6379/0"  # rediss:// for TLS
    username: str = ""              # an ACL user (Redis 6+); "" = the default user
    password: str = ""              # environment only; never logged
    connect_timeout_s: Annotated[float, Positive] = 5.0
    # how long one command may wait for Redis's answer: a Redis that stopped answering fails
    # calls with UNAVAILABLE after this, instead of hanging them (bus.block_ms stays below it)
    socket_timeout_s: Annotated[float, Positive] = 3.0
    # TLS (rediss:// only): files, e.g. from a mounted Secret; the files are not secrets' values
    tls_ca_file: str = ""           # CA bundle that signed the server's certificate; "" = the system's
    tls_cert_file: str = ""         # client certificate, for servers that require mutual TLS
    tls_key_file: str = ""          # its private key

    def redacted_url(self) -> str:
        """The URL with any password in it replaced by '***'."""
        return _redact_url(self.url)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of `redis.Redis.from_url` for these settings: the ACL user,
        password and TLS files (the URL's scheme switches TLS on)."""
        opts: dict[str, Any] = {"username": self.username or None, "password": self.password or None,
                                "socket_connect_timeout": self.connect_timeout_s,
                                "socket_timeout": self.socket_timeout_s}
        if urlsplit(self.url).scheme == "rediss":
            opts.update(ssl_cert_reqs="required", ssl_ca_certs=self.tls_ca_file or None,
                        ssl_certfile=self.tls_cert_file or None, ssl_keyfile=self.tls_key_file or None)
        return opts

    def __repr_args__(self):
        yield "url", self.redacted_url()
        yield "username", self.username
        yield "password", "***" if self.password else ""
        yield "connect_timeout_s", self.connect_timeout_s
        yield "socket_timeout_s", self.socket_timeout_s
        yield "tls_ca_file", self.tls_ca_file
        yield "tls_cert_file", self.tls_cert_file
        yield "tls_key_file", self.tls_key_file


class StageSettings(_Section):
    """One Ray Serve deployment. Replicas autoscale between min and max."""

    min_replicas: Annotated[int, NonNegative] = 1
    max_replicas: Annotated[int, Positive] = 1
    target_ongoing_requests: Annotated[float, Positive] = 2.0  # autoscaling target per replica
    num_cpus: Annotated[float, NonNegative] = 0.25    # Ray CPU share; the defaults fit five stages on 2 cores
    num_gpus: Annotated[float, NonNegative, GpuShare] = 0.0  # a share of one GPU (0.5 = two replicas per card)
    max_batch_size: Annotated[int, Positive] = 8      # requests (jobs) merged into one forward
    batch_wait_timeout_s: Annotated[float, NonNegative] = 0.01  # how long a partial batch waits for more requests


# Stages whose defaults differ are their own types, so that a file or variable setting one key
# of such a stage keeps the stage's other defaults.
class LLMStageSettings(StageSettings):
    max_batch_size: Annotated[int, Positive] = 16


class OrchestratorStageSettings(StageSettings):
    max_batch_size: Annotated[int, Positive] = 1


class AutoscalingSettings(_Section):
    """How often Serve measures the load of the stages that autoscale (max_replicas >
    min_replicas); Serve's defaults. Their delays are per application (orchestrator/app.py)."""

    metrics_interval_s: Annotated[float, Positive] = 10.0   # replicas report their load this often
    look_back_period_s: Annotated[float, Positive] = 30.0   # ... averaged over this window


class StagesSettings(_Section):
    tokenizer: StageSettings = StageSettings()
    llm: LLMStageSettings = LLMStageSettings()
    decoder: StageSettings = StageSettings()
    vocoder: StageSettings = StageSettings()
    orchestrator: OrchestratorStageSettings = OrchestratorStageSettings()


class LimitsSettings(_Section):
    # user audio accepted per turn (defaults in services/common/audio_limits.py): duration,
    # decoded samples (checked from a file's header before decoding) and the sample-rate range
    max_audio_seconds: Annotated[float, Positive] = _AUDIO.max_seconds
    max_audio_samples: Annotated[int, Positive] = _AUDIO.max_samples
    min_audio_sample_rate: Annotated[int, Positive] = _AUDIO.min_sample_rate
    max_audio_sample_rate: Annotated[int, Positive] = _AUDIO.max_sample_rate
    max_text_chars: Annotated[int, Positive] = 4000         # longest typed turn / TTS text
    max_system_prompt_chars: Annotated[int, Positive] = 2000  # longest session system prompt
    # what a session's history keeps (orchestrator/conversation.py, "History limits"): its last
    # turns, their audio, and room in the model's context; older turns are dropped
    max_history_turns: Annotated[int, Positive] = 50         # turns kept (a prompt: at most this - 1 earlier ones)
    max_history_audio_seconds: Annotated[float, Positive] = 1200.0  # audio (user + assistant) a faithful history keeps
    reply_reserve_tokens: Annotated[int, Positive] = 1024    # context left free for the reply
    # once the context is full, the share of it the history is trimmed to
    context_trim_to: Annotated[float, Positive, _rule(lambda v: v <= 1, "must be <= 1")] = 0.5
    max_sessions: Annotated[int, Positive] = 1000           # live sessions; more is RESOURCE_EXHAUSTED
    # admission control: turns (Converse, Transcribe, Synthesize) running at once in the whole
    # stack; a new one beyond it is refused at once (RESOURCE_EXHAUSTED, retry after 1 s) rather
    # than slowing every running turn. Default: what one LLM replica decodes together
    # (llm.max_slots); measure your stack with `baichuan-audio load` and set it there.
    max_running_turns: Annotated[int, Positive] = 16
    session_ttl_s: Annotated[int, Positive] = 1800          # session (and its turn streams) expire after idle
    max_message_bytes: Annotated[int, Positive] = 64 * 1024 * 1024  # gRPC send/receive cap
    # per-turn caps on generation (LLM stage, gRPC and conversation paths alike); reaching one
    # ends the turn with reason "length". The KV budget per slot (llm.*) is a further bound.
    max_new_tokens: Annotated[int, Positive] = 8192  # tokens generated per turn: text tokens + one audio pad per frame
    max_audio_frames: Annotated[int, Positive] = 7500  # 12.5 Hz audio frames generated per turn (600 s)


class LLMEngineSettings(_Section):
    kv_budget_tokens: Annotated[int, Positive] = 65536    # KV-cache capacity shared by all slots, in tokens
    max_slots: Annotated[int, Positive] = 16              # sequences decoded together in one step
    prefill_chunk_tokens: Annotated[int, Positive] = 512  # long prompts are prefilled in chunks of this size
    # attention on CUDA: sdpa (fused kernels, faster) or math (the reference's numerics: fp32
    # scores; the only choice whose CUDA-graph replay equals eager execution bit for bit)
    attention: Literal["sdpa", "math"] = "sdpa"
    # torch.compile the decode step's pieces on CUDA ("inductor": fused elementwise kernels
    # inside the CUDA graphs; compiles at start). Off until measured: `bench llm --compile inductor`.
    compile_backend: Optional[Literal["inductor"]] = None

    def context_tokens(self, max_position_embeddings: int) -> int:
        """The longest sequence (prompt + reply) a replica takes: the model's positions or the KV budget."""
        return min(self.kv_budget_tokens, max_position_embeddings)


class DecoderSettings(_Section):
    """Low-latency audio: the first segment is decoded in growing chunks (12.5 Hz frames)."""

    first_chunk_frames: Annotated[int, Positive] = 4      # 320 ms of audio in the first chunk
    chunk_growth: Annotated[float, AtLeastOne] = 2.0     # each next chunk is this many times longer
    max_chunk_frames: Annotated[int, Positive] = 50       # ... up to this size


class BusSettings(_Section):
    """Redis Streams bus (services/common/bus.py, worker.py)."""

    turn_stream_maxlen: Annotated[int, Positive] = 20000     # approximate cap on entries per turn stream
    finished_turn_ttl_s: Annotated[int, Positive] = 120      # a finished turn's events stay this long for resume
    job_max_backlog: Annotated[int, Positive] = 10000        # submitting beyond this many waiting jobs fails
    visibility_timeout_ms: Annotated[int, Positive] = 30000  # a job unacked this long is re-claimed by another replica
    max_deliveries: Annotated[int, Positive] = 3             # then it goes to the dead-letter stream
    block_ms: Annotated[int, Positive] = 1000                # blocking read timeout (also the stop-check period)
    reclaim_interval_ms: Annotated[int, Positive] = 5000     # how often a worker looks for stale jobs
    lease_ttl_s: Annotated[float, Positive] = 10.0            # a turn whose producer or LLM replica stopped renewing
                                                              # its lease this long is known dead (renewed every third)
    llm_continuations: Annotated[int, NonNegative] = 2        # a turn whose LLM replica died is continued by another
                                                              # this many times at most (0: it ends with UNAVAILABLE)


class TelemetrySettings(_Section):
    exporter: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str = ""               # e.g. http://otel-collector:4317; "" = exporter default
    service_name: str = "baichuan-audio"
    metrics_interval_s: Annotated[float, Positive] = 60.0


class ServingSettings(_Section):
    host: str = "0.0.0.0"
    grpc_port: Annotated[int, TcpPort] = 9000
    reflection: bool = True               # gRPC server reflection (grpcurl, grpc_cli)
    # the stage services (Tokenizer, LLM, Decoder, Vocoder) on the gRPC proxy too; they bypass
    # every limit of the conversation service, so each call also needs an internal key
    stage_services: bool = False
    http_port: Annotated[int, TcpPort] = 8000
    # the Realtime API (/v1/realtime, WebSocket) and the voice page (/) on Serve's HTTP proxy
    realtime: bool = True


class AuthSettings(_Section):
    """API keys: `name:key` entries, one per line (or comma-separated); the name is the
    caller's identity (sessions and quotas belong to it). services/common/auth.py."""

    required: bool = True                 # calls without a valid key get UNAUTHENTICATED
    api_keys_file: str = ""               # e.g. a mounted Secret; re-read when it changes
    api_keys: str = ""                    # environment only: BAICHUAN_AUDIO_API_KEYS
    internal_keys_file: str = ""          # keys of the stage services (serving.stage_services)
    internal_keys: str = ""               # environment only: BAICHUAN_AUDIO_INTERNAL_KEYS

    def __repr_args__(self):
        yield "required", self.required
        yield "api_keys_file", self.api_keys_file
        yield "api_keys", "***" if self.api_keys else ""
        yield "internal_keys_file", self.internal_keys_file
        yield "internal_keys", "***" if self.internal_keys else ""


class QuotaLimits(_Section):
    """What one identity may use; over a limit a call gets RESOURCE_EXHAUSTED with the time to
    wait (orchestrator/quotas.py)."""

    sessions: Annotated[int, Positive] = 100                   # live sessions
    turns: Annotated[int, Positive] = 4                        # Converse / Transcribe / Synthesize running at once
    requests_per_minute: Annotated[int, Positive] = 600        # every call but health checks
    audio_seconds_per_hour: Annotated[float, Positive] = 36000.0  # audio in (tokenized) and out (generated)


class QuotaOverrides(_Section):
    sessions: Annotated[int, Positive] | None = None
    turns: Annotated[int, Positive] | None = None
    requests_per_minute: Annotated[int, Positive] | None = None
    audio_seconds_per_hour: Annotated[float, Positive] | None = None


class QuotasSettings(QuotaLimits):
    """Per-identity limits (the defaults), and other limits for named identities."""

    overrides: dict[str, QuotaOverrides] = {}

    def of(self, identity: str) -> QuotaLimits:
        base = {k: getattr(self, k) for k in QuotaLimits.model_fields}
        own = self.overrides.get(identity)
        if own is not None:
            base.update({k: v for k, v in own.model_dump().items() if v is not None})
        return QuotaLimits(**base)


class _Inconsistent(ValueError):
    """Two keys that do not fit together; `keypath` is the one the message is about."""

    def __init__(self, keypath: tuple[str, ...], message: str):
        super().__init__(message)
        self.keypath = keypath


class Settings(BaseSettings):
    # strict here also makes the environment source convert its strings to each key's type
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False,
                                      strict=True, frozen=True, extra="forbid")

    model: ModelSettings = ModelSettings()
    redis: RedisSettings = RedisSettings()
    stages: StagesSettings = StagesSettings()
    autoscaling: AutoscalingSettings = AutoscalingSettings()
    limits: LimitsSettings = LimitsSettings()
    llm: LLMEngineSettings = LLMEngineSettings()
    decoder: DecoderSettings = DecoderSettings()
    bus: BusSettings = BusSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    serving: ServingSettings = ServingSettings()
    auth: AuthSettings = AuthSettings()
    quotas: QuotasSettings = QuotasSettings()

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: Any,
                                   **_: Any) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # Settings(): the defaults and keyword arguments only

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        for name, st in self.stages:
            if st.min_replicas > st.max_replicas:
                raise _Inconsistent(("stages", name, "min_replicas"), f"({st.min_replicas}) is larger than "
                                    f"stages.{name}.max_replicas ({st.max_replicas})")
        lim = self.limits
        if lim.min_audio_sample_rate > lim.max_audio_sample_rate:
            raise _Inconsistent(("limits", "min_audio_sample_rate"), f"({lim.min_audio_sample_rate}) is larger than "
                                f"limits.max_audio_sample_rate ({lim.max_audio_sample_rate})")
        if lim.reply_reserve_tokens >= self.llm.kv_budget_tokens:
            raise _Inconsistent(("limits", "reply_reserve_tokens"), f"({lim.reply_reserve_tokens}) leaves no room for a "
                                f"prompt in llm.kv_budget_tokens ({self.llm.kv_budget_tokens})")
        d = self.decoder
        if d.first_chunk_frames > d.max_chunk_frames:
            raise _Inconsistent(("decoder", "first_chunk_frames"), f"({d.first_chunk_frames}) is larger than "
                                f"decoder.max_chunk_frames ({d.max_chunk_frames})")
        r = self.redis
        for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            if getattr(r, key) and urlsplit(r.url).scheme != "rediss":
                raise _Inconsistent(("redis", key), "is set but redis.url is not rediss:// (TLS)")
        if bool(r.tls_cert_file) != bool(r.tls_key_file):
            raise _Inconsistent(("redis", "tls_cert_file"), "and redis.tls_key_file go together (mutual TLS)")
        for name in self.quotas.overrides:
            if not IDENTITY_RE.fullmatch(name):
                raise _Inconsistent(("quotas", "overrides"), f"names an identity {name!r} that no API key can have "
                                    f"(names are {IDENTITY_RULE})")
        b = self.bus
        if b.block_ms >= b.visibility_timeout_ms:
            raise _Inconsistent(("bus", "block_ms"), f"({b.block_ms}) must be shorter than "
                                f"bus.visibility_timeout_ms ({b.visibility_timeout_ms})")
        return self

    @classmethod
    def load(cls, path: str | os.PathLike | None = None,
             env: Mapping[str, str] | None = None) -> "Settings":
        """Defaults, then the YAML file (`path`, else $BAICHUAN_AUDIO_CONFIG, else none), then
        the environment (`env`, default os.environ). Raises SettingsError naming the bad key."""
        env = os.environ if env is None else env
        if path is None and env.get(CONFIG_ENV):
            path = env[CONFIG_ENV]
        origins: dict[tuple[str, ...], str] = {}   # where each key's value came from, last wins
        sources: list[PydanticBaseSettingsSource] = []
        if path is not None:
            if not Path(path).is_file():
                raise SettingsError(f"config file {path} not found")
            sources.append(_YamlFile(cls, Path(path)))
            origins.update((k, str(path)) for k in _leaves(sources[-1].yaml_data))
        sources.append(_PlainEnvironment(cls, env))
        origins.update((PLAIN_ENV[n], f"environment variable {n}") for n in PLAIN_ENV if n in env)
        sources.append(_PrefixedEnvironment(cls, env))
        origins.update(_prefixed_keys(env))
        try:
            # _build_sources: pydantic-settings' argument for sources made per call (its CLI
            # apps use it); settings_customise_sources could only make them per class
            return cls(_build_sources=(tuple(reversed(sources)), {}))  # highest precedence first
        except ValidationError as e:
            raise SettingsError(_explain(e.errors()[0], origins)) from None

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict for logging: secrets removed, URL passwords redacted."""
        d = self.model_dump()
        d["redis"].update(url=self.redis.redacted_url(), password="***" if self.redis.password else "")
        d["auth"].update(api_keys="***" if self.auth.api_keys else "",
                         internal_keys="***" if self.auth.internal_keys else "")
        return d


# --------------------------------------------------------------------------- sources

class _YamlFile(YamlConfigSettingsSource):
    """The YAML file, with errors that name it. A section left empty (`serving:`) keeps its
    defaults; a secret in the file is refused."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path):
        super().__init__(settings_cls, yaml_file=path)

    def _read_file(self, file_path: Path) -> dict[str, Any]:
        try:
            data = yaml.safe_load(file_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise SettingsError(f"{file_path}: not valid YAML: {e}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise SettingsError(f"{file_path}: the top level must be a mapping of sections, got {type(data).__name__}")
        for keypath in ENV_ONLY & set(_leaves(data)):
            env_name = next(n for n, k in PLAIN_ENV.items() if k == keypath)
            raise SettingsError(
                f"{file_path}: {_dotted(keypath)} must not be in a file (it is a secret); set the "
                f"environment variable {env_name} or {ENV_PREFIX}{'__'.join(keypath).upper()}")
        return _without_empty_sections(data, Settings)


class _PlainEnvironment(PydanticBaseSettingsSource):
    """The plain variables of PLAIN_ENV (MODEL_PATH, REDIS_URL, ...)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]):
        super().__init__(settings_cls)
        self.env = env

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the variables itself

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, (section, key) in PLAIN_ENV.items():
            if name in self.env:
                out.setdefault(section, {})[key] = self.env[name]
        return out


class _PrefixedEnvironment(EnvSettingsSource):
    """BAICHUAN_AUDIO__SECTION__KEY variables from `env` instead of os.environ (tests pass
    their own); strings are converted to the key's type before the strict validation."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]):
        self._env = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._env, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


# --------------------------------------------------------------------------- errors

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


def _dotted(keypath: tuple[str, ...]) -> str:
    return ".".join(keypath)


def _is_section(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _leaves(data: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in data.items():
        keypath = prefix + (str(k),)
        out += _leaves(v, keypath) if isinstance(v, Mapping) and v else [keypath]
    return out


def _without_empty_sections(data: dict, model: type[BaseModel]) -> dict:
    out = {}
    for k, v in data.items():
        f = model.model_fields.get(k) if isinstance(k, str) else None
        if f is not None and _is_section(f.annotation):
            if v is None:
                continue
            if isinstance(v, dict):
                v = _without_empty_sections(v, f.annotation)
        out[k] = v
    return out


def _unknown(source: str, keypath: tuple[str, ...], depth: int) -> str:
    """The message for `keypath`, whose part `depth` is not a key of what precedes it."""
    t: Any = Settings
    for part in keypath[:depth]:
        t = t.model_fields[part].annotation
    known = ", ".join(t.model_fields) if _is_section(t) else "none, it is a value"
    return (f"{source}: unknown key {_dotted(keypath)!r} (known under "
            f"{_dotted(keypath[:depth]) or 'the top level'}: {known})")


def _declared(keypath: tuple[str, ...]) -> Any:
    """The declared type of `keypath`, or None where the path leaves the sections."""
    t: Any = Settings
    for part in keypath:
        if not (_is_section(t) and part in t.model_fields):
            return None
        t = t.model_fields[part].annotation
    return t


def _prefixed_keys(env: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """keypath -> 'environment variable NAME' for each BAICHUAN_AUDIO__ variable; each must name
    one key (pydantic-settings would ignore an unknown section and nest a value below a value)."""
    out = {}
    for name in sorted(env):  # sorted: the same error whatever the order
        if not name.upper().startswith(ENV_PREFIX):
            continue
        keypath = tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__"))
        source = f"environment variable {name}"
        for depth in range(1, len(keypath) + 1):
            if _declared(keypath[:depth]) is None:
                raise SettingsError(_unknown(source, keypath, depth - 1))
        t = _declared(keypath)
        if _is_section(t):
            raise SettingsError(f"{source}: {_dotted(keypath)} is a section, not a value; set one of its keys "
                                f"({', '.join(t.model_fields)})")
        out[keypath] = source
    return out


_KINDS = {"int": "must be an integer", "float": "must be a number", "bool": "must be true or false",
          "string": "must be a string (quote it in YAML)", "model": "must be a mapping of keys",
          "dict": "must be a mapping of keys"}


def _explain(error: Mapping[str, Any], origins: Mapping[tuple[str, ...], str]) -> str:
    """A pydantic validation error as '<source>: <key> <what is wrong>; got <value>'."""
    keypath = tuple(str(p) for p in error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _Inconsistent):
        return f"{origins.get(cause.keypath, 'default')}: {_dotted(cause.keypath)} {cause}"
    source = origins.get(keypath, "default")
    if error["type"] == "extra_forbidden":
        return _unknown(source, keypath, len(keypath) - 1)
    if error["type"] == "value_error":  # a _rule: the message names the converted value
        return f"{source}: {_dotted(keypath)} {cause}"
    if error["type"] == "literal_error":
        what = f"must be one of {', '.join(map(str, get_args(_declared(keypath))))}"
    else:
        what = _KINDS.get(error["type"].split("_")[0], error["msg"])
    return f"{source}: {_dotted(keypath)} {what}; got {error['input']!r}"
