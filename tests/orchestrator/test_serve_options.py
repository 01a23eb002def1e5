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
