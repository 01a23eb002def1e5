"""Dashboards and alerts query only metrics the code emits; every emitted metric is charted."""
from __future__ import annotations

import json

import pytest

from tests.k8s.observability import (
    CLUSTER_METRICS, MONITORING, alert_rules, dashboard_queries, emitted_by_ray_serve,
    emitted_by_the_stack, load_rules, metric_names,
)


def known() -> frozenset[str]:
    return emitted_by_the_stack() | emitted_by_ray_serve() | CLUSTER_METRICS


def check_queries(queries: list[tuple[str, str]], what: str) -> None:
    emitted = known()
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{what} {title!r}: no metric in {expr!r}"
        unknown = names - emitted
        assert not unknown, f"{what} {title!r} queries {sorted(unknown)}, which nothing emits"


def check_every_metric_charted(queries: list[tuple[str, str]]) -> None:
    """Each instrument of Metrics shows on the dashboard (by one of its series)."""
    used = set().union(*(metric_names(e) for _, e in queries))
    families = set()
    for name in emitted_by_the_stack():
        for suffix in ("_bucket", "_sum", "_count", "_created"):
            name = name.removesuffix(suffix)
        families.add(name)
    missing = {f for f in families if not any(u == f or u.startswith(f + "_") for u in used)}
    assert not missing, f"the dashboard charts none of {sorted(missing)}"


def _dashboard() -> dict:
    return json.loads((MONITORING / "dashboard.json").read_text())


def test_the_stack_emits_the_metrics_the_issue_names():
    names = emitted_by_the_stack()
    for family in ("time_to_first_audio", "time_to_first_text", "real_time_factor", "queue_lag",
                   "stage_latency", "stage_backlog", "dead_lettered", "rpc_calls"):
        assert any(family in n for n in names), f"no emitted series for {family}: {sorted(names)}"
    assert "ray_serve_deployment_replica_healthy" in emitted_by_ray_serve()


def test_dashboard_queries_emitted_metrics():
    check_queries(dashboard_queries(_dashboard()), "dashboard panel")
    check_every_metric_charted(dashboard_queries(_dashboard()))


def test_alerts_query_emitted_metrics():
    rules = alert_rules(load_rules())
    check_queries([(r["alert"], r["expr"]) for r in rules], "alert")
    exprs = " ".join(r["expr"] for r in rules)
    for needed in ("time_to_first_audio", "rpc_calls_total", "dead_lettered_total", "container_memory"):
        assert needed in exprs, f"no alert on {needed}"
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"], r["alert"]


def test_metric_names_of_promql():
    assert metric_names('histogram_quantile(0.95, sum by (le, stage) (rate(a_bucket{x="y"}[5m]))) > 2') == {"a_bucket"}
    assert metric_names("sum(rate(b_total[$__rate_interval])) / sum(c)") == {"b_total", "c"}


@pytest.mark.parametrize("old, new", [
    ("baichuan_audio_turn_time_to_first_audio_milliseconds_bucket", "baichuan_audio_turn_ttfa_milliseconds_bucket"),
    ("baichuan_audio_stage_backlog", "baichuan_audio_stage_backlog_jobs"),
])
def test_a_query_of_a_metric_nobody_emits_fails(old, new):
    text = (MONITORING / "dashboard.json").read_text()
    assert old in text
    with pytest.raises(AssertionError, match="nothing emits"):
        check_queries(dashboard_queries(json.loads(text.replace(old, new))), "dashboard panel")


def test_an_uncharted_metric_fails():
    d = _dashboard()
    d["panels"] = [p for p in d["panels"] if "backlog" not in json.dumps(p)]
    with pytest.raises(AssertionError, match="charts none"):
        check_every_metric_charted(dashboard_queries(d))
