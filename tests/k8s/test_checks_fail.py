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
from tests.k8s.manifests import Doc, STAGE_GRPC_SERVICERS, find, load_settings, render, the_rayservice
from tests.k8s.security import (
    check_api_keys, check_network_policies, check_prod_secrets, check_stage_services_internal,
)


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
    (lambda d: find(d, "Secret", "baichuan-audio-redis")[0]["data"].pop("url"),
        check_references, "has no key 'url'"),
    (lambda d: d.remove(find(d, "PersistentVolumeClaim")[0]), check_references, "baichuan-audio-models"),
    (lambda d: find(d, "Service")[0]["spec"]["selector"].update(tier="x"), check_services, "matches no pod"),
    (lambda d: find(d, "Service")[0]["spec"]["ports"][0].update(targetPort="nope"), check_services, "nope"),
    (lambda d: the_rayservice(d)["spec"]["serveService"]["spec"]["ports"][0].update(name="grpc"),
        check_grpc_ingress, "serve-"),
    (lambda d: the_rayservice(d)["spec"]["serveService"]["spec"]["ports"].pop(1),
        check_grpc_ingress, "HTTP port 8000"),
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


def _ray_policy(d: list[Doc]) -> Doc:
    return find(d, "NetworkPolicy", "baichuan-audio-ray")[0]


def _secret(d: list[Doc], name: str) -> dict:
    return find(d, "Secret", name)[0]["data"]


@pytest.mark.parametrize("mutation, check, message", [
    (lambda d: d.remove(_ray_policy(d)), check_network_policies, "port 8265: reachable by ['operator', 'other-pod', "
                                                                 "'outside', 'ray']"),
    (lambda d: _ray_policy(d)["spec"]["ingress"][1]["ports"].append({"protocol": "TCP", "port": 10001}),
        check_network_policies, "port 10001: reachable by ['operator', 'other-pod', 'outside', 'ray']"),
    (lambda d: _ray_policy(d)["spec"]["ingress"][2]["from"][0].pop("podSelector"),
        check_network_policies, "port 8265: reachable by ['operator', 'other-pod', 'ray']"),
    (lambda d: _ray_policy(d)["spec"]["ingress"][3].update({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
        check_network_policies, "port 8080: reachable by ['operator', 'other-pod', 'outside', 'ray']"),
    (lambda d: find(d, "NetworkPolicy", "baichuan-audio-redis")[0]["spec"]["ingress"][0].pop("from"),
        check_network_policies, "Redis port 6379: reachable by ['operator', 'other-pod', 'outside', 'ray']"),
    (lambda d: _set_serve(d, lambda c: c["grpc_options"]["grpc_servicer_functions"].append(
        sorted(STAGE_GRPC_SERVICERS)[0])), check_stage_services_internal, "puts stage services on the public"),
    (lambda d: find(d, "ConfigMap")[0]["data"].update({"config.yaml": find(d, "ConfigMap")[0]["data"]["config.yaml"]
                                                      .replace("stage_services: false", "stage_services: true")}),
        check_stage_services_internal, "serving.stage_services must be false"),
    (lambda d: [v.pop("secret") or v.update(emptyDir={}) for g in the_rayservice(d)["spec"]["rayClusterConfig"]
                ["workerGroupSpecs"] for v in g["template"]["spec"]["volumes"] if v["name"] == "api-keys"],
        check_api_keys, "must be a Secret volume"),
    (lambda d: _secret(d, "baichuan-audio-redis").update(password=""), check_prod_secrets, "placeholder password"),
    (lambda d: _secret(d, "baichuan-audio-api-keys").update({"api-keys": ""}), check_prod_secrets, "holds no key"),
])
def test_security_checks_catch_broken_manifests(mutation, check, message, tmp_path):
    docs = _mutated("overlays/prod", mutation)
    args = (docs,) if check in (check_network_policies, check_prod_secrets) else (docs, load_settings(docs, tmp_path))
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(*args)
