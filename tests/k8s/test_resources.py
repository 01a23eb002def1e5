"""Labels, resources and capacity; what each overlay is for."""
from __future__ import annotations

import re

import pytest

from tests.k8s.checks import check_capacity
from tests.k8s.manifests import (
    APPS, GPU, Doc, containers, deployment_options, find, load_settings, name_of, pod_templates, quantity,
    ray_groups, render, replica_bounds, serve_config, the_rayservice,
)


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
