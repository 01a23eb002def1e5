"""Checks of rendered manifests: each raises AssertionError naming the object and field."""
from __future__ import annotations

import functools
import json
import re
import typing
from typing import Any

from tests.k8s.manifests import (
    APPS, CONFIG_PATH, GPU, GRPC_PORT, GRPC_SERVICERS, KUBERNETES_VERSIONS, RAYSERVICE_SCHEMA, WORKLOAD_KINDS, Doc,
    containers, deployment_options, find, name_of, pod_templates, quantity, ray_groups, replica_bounds,
    serve_config, the_rayservice,
)
from tests.k8s import monitoring_schema
from tests.parity import missing


def _kubernetes_validate():
    try:
        import jsonschema  # noqa: F401  (installed with kubernetes-validate)
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not installed: pip install kubernetes-validate")
    return kubernetes_validate


# --------------------------------------------------------------------------- checks: schemas

def check_core_objects(docs: list[Doc]) -> None:
    """Every non-Ray object validates against the Kubernetes schemas, strictly."""
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            _kubernetes_validate()
            monitoring_schema.validate(d)  # minimal: the operator's CRD schemas are not vendored
        elif not d["apiVersion"].startswith("ray.io/"):
            _validate_core(d, name_of(d))


def _strict(schema: Any) -> Any:
    """A CRD schema that rejects unknown fields, as the API server does with
    `kubectl apply --validate=strict` (a structural schema otherwise prunes them silently)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    return schema


@functools.lru_cache(maxsize=1)
def _rayservice_validator():
    _kubernetes_validate()
    import jsonschema

    schema = json.loads(RAYSERVICE_SCHEMA.read_text())
    return jsonschema.Draft7Validator(_strict(schema["schema"]))


def _validate_core(obj: Doc, what: str) -> None:
    kubernetes_validate = _kubernetes_validate()

    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            raise AssertionError(f"{what} is not a valid {obj['kind']} "
                                 f"(Kubernetes {version}): {path}: {e.message}") from None
        except kubernetes_validate.SchemaNotFoundError as e:
            raise AssertionError(f"{what}: {e.message} (a custom resource needs "
                                 "its own check here)") from None


def check_rayservice(docs: list[Doc]) -> None:
    """The RayService against KubeRay's CRD schema; the Kubernetes objects inside it against
    the Kubernetes schemas (the CRD schema leaves them out, see write_rayservice_schema)."""
    rs = the_rayservice(docs)
    assert rs["apiVersion"] == "ray.io/v1", f"{name_of(rs)}: apiVersion must be ray.io/v1"
    errors = sorted(_rayservice_validator().iter_errors(rs), key=lambda e: list(e.path))
    if errors:
        lines = [f"  {'.'.join(map(str, e.path)) or '(top)'}: {e.message}" for e in errors[:10]]
        raise AssertionError(f"{name_of(rs)} does not match the KubeRay CRD schema:\n"
                             + "\n".join(lines))
    for group, spec in ray_groups(rs):
        _validate_core({"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": f"{rs['metadata']['name']}-{group}"},
                        "template": spec["template"]},
                       f"{name_of(rs)} group {group}: the pod template")
    svc = rs["spec"].get("serveService")
    if svc is not None:
        _validate_core({"apiVersion": "v1", "kind": "Service", **svc},
                       f"{name_of(rs)}: spec.serveService")


_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def check_kuberay_rules(docs: list[Doc]) -> None:
    """The operator's own admission rules that a schema cannot express (KubeRay v1.7,
    ray-operator/controllers/ray/utils/validation.go)."""
    rs = the_rayservice(docs)
    cluster = rs["spec"]["rayClusterConfig"]
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    for group, spec in ray_groups(rs):
        where = f"{name_of(rs)} group {group}"
        params = spec.get("rayStartParams") or {}
        assert "labels" not in params, f"{where}: use the group's labels field, not rayStartParams.labels"
        if spec.get("resources"):
            assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(params), \
                f"{where}: resources set both in rayStartParams and in resources"
        for key, value in (spec.get("labels") or {}).items():
            assert _LABEL_KEY.match(key) and _LABEL_VALUE.match(str(value)), \
                f"{where}: label {key}={value} is not valid Kubernetes label syntax"
        if group == "head":
            continue
        lo, hi = spec.get("minReplicas"), spec.get("maxReplicas")
        if not autoscaling:
            assert lo is not None and hi is not None, f"{where}: set minReplicas and maxReplicas"
        if lo is not None and hi is not None:
            assert 0 <= lo <= spec.get("replicas", lo) <= hi, \
                f"{where}: need minReplicas <= replicas <= maxReplicas, got {lo}, {spec.get('replicas')}, {hi}"
        if autoscaling and (cluster.get("autoscalerOptions") or {}).get("version") == "v2":
            assert spec["template"]["spec"].get("restartPolicy", "Never") == "Never", \
                f"{where}: autoscaler v2 needs restartPolicy Never or unset"


# --------------------------------------------------------------------------- checks: Serve

def _models_in(annotation: Any) -> list[type]:
    """The pydantic models a field annotation allows (through Optional, Union, List)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def unknown_serve_keys(model: type, data: Any, path: str) -> list[str]:
    """Keys of `data` that `model` (a Serve pydantic schema) does not declare, recursively."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    out = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in known:
            out.append(where)
            continue
        nested = _models_in(fields[key].annotation) if key in fields else []
        if not nested:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                label = item.get("name", i) if isinstance(item, dict) else i
                out += unknown_serve_keys(nested[0], item, f"{where}[{label}]")
        else:
            out += unknown_serve_keys(nested[0], value, where)
    return out


def check_serve_config(docs: list[Doc]) -> None:
    """serveConfigV2: Ray Serve's schema, no unknown keys, the applications of the contract
    with orchestrator/app.py, and the gRPC proxy on port 9000 with our servicers."""
    from ray.serve.schema import ServeDeploySchema

    cfg = serve_config(docs)
    try:
        ServeDeploySchema.model_validate(cfg)
    except Exception as e:  # pydantic.ValidationError; also Serve's own ValueErrors
        raise AssertionError(f"serveConfigV2 is rejected by Ray Serve: {e}") from None
    unknown = unknown_serve_keys(ServeDeploySchema, cfg, "")
    assert not unknown, f"serveConfigV2 has keys Ray Serve would silently ignore: {unknown}"

    apps = {a["name"]: a for a in cfg["applications"]}
    assert set(apps) == set(APPS), f"serveConfigV2 applications {sorted(apps)} != {sorted(APPS)}"
    for name, (import_path, deployment, _) in APPS.items():
        app = apps[name]
        assert app["import_path"] == import_path, \
            f"application {name}: import_path {app['import_path']!r}, expected {import_path!r}"
        assert app.get("args") == {"config": CONFIG_PATH}, \
            f"application {name}: args must be {{'config': {CONFIG_PATH!r}}}, got {app.get('args')}"
        # Serve routes gRPC only to applications with a route prefix (the `application`
        # metadata picks one); the default '/' would collide between applications.
        assert app.get("route_prefix"), f"application {name} needs a route_prefix to be routable"
        deps = [d["name"] for d in app.get("deployments", [])]
        assert deps == [deployment], f"application {name}: deployments {deps}, expected [{deployment}]"
        opts = app["deployments"][0]
        assert "ray_actor_options" in opts and "num_gpus" in opts["ray_actor_options"], \
            f"deployment {deployment}: set ray_actor_options.num_gpus explicitly"

    grpc = cfg.get("grpc_options", {})
    assert grpc.get("port") == GRPC_PORT, f"grpc_options.port is {grpc.get('port')}, expected {GRPC_PORT}"
    assert set(grpc.get("grpc_servicer_functions", [])) == GRPC_SERVICERS, \
        f"grpc_servicer_functions {grpc.get('grpc_servicer_functions')} != {sorted(GRPC_SERVICERS)}"
    assert grpc.get("enable_reflection") is True, "grpc_options.enable_reflection must be true"


# --------------------------------------------------------------------------- checks: references

def _secret_keys(doc: Doc) -> set[str]:
    return set(doc.get("data", {})) | set(doc.get("stringData", {}))


def check_references(docs: list[Doc]) -> None:
    """Every ConfigMap, Secret (and key) and PVC a pod refers to is in the output; every
    volumeMount names a volume of its pod."""
    configmaps = {d["metadata"]["name"]: set(d.get("data", {})) | set(d.get("binaryData", {}))
                  for d in find(docs, "ConfigMap")}
    secrets = {d["metadata"]["name"]: _secret_keys(d) for d in find(docs, "Secret")}
    pvcs = {d["metadata"]["name"] for d in find(docs, "PersistentVolumeClaim")}

    def need(table: dict | set, kind: str, name: str, key: str | None, where: str) -> None:
        assert name in table, f"{where}: {kind} {name!r} is not in the rendered output"
        if key is not None and isinstance(table, dict):
            assert key in table[name], f"{where}: {kind} {name!r} has no key {key!r}"

    for d in docs:
        templates = [(name_of(d), d["spec"]["template"])] if d["kind"] in WORKLOAD_KINDS else []
        if d["kind"] == "RayService":
            templates = [(w, t) for w, t in pod_templates([d])]
        claim_templates = {t["metadata"]["name"] for t in d.get("spec", {}).get("volumeClaimTemplates", [])}
        for where, tpl in templates:
            spec = tpl["spec"]
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for v in volumes.values():
                if "configMap" in v:
                    need(configmaps, "ConfigMap", v["configMap"]["name"], None, where)
                    for item in v["configMap"].get("items", []):
                        need(configmaps, "ConfigMap", v["configMap"]["name"], item["key"], where)
                if "secret" in v:
                    need(secrets, "Secret", v["secret"]["secretName"], None, where)
                if "persistentVolumeClaim" in v:
                    need(pvcs, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], None, where)
            for c in containers(spec):
                cwhere = f"{where} container {c['name']}"
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes or m["name"] in claim_templates, \
                        f"{cwhere}: volumeMount {m['name']!r} names no volume of the pod"
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {})
                    if "secretKeyRef" in ref:     # an optional key may be absent, its Secret may not
                        k = ref["secretKeyRef"]
                        need(secrets, "Secret", k["name"], None if k.get("optional") else k["key"], cwhere)
                    if "configMapKeyRef" in ref:
                        need(configmaps, "ConfigMap", ref["configMapKeyRef"]["name"],
                             ref["configMapKeyRef"]["key"], cwhere)
                for e in c.get("envFrom", []):
                    if "secretRef" in e:
                        need(secrets, "Secret", e["secretRef"]["name"], None, cwhere)
                    if "configMapRef" in e:
                        need(configmaps, "ConfigMap", e["configMapRef"]["name"], None, cwhere)


def check_services(docs: list[Doc]) -> None:
    """Every Service selects the pods of some template, on ports those pods declare."""
    templates = pod_templates(docs)
    for svc in find(docs, "Service"):
        selector = svc["spec"].get("selector") or {}
        assert selector, f"{name_of(svc)} has no selector"
        matched = [(w, t) for w, t in templates
                   if selector.items() <= (t.get("metadata", {}).get("labels") or {}).items()]
        assert matched, f"{name_of(svc)}: selector {selector} matches no pod template's labels"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for where, tpl in matched:
                declared = [p for c in tpl["spec"]["containers"] for p in c.get("ports", [])]
                ok = any(p.get("name") == target or p["containerPort"] == target for p in declared)
                assert ok, f"{name_of(svc)} port {port.get('name')}: target {target!r} is not a port of {where}"


def check_grpc_ingress(docs: list[Doc], settings=None) -> None:
    """The public gRPC Service is KubeRay's serve Service on port 9000, and port 9000 is what
    Serve listens on, what the Ray containers declare and what the settings say."""
    rs = the_rayservice(docs)
    svc = rs["spec"].get("serveService")
    assert svc, f"{name_of(rs)}: spec.serveService (the gRPC Service) is missing"
    ports = svc["spec"]["ports"]
    grpc = [p for p in ports if p["port"] == GRPC_PORT]
    assert grpc, f"{name_of(rs)}: serveService has no port {GRPC_PORT}"
    p = grpc[0]
    # KubeRay keeps only ports whose name is serve or serve-*, taken from the head container.
    assert p.get("name", "").startswith("serve-"), \
        f"serveService port {GRPC_PORT} must be named serve-<something> for KubeRay, got {p.get('name')!r}"
    assert p.get("targetPort", p["port"]) == GRPC_PORT, "serveService must target port 9000"
    assert "selector" not in svc["spec"], "serveService.selector is ignored by KubeRay: remove it"
    for group, spec in ray_groups(rs):
        ray_container = spec["template"]["spec"]["containers"][0]
        declared = {q.get("name"): q["containerPort"] for q in ray_container.get("ports", [])}
        assert declared.get(p["name"]) == GRPC_PORT, \
            f"group {group}: container {ray_container['name']} must declare port {p['name']}={GRPC_PORT}"
    assert serve_config(docs)["grpc_options"]["port"] == GRPC_PORT
    # the Realtime API and voice page: Serve's HTTP port on the same Service, when deployed
    apps = {a["name"]: a for a in serve_config(docs)["applications"]}
    if "realtime" in apps:
        http_port = serve_config(docs)["http_options"]["port"]
        assert apps["realtime"]["route_prefix"] == "/", "the realtime app serves / (the page) and /v1/realtime"
        http = [q for q in ports if q["port"] == http_port]
        assert http and http[0].get("name", "").startswith("serve-"), \
            f"serveService must open Serve's HTTP port {http_port} (named serve-*) for the Realtime API"
        for group, spec in ray_groups(rs):
            ray_container = spec["template"]["spec"]["containers"][0]
            declared = {q.get("name"): q["containerPort"] for q in ray_container.get("ports", [])}
            assert declared.get(http[0]["name"]) == http_port, \
                f"group {group}: container {ray_container['name']} must declare port {http[0]['name']}={http_port}"
    if settings is not None:
        assert settings.serving.grpc_port == GRPC_PORT, "settings serving.grpc_port must be 9000"


# --------------------------------------------------------------------------- checks: capacity

def _group_capacity(spec: dict, is_head: bool) -> tuple[float, float, int]:
    """(CPUs, GPUs) Ray sees on one pod of a group, and the group's maximum pod count."""
    c = spec["template"]["spec"]["containers"][0]
    limits = c["resources"]["limits"]
    params = spec.get("rayStartParams") or {}
    cpus = float(params["num-cpus"]) if "num-cpus" in params else quantity(limits["cpu"])
    gpus = float(params["num-gpus"]) if "num-gpus" in params else quantity(limits.get(GPU, 0))
    return cpus, gpus, 1 if is_head else spec["maxReplicas"]


