from __future__ import annotations

import os
import pytest
import torch

from services.common.redis_server import redis_server
from tests.parity import Fixtures, fixture_root, missing

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def pytest_report_header(config):
    """Which CPU kernels the float results come from (parity-kernels runs other ones)."""
    forced = " ".join(f"{k}={os.environ[k]}" for k in KERNEL_ENV if k in os.environ)
    return f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}" + (f" ({forced})" if forced else "")


@pytest.fixture(scope="session")
def fixtures() -> Fixtures:
    """The golden fixture root. Missing: skip, except under CI where it is a failure."""
    root = fixture_root()
    if not (root / "model_config.json").is_file():
        missing(f"golden fixture root {root} not found (set BAICHUAN_AUDIO_FIXTURES)")
    return Fixtures(root)


@pytest.fixture(scope="session")
def redis_url():
    """A private redis-server for this test session on a free loopback port.

    `make test` exports BAICHUAN_AUDIO_TEST_REDIS_URL for the one it started; otherwise
    one is started here from the redis-server binary."""
    url = os.environ.get("BAICHUAN_AUDIO_TEST_REDIS_URL")
    if url:
        yield url
        return
    try:
        with redis_server() as url:
            yield url
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random checkpoint written by the project's own writer (real layout)."""
    from services.common.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"), seed=0)


# The test stack's API keys: name (identity) -> key. The identities below `bob` have small
# quotas (TEST_SETTINGS) for the tests of each limit.
TEST_KEYS = {
    "alice": "alice-test-key-0123456789abcdef",
    "bob": "bob-test-key-0123456789abcdef",
    "two-sessions": "two-sessions-test-key-0123456789",
    "one-turn": "one-turn-test-key-0123456789abcd",
    "five-rpm": "five-rpm-test-key-0123456789abcd",
    "little-audio": "little-audio-test-key-0123456789",
    "hostile": "hostile-test-key-0123456789abcdef",   # the property-based tests' many calls
}
INTERNAL_KEY = "internal-stage-test-key-0123456789"   # the stage services' (auth.internal_keys)


def metadata(identity: str | None = "alice", app: str = "conversation") -> tuple[tuple[str, str], ...]:
    """gRPC metadata of a call to `app` by `identity` (None: no key), or with an internal key."""
    key = INTERNAL_KEY if identity == "internal" else TEST_KEYS.get(identity or "")
    return (("application", app),) + ((("authorization", f"Bearer {key}"),) if key else ())


TEST_SETTINGS = """
telemetry:
  exporter: console             # spans in the replicas' logs (checked for secrets)
serving:
  stage_services: true          # tests call the stages directly, with the internal key
  host: 127.0.0.1
quotas:
  overrides:
    two-sessions: {sessions: 2}
    one-turn: {turns: 1}
    five-rpm: {requests_per_minute: 5}
    little-audio: {audio_seconds_per_hour: 2.0}
    hostile: {requests_per_minute: 100000, sessions: 10000, turns: 16}
stages:
  tokenizer:    {num_cpus: 0.1, max_batch_size: 8}
  llm:          {num_cpus: 0.1}
  decoder:      {num_cpus: 0.1}
  vocoder:      {num_cpus: 0.1}
  orchestrator: {num_cpus: 0.1}
limits:
  max_message_bytes: 8388608
bus:
  visibility_timeout_ms: 3000
  reclaim_interval_ms: 500
  block_ms: 200
  lease_ttl_s: 4.0              # a killed replica's turns are known dead within 4 s (tests/orchestrator/test_faults.py)
"""


@pytest.fixture(scope="session")
def serve_stack(tmp_path_factory, redis_url, tiny_checkpoint):
    """A real local Ray cluster with Serve's gRPC proxy on a free loopback port.

    `stack.deploy(name)` deploys one of the Serve applications (once per session) with the
    test settings: tiny checkpoint, this session's redis-server, small CPU shares."""
    import types

    import ray
    from ray import serve

    from orchestrator.app import BUILDERS
    from orchestrator.serve import start_serve
    from services.common.redis_server import free_port

    folder = tmp_path_factory.mktemp("settings")
    cfg, keys, internal = folder / "settings.yaml", folder / "api-keys", folder / "internal-keys"
    keys.write_text("".join(f"{name}:{key}\n" for name, key in TEST_KEYS.items()))
    internal.write_text(f"stages:{INTERNAL_KEY}\n")
    cfg.write_text(TEST_SETTINGS + f"auth:\n  api_keys_file: {keys}\n  internal_keys_file: {internal}\n")
    # what `baichuan-audio serve` does, from the settings file (the gRPC message cap too)
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "MODEL_PATH": str(tiny_checkpoint),
           "REDIS_URL": redis_url, "OTEL_BSP_SCHEDULE_DELAY": "500"}
    http_port = free_port()
    port, args = start_serve(str(cfg), grpc_port=free_port(), http_port=http_port, env=env, num_cpus=2,
                             object_store_memory=200 * 1024 * 1024)
    deployed: set[str] = set()

    def deploy(name: str) -> None:
        if name not in deployed:
            # the Realtime API's HTTP ingress serves / (its page) and /v1/realtime
            serve.run(BUILDERS[name](args), name=name, route_prefix="/" if name == "realtime" else f"/{name}")
            deployed.add(name)

    yield types.SimpleNamespace(address=f"127.0.0.1:{port}", http=f"127.0.0.1:{http_port}", deploy=deploy, settings_path=cfg,
                                checkpoint=tiny_checkpoint, redis_url=redis_url, api_keys_file=keys)
    ray.shutdown()
