"""The checks fail on broken manifests (the unbroken ones pass them: the other tests)."""
from __future__ import annotations

import copy
import re

import pytest
import yaml

from tests.k8s.checks import (
    check_capacity, check_core_objects, check_grpc_ingress, check_kuberay_rules, check_rayservice,
    check_references, check_serve_config, check_services,
)
from tests.k8s.manifests import Doc, find, render, the_rayservice


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
    (lambda d: find(d, "PodMonitor")[0]["spec"]["podMetricsEndpoints"][0].update(prot="metrics"),
        check_core_objects, "prot"),
    (lambda d: find(d, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0].update({"for": "ten minutes"}),
        check_core_objects, "ten minutes"),
])
def test_checks_catch_broken_manifests(mutation, check, message):
    # (the unbroken prod manifests pass each check: the tests above)
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(_mutated("overlays/prod", mutation))
