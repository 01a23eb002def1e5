"""The rendered objects validate: schemas, KubeRay rules, Serve config, builders, references."""
from __future__ import annotations

import importlib

import pytest
import yaml

from tests.k8s.checks import (
    check_core_objects, check_grpc_ingress, check_kuberay_rules, check_rayservice, check_references,
    check_serve_config, check_services,
)
from tests.k8s.manifests import (
    APPS, GRPC_SERVICERS, K8S, KUSTOMIZATIONS, deployment_options, load_settings, render, serve_config,
    settings_text,
)


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
