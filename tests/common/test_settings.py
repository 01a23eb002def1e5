"""Settings: defaults, YAML, environment overrides, and errors that name the key and source."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services.common.settings import ENV_ONLY, Settings, SettingsError
from tests.parity import missing

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults():
    s = Settings.load(env={})
    assert s == Settings()
    assert s.model.path == "" and s.model.is_tiny
    assert s.limits.max_audio_seconds == 600.0
    assert s.serving.grpc_port == 9000 and s.serving.host == "0.0.0.0"
    assert s.telemetry.exporter == "none"
    assert s.stages.llm.max_batch_size == 16 and s.stages.decoder.max_batch_size == 8
    assert s.redis.url.startswith("redis://")
    with pytest.raises(ValidationError, match="frozen"):
        s.serving.grpc_port = 1  # type: ignore[misc]


def test_yaml_file(tmp_path):
    p = write(tmp_path, """
model:
  path: /models/Baichuan-Audio-Instruct
  dtype: bfloat16
stages:
  llm:
    max_replicas: 4
    num_gpus: 1
  decoder:
    num_gpus: 0.5
    batch_wait_timeout_s: 0.005
limits:
  max_audio_seconds: 120      # an int for a float key is fine
telemetry:
  exporter: console
serving:                      # an empty section keeps its defaults
""")
    s = Settings.load(p, env={})
    assert s.model.path == "/models/Baichuan-Audio-Instruct" and not s.model.is_tiny
    assert s.model.dtype == "bfloat16"
    assert s.stages.llm.max_replicas == 4 and s.stages.llm.num_gpus == 1.0
    assert s.stages.llm.max_batch_size == 16, "keys not given keep the per-stage default"
    assert s.stages.decoder.num_gpus == 0.5 and s.stages.decoder.batch_wait_timeout_s == 0.005
    assert s.stages.vocoder == Settings().stages.vocoder
    assert s.limits.max_audio_seconds == 120.0 and isinstance(s.limits.max_audio_seconds, float)
    assert s.telemetry.exporter == "console"
    assert s.serving == Settings().serving


def test_config_file_from_environment(tmp_path):
    p = write(tmp_path, "serving:\n  grpc_port: 9100\n")
    assert Settings.load(env={"BAICHUAN_AUDIO_CONFIG": str(p)}).serving.grpc_port == 9100


def test_environment_overrides_file(tmp_path):
    p = write(tmp_path, "redis:\n  url: redis://file:6379/0\nmodel:\n  path: /from/file\n")
    env = {
        "MODEL_PATH": "/from/env",
        "REDIS_URL": "redis://plain:6379/0",
        "REDIS_PASSWORD": "s3cret",
        "BAICHUAN_AUDIO__REDIS__URL": "redis://user:pw@prefixed:6380/1",  # beats REDIS_URL
        "BAICHUAN_AUDIO__STAGES__LLM__MAX_REPLICAS": " 3 ",
        "BAICHUAN_AUDIO__STAGES__LLM__NUM_GPUS": "0.5",
        "BAICHUAN_AUDIO__LIMITS__MAX_AUDIO_SECONDS": "30",
        "BAICHUAN_AUDIO__TELEMETRY__EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_SERVICE_NAME": "svc",
        "BAICHUAN_AUDIO_FIXTURES": "/not/a/setting",  # single underscore: not ours
        "UNRELATED": "x",
    }
    s = Settings.load(p, env=env)
    assert s.model.path == "/from/env"
    assert s.redis.url == "redis://user:pw@prefixed:6380/1"
    assert s.redis.password == "s3cret"
    assert s.stages.llm.max_replicas == 3 and s.stages.llm.num_gpus == 0.5
    assert s.limits.max_audio_seconds == 30.0
    assert s.telemetry.exporter == "otlp" and s.telemetry.otlp_endpoint == "http://collector:4317"
    assert s.telemetry.service_name == "svc"


def test_environment_keeps_the_other_defaults_of_a_stage():
    s = Settings.load(env={"BAICHUAN_AUDIO__STAGES__ORCHESTRATOR__MAX_REPLICAS": "2",
                           "BAICHUAN_AUDIO__STAGES__LLM__NUM_GPUS": "1"})
    assert s.stages.orchestrator.max_replicas == 2 and s.stages.orchestrator.max_batch_size == 1
    assert s.stages.llm.num_gpus == 1.0 and s.stages.llm.max_batch_size == 16
    assert s.stages.decoder == Settings().stages.decoder


@pytest.mark.parametrize("raw,value", [("true", True), ("0", False), ("Yes", True), ("off", False)])
def test_env_bool_conversion(raw, value):
    s = Settings.load(env={"BAICHUAN_AUDIO__SERVING__REFLECTION": raw})
    assert s.serving.reflection is value


def test_secrets_never_appear_in_repr_or_dict():
    s = Settings.load(env={"REDIS_PASSWORD": "hunter2", "REDIS_URL": "redis://me:urlpass@h:1/0"})
    assert s.redis.password == "hunter2"
    for text in (repr(s), str(s), repr(s.redis), str(s.to_dict())):
        assert "hunter2" not in text and "urlpass" not in text
    assert s.to_dict()["redis"]["url"] == "redis://me:***@h:1/0"
    assert s.to_dict()["redis"]["password"] == "***"


@pytest.mark.parametrize("text,message", [
    ("limits:\n  max_audio_secs: 5\n",
     r"config.yaml: unknown key 'limits.max_audio_secs' \(known under limits: max_audio_seconds,"),
    ("nope: 1\n", r"unknown key 'nope' \(known under the top level: model, redis,"),
    ("limits:\n  max_text_chars: many\n", r"config.yaml: limits.max_text_chars must be an integer; got 'many'"),
    ("limits:\n  max_text_chars: 1.5\n", r"limits.max_text_chars must be an integer; got 1.5"),
    ("serving:\n  grpc_port: true\n", r"serving.grpc_port must be an integer; got True"),
    ("serving:\n  reflection: 1\n", r"serving.reflection must be true or false; got 1"),
    ("model:\n  path: 12\n", r"model.path must be a string \(quote it in YAML\); got 12"),
    ("telemetry:\n  exporter: jaeger\n", r"telemetry.exporter must be one of none, console, otlp; got 'jaeger'"),
    ("stages: [1, 2]\n", r"stages must be a mapping of keys"),
    ("redis:\n  password: x\n", r"redis.password must not be in a file .* REDIS_PASSWORD"),
    ("- a\n", r"the top level must be a mapping"),
    ("a: [\n", r"not valid YAML"),
    ("stages:\n  llm:\n    min_replicas: 3\n    max_replicas: 2\n",
     r"config.yaml: stages.llm.min_replicas \(3\) is larger than stages.llm.max_replicas \(2\)"),
    ("serving:\n  grpc_port: 70000\n", r"config.yaml: serving.grpc_port must be a TCP port"),
    ("limits:\n  min_audio_sample_rate: 200000\n",
     r"config.yaml: limits.min_audio_sample_rate \(200000\) is larger than limits.max_audio_sample_rate \(192000\)"),
    ("limits:\n  session_ttl_s: 0\n", r"config.yaml: limits.session_ttl_s must be > 0; got 0"),
    ("stages:\n  vocoder:\n    num_gpus: -1\n", r"stages.vocoder.num_gpus must be >= 0; got -1.0"),
])
def test_file_errors_name_the_key_and_file(tmp_path, text, message):
    with pytest.raises(SettingsError, match=message):
        Settings.load(write(tmp_path, text), env={})


@pytest.mark.parametrize("env,message", [
    ({"BAICHUAN_AUDIO__LIMITS__MAX_AUDIO_SECS": "5"},
     r"environment variable BAICHUAN_AUDIO__LIMITS__MAX_AUDIO_SECS: unknown key 'limits.max_audio_secs'"),
    ({"BAICHUAN_AUDIO__SERVING__GRPC_PORT": "nine"},
     r"environment variable BAICHUAN_AUDIO__SERVING__GRPC_PORT: serving.grpc_port must be an integer; got 'nine'"),
    ({"BAICHUAN_AUDIO__STAGES__LLM": "4"}, r"stages.llm is a section, not a value"),
    ({"BAICHUAN_AUDIO__STAGES__LLM": "{not json"}, r"stages.llm is a section, not a value"),
    ({"BAICHUAN_AUDIO__NOPE": "1"}, r"BAICHUAN_AUDIO__NOPE: unknown key 'nope' \(known under the top level: model,"),
    ({"BAICHUAN_AUDIO__SERVING__GRPC_PORT__X": "1"}, r"unknown key 'serving.grpc_port.x'"),
    ({"BAICHUAN_AUDIO__BUS__BLOCK_MS": "60000"},
     r"environment variable BAICHUAN_AUDIO__BUS__BLOCK_MS: bus.block_ms \(60000\) must be shorter"),
    ({"REDIS_URL": "http://x"}, r"environment variable REDIS_URL: redis.url must start with redis://"),
    ({"BAICHUAN_AUDIO__TELEMETRY__EXPORTER": "Console"}, r"must be one of none, console, otlp"),
    ({"BAICHUAN_AUDIO__SERVING__REFLECTION": "maybe"}, r"serving.reflection must be true or false; got 'maybe'"),
    ({"BAICHUAN_AUDIO__LLM__ATTENTION": "flash"}, r"llm.attention must be one of sdpa, math"),
])
def test_environment_errors_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.load(env=env)


def test_missing_file():
    with pytest.raises(SettingsError, match="config file .*missing.yaml not found"):
        Settings.load("missing.yaml", env={})


@pytest.mark.parametrize("rel", ["config/example.yaml", "k8s/base/config.yaml"])
def test_shipped_config_files_load(rel):
    path = REPO / rel
    if not path.is_file():
        missing(f"{rel} not in this checkout")
    s = Settings.load(path, env={})
    if rel == "config/example.yaml":  # documents every key, each with its default value
        assert s == Settings()
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        undocumented = _keys(Settings().model_dump()) - _keys(data) - {".".join(k) for k in ENV_ONLY}
        assert not undocumented, f"config/example.yaml does not document {sorted(undocumented)}"


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out
