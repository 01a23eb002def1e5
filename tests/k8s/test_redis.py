"""The Redis StatefulSet: durable, password-protected, and it starts from the rendered config."""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time

import pytest

from services.common.redis_server import free_port, stop_process
from tests.k8s.manifests import Doc, find, name_of, quantity, render
from tests.parity import missing


def _redis(docs: list[Doc]) -> tuple[Doc, dict, str]:
    sts = find(docs, "StatefulSet", "baichuan-audio-redis")
    assert sts, "no StatefulSet baichuan-audio-redis"
    pod = sts[0]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    conf_vol = next(v for v in pod["volumes"] if v["name"] == "conf")
    conf = find(docs, "ConfigMap", conf_vol["configMap"]["name"])[0]["data"]["redis.conf"]
    return sts[0], c, conf


def test_redis_durable_with_password(docs):
    sts, c, conf = _redis(docs)
    assert re.fullmatch(r"redis:7(\.\d+)*", c["image"]), f"Redis image {c['image']} is not redis:7"
    directives = {line.split()[0]: line.split(None, 1)[1] for line in conf.splitlines()
                  if line.strip() and not line.startswith("#")}
    assert directives.get("appendonly") == "yes", "redis.conf: appendonly yes (durable work streams)"
    assert directives.get("maxmemory-policy") == "noeviction", "redis.conf: evicting would drop jobs"
    assert directives.get("dir") == "/data"
    claims = [t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])]
    assert any(m["name"] in claims and m["mountPath"] == "/data" for m in c["volumeMounts"]), \
        "Redis /data must be on a PersistentVolumeClaim"
    env = {e["name"]: e for e in c["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "baichuan-audio-redis"
    # The Ray pods' REDIS_URL must name this Service and port.
    secret = find(docs, "Secret", "baichuan-audio-redis")[0]
    url = (secret.get("stringData") or {}).get("url") \
        or base64.b64decode((secret.get("data") or {}).get("url", "")).decode()
    svc = find(docs, "Service", "baichuan-audio-redis")[0]
    assert url.startswith(f"redis://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}/"), \
        f"Secret url {url!r} does not point at Service {name_of(svc)}"


@pytest.mark.parametrize("previous", [None, "old-pass_word+/="])
def test_redis_container_starts_from_rendered_config(tmp_path, previous):
    """Runs the rendered container command and redis.conf with the local redis-server (paths
    moved into tmp_path, a free port): password required, AOF on, maxmemory from the limit.
    During a password rotation (previous_password in the Secret) the old password works too."""
    server = shutil.which("redis-server")
    if server is None:
        missing("redis-server not found (Debian: apt-get install redis-server)")
    import redis

    sts, c, conf = _redis(render("base"))
    port = free_port()
    dirs = {p: tmp_path / p.strip("/").replace("/", "_") for p in ("/data", "/etc/redis", "/run/redis")}
    for d in dirs.values():
        d.mkdir()

    def relocate(text: str) -> str:
        for p, d in dirs.items():
            text = text.replace(p, str(d))
        return text

    conf = relocate(conf).replace("port 6379", f"port {port}")
    conf = re.sub(r"(?m)^bind .*$", "bind 127.0.0.1", conf)
    (dirs["/etc/redis"] / "redis.conf").write_text(conf)
    assert c["command"][:2] == ["sh", "-c"]
    script = relocate(c["command"][2])
    limit_mib = int(quantity(c["resources"]["limits"]["memory"]) // 2**20)
    password = "pa ss-word+/="  # a space and base64 characters survive the config quoting
    env = {"PATH": os.environ.get("PATH", ""), "REDIS_PASSWORD": password,
           "MEMORY_LIMIT_MIB": str(limit_mib)}
    env_names = {e["name"]: e for e in c["env"]}
    ref = env_names["REDIS_PREVIOUS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "previous_password" and ref.get("optional") is True   # absent outside rotations
    if previous is not None:
        env["REDIS_PREVIOUS_PASSWORD"] = previous
    proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read() if proc.poll() is not None else "(still running)"
                    raise AssertionError(f"redis did not start from the rendered config:\n{out}")
                time.sleep(0.1)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert int(client.config_get("maxmemory")["maxmemory"]) == (limit_mib * 3 // 4) * 2**20
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).ping()
        for other in ("old-pass_word+/=", "wrong"):
            old_client = redis.Redis(host="127.0.0.1", port=port, password=other, socket_timeout=2)
            if other == previous:
                assert old_client.ping()
            else:
                with pytest.raises(redis.AuthenticationError):
                    old_client.ping()
        client.xadd("jobs:test", {"k": "v"})
        # The readiness probe, pointed at this port, passes with REDISCLI_AUTH.
        probe = sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
        probe_cmd = probe[2].replace("-h 127.0.0.1", f"-h 127.0.0.1 -p {port}")
        if shutil.which("redis-cli"):
            r = subprocess.run(["sh", "-c", probe_cmd], env={**env, "REDISCLI_AUTH": password},
                               timeout=10)
            assert r.returncode == 0, "the readiness probe fails against a healthy Redis"
    finally:
        stop_process(proc)
    assert any(dirs["/data"].rglob("*.aof")), "no append-only file was written under dir"
