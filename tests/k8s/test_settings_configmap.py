"""The settings ConfigMap and the Ray pods' environment load with services.common.settings."""
from __future__ import annotations

import base64

from orchestrator.serve import MESSAGE_SIZE_ENV
from services.common.autoscaling import POLICY as AUTOSCALING_POLICY

from tests.k8s.manifests import (
    APPS, CONFIG_PATH, Doc, deployment_options, find, load_settings, ray_groups, replica_bounds, serve_config,
    settings_text, the_rayservice,
)


def test_settings_configmap_loads_and_agrees_with_serve(docs, tmp_path):
    """config.yaml is valid for services.common.settings and its stages say what Serve runs."""
    s = load_settings(docs, tmp_path)
    deps = deployment_options(serve_config(docs))
    for app, (_, deployment, stage) in APPS.items():
        st = getattr(s.stages, stage)
        opts = deps[app]
        actor = opts["ray_actor_options"]
        lo, hi = replica_bounds(opts)
        got = (st.min_replicas, st.max_replicas, st.num_cpus, st.num_gpus)
        want = (lo, hi, float(actor.get("num_cpus", 1)), float(actor["num_gpus"]))
        assert got == want, (f"stages.{stage} (min, max, cpus, gpus) = {got} but serveConfigV2 "
                             f"deployment {deployment} = {want}")
        if "autoscaling_config" in opts and "target_ongoing_requests" in opts["autoscaling_config"]:
            assert st.target_ongoing_requests == opts["autoscaling_config"]["target_ongoing_requests"], \
                f"stages.{stage}.target_ongoing_requests differs from deployment {deployment}"
        auto = opts.get("autoscaling_config") or {}
        if (auto.get("policy") or {}).get("policy_function") == AUTOSCALING_POLICY:
            # as orchestrator/app.py builds it: Serve (2.60) would otherwise wait 30 s to add a replica
            assert auto.get("upscale_delay_s") == 0, \
                f"deployment {deployment}: the backlog policy needs upscale_delay_s: 0"


def _secret_values(doc: Doc) -> dict[str, str]:
    values = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
    values.update(doc.get("stringData") or {})
    return values


def test_ray_pod_environment_reaches_settings(docs, tmp_path):
    """Each Ray container's environment (Secret values filled in) loads with the settings as a
    replica would: every variable is one settings.py reads, MODEL_PATH is on a mounted
    volume, the Redis URL and password come from the Secret."""
    from services.common import settings as S

    secrets = {d["metadata"]["name"]: _secret_values(d) for d in find(docs, "Secret")}
    _, text = settings_text(docs)
    (tmp_path / "config.yaml").write_text(text)
    for group, spec in ray_groups(the_rayservice(docs)):
        c = spec["template"]["spec"]["containers"][0]
        where = f"group {group} container {c['name']}"
        env, from_secret = {}, {}
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                env[e["name"]] = from_secret[e["name"]] = secrets[ref["name"]][ref["key"]]
            else:
                assert "value" in e, f"{where}: env {e['name']} is neither a value nor a Secret key"
                env[e["name"]] = e["value"]
        unread = [n for n in env if n not in S.PLAIN_ENV and n != S.CONFIG_ENV
                  and not n.startswith((S.ENV_PREFIX, "RAY_"))]
        assert not unread, f"{where}: settings.py reads no variable named {unread}"
        assert env.get(S.CONFIG_ENV) == CONFIG_PATH, f"{where}: {S.CONFIG_ENV} must be {CONFIG_PATH}"
        assert {"REDIS_URL", "REDIS_PASSWORD"} <= set(from_secret), f"{where}: Redis must come from a Secret"
        s = S.Settings.load(None, env={**env, S.CONFIG_ENV: str(tmp_path / "config.yaml")})
        assert s.redis.url == env["REDIS_URL"] and s.redis.password == env["REDIS_PASSWORD"]
        # Serve's gRPC proxy takes its message cap from the environment, as `serve` sets it
        assert env.get(MESSAGE_SIZE_ENV) == str(s.limits.max_message_bytes), \
            f"{where}: {MESSAGE_SIZE_ENV} must be limits.max_message_bytes ({s.limits.max_message_bytes})"
        mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
        assert s.model.path and any(s.model.path.startswith(m) for m in mounts), \
            f"{where}: model path {s.model.path!r} is under no volume mount ({mounts})"