def check_capacity(docs: list[Doc]) -> None:
    """Every deployment at its max_replicas fits the cluster at its maximum size, on the
    groups its label_selector allows; whole-GPU replicas need pods with that many GPUs."""
    rs = the_rayservice(docs)
    groups = {g: (spec, _group_capacity(spec, g == "head")) for g, spec in ray_groups(rs)}
    allowed_by: dict[str, frozenset] = {}
    demand: dict[str, tuple[float, float]] = {}
    for app, opts in deployment_options(serve_config(docs)).items():
        actor = opts["ray_actor_options"]
        selector = actor.get("label_selector") or {}
        allowed = frozenset(g for g, (spec, _) in groups.items()
                            if selector.items() <= (spec.get("labels") or {}).items())
        assert allowed, f"deployment {opts['name']}: label_selector {selector} matches no Ray group"
        gpus = float(actor["num_gpus"])
        if gpus >= 1:
            assert any(groups[g][1][1] >= gpus for g in allowed), \
                f"deployment {opts['name']} needs {gpus} GPUs on one pod; no group has that many"
        _, hi = replica_bounds(opts)
        allowed_by[opts["name"]] = allowed
        demand[opts["name"]] = (hi * float(actor.get("num_cpus", 1)), hi * gpus)
    # For each set of groups some deployment is confined to, the deployments confined to it must
    # fit in it (enough for the nested sets that label selectors give here).
    problems = []
    for groups_set in set(allowed_by.values()):
        inside = [n for n, a in allowed_by.items() if a <= groups_set]
        for i, what in ((0, "CPUs"), (1, "GPUs")):
            need = sum(demand[n][i] for n in inside)
            have = sum(groups[g][1][i] * groups[g][1][2] for g in groups_set)
            if need > have + 1e-9:
                problems.append(f"{sorted(inside)} need {need} {what} at max_replicas; "
                                f"groups {sorted(groups_set)} have {have} at maxReplicas")
    assert not problems, "the cluster's maximum size is too small:\n" + "\n".join(problems)
