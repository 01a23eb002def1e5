"""Security checks of rendered manifests: who can reach which port (NetworkPolicy semantics,
evaluated here), the stage services off the ingress, API keys from a mounted Secret, and no
placeholder secret in prod. Each raises AssertionError naming the object and field."""
from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field

from tests.k8s.manifests import (
    GRPC_PORT, STAGE_GRPC_SERVICERS, Doc, find, pod_templates, ray_groups, serve_config, the_rayservice,
)

NAMESPACE = "baichuan-audio"     # where the stack runs (its Ray pods' namespace)
DASHBOARD, RAY_CLIENT, GCS, SERVE_HTTP, METRICS, REDIS = 8265, 10001, 6379, 8000, 8080, 6379


@dataclass
class Peer:
    """Who opens a connection: a pod (its namespace and labels) or an address outside the cluster."""

    what: str
    namespace: str | None = None                    # None: not a pod of the cluster
    labels: dict = field(default_factory=dict)
    ip: str = "203.0.113.7"


def ray_pod_labels(docs: list[Doc]) -> dict[str, dict]:
    return {g: spec["template"]["metadata"].get("labels", {}) for g, spec in ray_groups(the_rayservice(docs))}


def peers(docs: list[Doc]) -> dict[str, Peer]:
    ray = next(iter(ray_pod_labels(docs).values()))
    return {
        "outside": Peer("a client outside the cluster"),
        "other-pod": Peer("another workload's pod", "default", {"app": "web"}),
        "operator": Peer("the KubeRay operator", "kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"}),
        "ray": Peer("a Ray pod of the stack", NAMESPACE, dict(ray)),
    }


def _selects(selector: dict | None, labels: dict) -> bool:
    sel = selector or {}
    assert not sel.get("matchExpressions"), "matchExpressions: extend tests/k8s/security.py to evaluate them"
    return (sel.get("matchLabels") or {}).items() <= labels.items()


def _peer_matches(entry: dict, peer: Peer) -> bool:
    if "ipBlock" in entry:
        block = entry["ipBlock"]
        ip = ipaddress.ip_address(peer.ip)
        return (ip in ipaddress.ip_network(block["cidr"])
                and not any(ip in ipaddress.ip_network(e) for e in block.get("except", [])))
    if peer.namespace is None:              # pod and namespace selectors select pods only
        return False
    if "namespaceSelector" in entry:        # {} = every namespace (we do not model namespace labels)
        assert not (entry["namespaceSelector"] or {}).get("matchLabels"), \
            "namespaceSelector with labels: extend tests/k8s/security.py"
    elif peer.namespace != NAMESPACE:
        return False                        # a bare podSelector: the policy's own namespace
    return _selects(entry.get("podSelector"), peer.labels)


def allowed(docs: list[Doc], target_labels: dict, port: int, peer: Peer) -> bool:
    """Whether `peer` may connect to `port` of a pod with `target_labels` (NetworkPolicy rules:
    not selected by any Ingress policy: open; else some rule must allow it)."""
    policies = [p for p in find(docs, "NetworkPolicy") if _selects(p["spec"].get("podSelector"), target_labels)
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return True
    for p in policies:
        for rule in p["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(q.get("port") in (None, port) and q.get("protocol", "TCP") == "TCP" for q in ports):
                continue
            sources = rule.get("from")
            if not sources or any(_peer_matches(e, peer) for e in sources):
                return True
    return False


def check_network_policies(docs: list[Doc]) -> None:
    """The dashboard and the Ray client port are reachable from the stack's own Ray pods (and
    the dashboard from the KubeRay operator) only; from outside the cluster only the gRPC API
    and Serve's HTTP proxy (the Realtime API and voice page); Redis from the Ray pods only."""
    p = peers(docs)
    expect = {   # port -> peers that may reach it on every Ray pod
        GRPC_PORT: {"outside", "other-pod", "operator", "ray"},
        DASHBOARD: {"operator", "ray"},
        RAY_CLIENT: {"ray"},
        GCS: {"ray"},
        SERVE_HTTP: {"outside", "other-pod", "operator", "ray"},
        METRICS: {"other-pod", "operator", "ray"},
    }
    for group, labels in ray_pod_labels(docs).items():
        for port, who in expect.items():
            got = {k for k, peer in p.items() if allowed(docs, labels, port, peer)}
            assert got == who, (f"Ray group {group} port {port}: reachable by {sorted(got)}, "
                                f"should be {sorted(who)} (NetworkPolicy)")
    redis = find(docs, "StatefulSet", "baichuan-audio-redis")[0]["spec"]["template"]["metadata"]["labels"]
    got = {k for k, peer in p.items() if allowed(docs, redis, REDIS, peer)}
    assert got == {"ray"}, f"Redis port {REDIS}: reachable by {sorted(got)}, should be the Ray pods only"


def _secret_values(doc: Doc) -> dict[str, str]:
    values = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
    values.update(doc.get("stringData") or {})
    return values


def check_stage_services_internal(docs: list[Doc], settings) -> None:
    """The public proxy serves no stage service, and the settings say the same."""
    listed = set(serve_config(docs)["grpc_options"].get("grpc_servicer_functions", []))
    assert not listed & STAGE_GRPC_SERVICERS, \
        f"serveConfigV2 puts stage services on the public gRPC port: {sorted(listed & STAGE_GRPC_SERVICERS)}"
    assert settings.serving.stage_services is False, "config.yaml: serving.stage_services must be false"


def check_api_keys(docs: list[Doc], settings) -> None:
    """Auth is required, and auth.api_keys_file is a key of a Secret mounted in every Ray
    container (never a ConfigMap, never the environment)."""
    from services.common.settings import PLAIN_ENV

    assert settings.auth.required, "config.yaml: auth.required must be true"
    path = settings.auth.api_keys_file
    assert path, "config.yaml: auth.api_keys_file is not set"
    folder, key = path.rsplit("/", 1)
    secrets = {d["metadata"]["name"]: _secret_values(d) for d in find(docs, "Secret")}
    for where, tpl in pod_templates([the_rayservice(docs)]):
        spec = tpl["spec"]
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == folder]
            assert mounts, f"{where}: container {c['name']} mounts nothing at {folder} (auth.api_keys_file)"
            vol = vols[mounts[0]["name"]]
            assert "secret" in vol, f"{where}: {folder} must be a Secret volume, not {sorted(vol)}"
            name = vol["secret"]["secretName"]
            assert key in secrets.get(name, {}), f"{where}: Secret {name} has no key {key!r}"
            keyed = [e["name"] for e in c.get("env", []) if PLAIN_ENV.get(e["name"], ("",))[0] == "auth"]
            assert not keyed, f"{where}: API keys in the environment ({keyed}): use the mounted Secret"


PLACEHOLDERS = ("", "change-me")


def check_prod_secrets(docs: list[Doc]) -> None:
    """No template value survives in prod: a real Redis password and at least one API key."""
    from services.common.auth import parse_keys

    redis = _secret_values(find(docs, "Secret", "baichuan-audio-redis")[0])
    assert redis.get("password", "") not in PLACEHOLDERS, "Secret baichuan-audio-redis: placeholder password"
    keys = _secret_values(find(docs, "Secret", "baichuan-audio-api-keys")[0]).get("api-keys", "")
    assert parse_keys(keys, "Secret baichuan-audio-api-keys"), "Secret baichuan-audio-api-keys holds no key"
