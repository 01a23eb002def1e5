"""The metric names the stack emits, as Prometheus sees them, and the names a PromQL query uses."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import yaml

from tests.k8s.manifests import K8S
from tests.parity import missing

MONITORING = K8S / "components" / "monitoring"
# Series that come from the cluster's own exporters, not from code in this repository:
# kubelet/cAdvisor and kube-state-metrics (both part of kube-prometheus-stack).
CLUSTER_METRICS = {"container_memory_working_set_bytes", "kube_pod_container_resource_limits"}

_PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "by",
    "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "rate", "irate", "increase", "delta", "histogram_quantile", "abs", "clamp_min", "clamp_max", "vector",
}


@functools.lru_cache(maxsize=1)
def emitted_by_the_stack() -> frozenset[str]:
    """Every Prometheus series name of services/common/telemetry.Metrics: each of its
    instruments records once through OpenTelemetry's Prometheus exporter, which names the
    series the way the collector's Prometheus exporter does (unit and _total suffixes)."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
    except ImportError:
        missing("opentelemetry-exporter-prometheus is not installed (the test extra)")
    from opentelemetry.metrics import Counter, Histogram, UpDownCounter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.metrics import _Gauge as Gauge

    from services.common.telemetry import Metrics

    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        m = Metrics(provider)
        for inst in vars(m).values():
            if isinstance(inst, Histogram):
                inst.record(1.0)
            elif isinstance(inst, (Counter, UpDownCounter)):
                inst.add(1)
            elif isinstance(inst, Gauge):
                inst.set(1.0)
        return frozenset(s.name for fam in reader._collector.collect() for s in fam.samples
                         if s.name != "target_info")
    finally:
        provider.shutdown()  # also unregisters the reader from prometheus_client


@functools.lru_cache(maxsize=1)
def emitted_by_ray_serve() -> frozenset[str]:
    """The metrics Ray Serve defines (ray.util.metrics in its source), as Ray exports them
    (prefix ray_; counters _total; histograms _bucket/_sum/_count)."""
    import ray.serve

    out = set()
    pattern = re.compile(r"metrics\.(Gauge|Counter|Histogram)\(\s*[\"']([a-z0-9_]+)[\"']")
    for path in Path(ray.serve.__file__).parent.rglob("*.py"):
        for kind, name in pattern.findall(path.read_text(errors="replace")):
            base = f"ray_{name}"
            out |= ({base} if kind == "Gauge" else {f"{base}_total"} if kind == "Counter"
                    else {f"{base}_bucket", f"{base}_sum", f"{base}_count"})
    return frozenset(out)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, grouping labels, ranges,
    strings and function names left out)."""
    text = re.sub(r'"(\\.|[^"\\])*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[m.end():].lstrip()
        if m.group() in _PROMQL_WORDS or rest.startswith("(") or text[m.start() - 1:m.start()] == "$":
            continue
        names.add(m.group())
    return names


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    out = []
    panels = list(dashboard.get("panels", []))
    while panels:
        p = panels.pop()
        panels += p.get("panels", [])  # rows
        out += [(p.get("title", "?"), t["expr"]) for t in p.get("targets", []) if t.get("expr")]
    return out


def alert_rules(rule_doc: dict) -> list[dict]:
    return [r for g in rule_doc["spec"]["groups"] for r in g["rules"]]


def load_rules() -> dict:
    return yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
