"""Safe defaults of the pods this repository runs: non-root, no privilege escalation, no
capabilities, read-only root filesystems with writable emptyDirs where Ray writes, and
disruption budgets for the Ray worker groups and Redis. (Redis's security context is checked
by its own tests.)"""
from __future__ import annotations

import copy
import re

import pytest

from tests.k8s.manifests import Doc, containers, find, name_of, pod_templates, ray_groups, render, the_rayservice

# Where Ray and the libraries it loads write at run time (the image's HOME is /home/ray).
RAY_WRITABLE = ("/tmp", "/home/ray", "/dev/shm")


def _ours(docs: list[Doc]) -> list[tuple[str, dict]]:
    return [(w, t) for w, t in pod_templates(docs) if "redis" not in w]


def check_security(docs: list[Doc]) -> None:
    for where, tpl in _ours(docs):
        spec = tpl["spec"]
        pod = spec.get("securityContext") or {}
        assert pod.get("runAsNonRoot") is True, f"{where}: set securityContext.runAsNonRoot"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: no RuntimeDefault seccomp"
        for c in containers(spec):
            sc = c.get("securityContext") or {}
            cw = f"{where} container {c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation must be false"
            assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), f"{cw}: drop ALL capabilities"
            assert sc.get("readOnlyRootFilesystem") is True, f"{cw}: the root filesystem must be read-only"
            assert (sc.get("runAsUser", pod.get("runAsUser")) or 0) != 0, f"{cw}: runs as uid 0"
    rs = the_rayservice(docs)
    for group, spec in ray_groups(rs):
        spec = spec["template"]["spec"]
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0].get("volumeMounts", [])}
        for path in RAY_WRITABLE:
            assert path in mounts and "emptyDir" in vols.get(mounts[path], {}), \
                f"{name_of(rs)} group {group}: {path} must be a writable emptyDir (read-only root)"
    cluster = rs["spec"]["rayClusterConfig"]
    if cluster.get("enableInTreeAutoscaling"):
        sc = cluster["autoscalerOptions"].get("securityContext") or {}
        assert sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True, \
            f"{name_of(rs)}: autoscalerOptions.securityContext must match the Ray containers'"


def check_disruption_budgets(docs: list[Doc]) -> None:
    """Each Ray worker group has a budget that selects its pods; each budget selects some pod."""
    pdbs = find(docs, "PodDisruptionBudget")
    templates = pod_templates(docs)
    for pdb in pdbs:
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(sel.items() <= (t["metadata"].get("labels") or {}).items() for _, t in templates), \
            f"{name_of(pdb)}: selector {sel} matches no pod template"
        assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"], f"{name_of(pdb)}: no budget"
    rs = the_rayservice(docs)
    for group, spec in ray_groups(rs)[1:]:
        labels = spec["template"]["metadata"]["labels"]
        assert any(p["spec"]["selector"]["matchLabels"].items() <= labels.items() for p in pdbs), \
            f"{name_of(rs)} group {group}: no PodDisruptionBudget selects its pods"
    # Redis is one pod holding every turn's state: a drain must not take it unannounced.
    for sts in find(docs, "StatefulSet"):
        labels = sts["spec"]["template"]["metadata"]["labels"]
        held = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert any(p["spec"].get("minAvailable") == sts["spec"].get("replicas", 1) for p in held), \
            f"{name_of(sts)}: needs a PodDisruptionBudget with minAvailable equal to its replicas"


def test_security_contexts(docs):
    check_security(docs)


def test_disruption_budgets(docs):
    check_disruption_budgets(docs)


def _ray_spec(docs, group: int):
    return the_rayservice(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"][group]["template"]["spec"]


@pytest.mark.parametrize("mutation, check, message", [
    (lambda d: _ray_spec(d, 0)["securityContext"].pop("runAsNonRoot"), check_security, "runAsNonRoot"),
    (lambda d: _ray_spec(d, 1)["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
     check_security, "allowPrivilegeEscalation"),
    (lambda d: _ray_spec(d, 0)["containers"][0]["securityContext"].update(capabilities={"drop": []}),
     check_security, "drop ALL"),
    (lambda d: _ray_spec(d, 0)["containers"][0]["volumeMounts"].pop(), check_security, "/dev/shm"),
    (lambda d: find(d, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["securityContext"]
     .update(readOnlyRootFilesystem=False), check_security, "read-only"),
    (lambda d: d.remove(find(d, "PodDisruptionBudget", "baichuan-audio-ray-gpu-worker")[0]),
     check_disruption_budgets, "group gpu"),
    (lambda d: find(d, "PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"].update(tier="x"),
     check_disruption_budgets, "matches no pod"),
    (lambda d: d.remove(find(d, "PodDisruptionBudget", "baichuan-audio-redis")[0]),
     check_disruption_budgets, "baichuan-audio-redis: needs a PodDisruptionBudget"),
    (lambda d: find(d, "PodDisruptionBudget", "baichuan-audio-redis")[0]["spec"].update(minAvailable=0),
     check_disruption_budgets, "minAvailable equal to its replicas"),
])
def test_checks_catch_unsafe_pods(mutation, check, message):
    docs = copy.deepcopy(render("overlays/prod"))
    mutation(docs)
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(docs)
