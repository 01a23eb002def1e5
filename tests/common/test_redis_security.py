"""Redis with an ACL user, a password and mutual TLS, configured the way the stack reads it
(settings from the environment and a file): the bus and the session store connect; a wrong
CA, a missing client certificate or a wrong password fail; the password never shows."""
from __future__ import annotations

import logging
import shutil
import subprocess
import time

import pytest
import redis

from services.common.bus import Bus
from services.common.redis_server import free_port, stop_process
from services.common.settings import Settings
from tests.certs import make_certs
from tests.parity import missing

PASSWORD = "acl-user-password-0123456789"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """redis-server on TLS only (no plaintext port), client certificates required, the default
    user off and one ACL user with a password."""
    server = shutil.which("redis-server")
    if server is None:
        missing("redis-server not found (Debian: apt-get install redis-server)")
    folder = tmp_path_factory.mktemp("redis-tls")
    c = make_certs(folder)
    port = free_port()
    conf = folder / "redis.conf"
    conf.write_text(f"""port 0
tls-port {port}
bind 127.0.0.1
tls-cert-file {c['server.crt']}
tls-key-file {c['server.key']}
tls-ca-cert-file {c['ca.crt']}
tls-auth-clients yes
save ""
appendonly no
user default off
user baichuan-audio on >{PASSWORD} ~* &* +@all
""")
    proc = subprocess.Popen([server, str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"rediss://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 15
        probe = redis.Redis.from_url(url, username="baichuan-audio", password=PASSWORD, ssl_ca_certs=str(c["ca.crt"]),
                                     ssl_certfile=str(c["client.crt"]), ssl_keyfile=str(c["client.key"]))
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"redis-server with TLS did not start: {proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(0.1)
        yield url, c
    finally:
        stop_process(proc)


def settings_for(tmp_path, url: str, c: dict, *, password: str = PASSWORD, ca: str = "ca.crt",
                 client_cert: bool = True) -> Settings:
    cfg = tmp_path / "settings.yaml"
    lines = [f"redis:\n  url: {url}\n  username: baichuan-audio\n  tls_ca_file: {c[ca]}\n"]
    if client_cert:
        lines.append(f"  tls_cert_file: {c['client.crt']}\n  tls_key_file: {c['client.key']}\n")
    cfg.write_text("".join(lines))
    return Settings.load(cfg, env={"REDIS_PASSWORD": password})


def test_bus_and_session_client_connect_with_acl_user_password_and_mutual_tls(tls_redis, tmp_path):
    url, c = tls_redis
    s = settings_for(tmp_path, url, c)
    bus = Bus.from_settings(s)
    assert bus.redis.ping()
    assert bus.redis.acl_whoami() in ("baichuan-audio", b"baichuan-audio")
    client = redis.Redis.from_url(s.redis.url, protocol=2, **s.redis.client_options())   # as the orchestrator opens it
    assert client.ping() and client.acl_whoami() in ("baichuan-audio", b"baichuan-audio")


@pytest.mark.parametrize("what", ["wrong CA", "no client certificate", "wrong password"])
def test_each_missing_piece_is_refused_without_showing_the_password(tls_redis, tmp_path, what, caplog):
    url, c = tls_redis
    kw = {"wrong CA": {"ca": "other-ca.crt"}, "no client certificate": {"client_cert": False},
          "wrong password": {"password": "not-the-password-0123456789"}}[what]
    s = settings_for(tmp_path, url, c, **kw)
    caplog.set_level(logging.DEBUG)
    with pytest.raises((redis.ConnectionError, redis.AuthenticationError, redis.ResponseError)) as e:
        Bus.from_settings(s).redis.ping()
    shown = f"{e.value!r} {e.value} {caplog.text} {s!r} {s.to_dict()}"
    assert PASSWORD not in shown and "not-the-password" not in shown


def test_tls_files_need_rediss(tmp_path):
    cfg = tmp_path / "settings.yaml"
    cfg.write_text("redis:\n  url: redis://127.0.0.1:6379/0\n  tls_ca_file: /etc/ssl/ca.pem\n")
    with pytest.raises(ValueError, match="redis.tls_ca_file is set but redis.url is not rediss://"):
        Settings.load(cfg, env={})
    cfg.write_text("redis:\n  url: rediss://h:6379/0\n  tls_cert_file: /c.pem\n")
    with pytest.raises(ValueError, match="tls_cert_file and redis.tls_key_file go together"):
        Settings.load(cfg, env={})
