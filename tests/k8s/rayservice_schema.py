"""The stored RayService schema (k8s/schemas/rayservice-v1.json), made from KubeRay's CRD:
    python -m tests.k8s.rayservice_schema ray.io_rayservices.yaml v1.7.0
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.k8s.manifests import RAYSERVICE_SCHEMA


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
                     "kubernetes-validate. Regenerate: python -m tests.k8s.rayservice_schema "
                     "CRD.yaml VERSION"),
        "kuberay_version": kuberay_version,
        "schema": trim_crd_schema(v1["schema"]["openAPIV3Schema"]),
    }
    RAYSERVICE_SCHEMA.parent.mkdir(parents=True, exist_ok=True)
    RAYSERVICE_SCHEMA.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return RAYSERVICE_SCHEMA


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(f"wrote {write_rayservice_schema(sys.argv[1], sys.argv[2])}")
    else:
        sys.exit("usage: python -m tests.k8s.rayservice_schema CRD.yaml KUBERAY_VERSION")
