"""The rendered manifests keep the stack closed: NetworkPolicies, the stage services off the
ingress, API keys from a mounted Secret, and a prod overlay that does not render without its
secrets (so it never deploys a template's placeholder)."""
from __future__ import annotations

from tests.k8s.manifests import copy_of_k8s, kustomize, load_settings, render
from tests.k8s.security import (
    check_api_keys, check_network_policies, check_prod_secrets, check_stage_services_internal,
)


def test_network_policies_keep_ray_and_redis_internal(docs):
    check_network_policies(docs)


def test_stage_services_are_not_on_the_ingress(docs, tmp_path):
    check_stage_services_internal(docs, load_settings(docs, tmp_path))


def test_api_keys_come_from_a_mounted_secret(docs, tmp_path):
    check_api_keys(docs, load_settings(docs, tmp_path))


def test_prod_refuses_to_render_without_its_secrets():
    """The checkout's prod overlay without secrets/ (it is out of git): kustomize fails and
    says which file is missing; with them, no template value is left."""
    proc = kustomize(copy_of_k8s(secrets=False) / "overlays" / "prod")
    assert proc.returncode != 0, "prod rendered without secrets/: it would deploy the placeholder Secret"
    assert "secrets/redis.env" in proc.stderr, proc.stderr
    check_prod_secrets(render("overlays/prod"))
