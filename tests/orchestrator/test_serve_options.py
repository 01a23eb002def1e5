"""Settings that shape the served stack reach Serve: `serving.reflection` turns the gRPC
proxy's reflection on or off, `serving.stage_services` puts the stage services on the proxy
(off by default: they are internal) (the stack's own test cluster is started through the
same call)."""
from __future__ import annotations

import pytest

from orchestrator.app import PUBLIC_SERVICERS, SERVICER_FUNCTIONS, STAGE_SERVICERS
from orchestrator.serve import grpc_options
from services.common.settings import Settings


@pytest.mark.parametrize("value", [True, False])
def test_reflection_setting_reaches_the_grpc_proxy(tmp_path, value):
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(f"serving:\n  reflection: {str(value).lower()}\n  grpc_port: 9123\n")
    opts = grpc_options(Settings.load(str(cfg), env={}))
    assert opts.enable_reflection is value
    assert opts.port == 9123 and opts.grpc_servicer_functions == PUBLIC_SERVICERS


def test_stage_services_are_off_the_proxy_unless_asked_for(tmp_path):
    assert not set(grpc_options(Settings.load(env={})).grpc_servicer_functions) & set(STAGE_SERVICERS)
    cfg = tmp_path / "settings.yaml"
    cfg.write_text("serving:\n  stage_services: true\n")
    assert grpc_options(Settings.load(str(cfg), env={})).grpc_servicer_functions == SERVICER_FUNCTIONS


def test_a_local_stack_without_keys_gets_one_the_client_reads(tmp_path, monkeypatch):
    """`serve` on this machine, auth required and no key configured: one key file is made
    (owner-only) and the replicas are pointed at it; the client commands find it."""
    from orchestrator.client import find_api_key, local_key_file
    from orchestrator.serve import local_api_key
    from services.common.auth import KeyRing

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("BAICHUAN_AUDIO_API_KEY", raising=False)
    env = local_api_key(Settings.load(env={}), log=lambda _msg: None)
    path = local_key_file()
    assert env == {"BAICHUAN_AUDIO__AUTH__API_KEYS_FILE": str(path)} and path.stat().st_mode & 0o777 == 0o600
    key = find_api_key()
    assert KeyRing(file=str(path)).identify(key) == "local"
    assert local_api_key(Settings.load(env={}), log=lambda _msg: None) == env and find_api_key() == key  # kept
    # configured keys, or auth off: nothing is made
    assert local_api_key(Settings.load(env={"BAICHUAN_AUDIO_API_KEYS": f"a:{'k' * 20}"})) == {}
    assert local_api_key(Settings.load(env={"BAICHUAN_AUDIO__AUTH__REQUIRED": "false"})) == {}
