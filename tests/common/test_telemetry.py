"""W3C trace-context propagation, span parenting, metrics, exporter set-up.

Nothing here installs a global provider (that is once per process); tests build their own."""
from __future__ import annotations

import importlib.util
import re

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.settings import Settings, TelemetrySettings
from services.common.telemetry import (
    OTLP_PACKAGE, Metrics, TelemetryError, build_providers, extract_context, get_metrics,
    inject_context, start_span, trace_id_hex,
)

TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def test_inject_produces_a_valid_traceparent(spans):
    provider, _ = spans
    assert inject_context() == {}, "no span, nothing to continue"
    with start_span("turn", tracer_provider=provider) as span:
        carrier = inject_context()
    m = TRACEPARENT_RE.match(carrier["traceparent"])
    assert m, carrier
    sc = span.get_span_context()
    assert m.group(1) == format(sc.trace_id, "032x") != "0" * 32
    assert m.group(2) == format(sc.span_id, "016x") != "0" * 16
    assert int(m.group(3), 16) & 1, "sampled flag set"
    assert trace_id_hex(span) == m.group(1)


def test_span_from_extracted_context_shares_the_trace(spans):
    provider, exporter = spans
    with start_span("orchestrator.turn", tracer_provider=provider) as root:
        carrier = inject_context()
    # another process: raw Redis fields are bytes
    raw = {k.encode(): v.encode() for k, v in carrier.items()}
    with start_span("decoder.job", parent_carrier=raw, tracer_provider=provider) as child:
        assert child.get_span_context().trace_id == root.get_span_context().trace_id
        assert child.get_span_context().span_id != root.get_span_context().span_id
    finished = {s.name: s for s in exporter.get_finished_spans()}
    assert finished["decoder.job"].parent.span_id == root.get_span_context().span_id
    assert finished["decoder.job"].parent.is_remote


def test_missing_or_malformed_context_starts_a_new_trace(spans):
    provider, exporter = spans
    with start_span("outer", tracer_provider=provider) as outer:
        for carrier in ({}, {"traceparent": ""}, {"traceparent": "00-zz-yy-01"}):
            with start_span("job", parent_carrier=carrier, tracer_provider=provider) as s:
                assert s.get_span_context().trace_id != outer.get_span_context().trace_id
    assert all(s.parent is None for s in exporter.get_finished_spans() if s.name == "job")
    assert extract_context(None) is not None


def test_propagation_survives_a_process_without_an_sdk():
    # The global provider is the API's no-op one here: spans are not recorded, but a span
    # opened from an extracted context must still hand the same trace on.
    parent = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    with start_span("vocoder.job", parent_carrier=parent):
        out = inject_context()
    assert out["traceparent"].split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_exceptions_are_recorded_on_the_span(spans):
    provider, exporter = spans
    with pytest.raises(ValueError):
        with start_span("bad", tracer_provider=provider):
            raise ValueError("boom")
    [span] = exporter.get_finished_spans()
    assert not span.status.is_ok and span.events[0].name == "exception"


def test_metrics_record_histograms():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    m = Metrics(meter_provider=provider)
    m.record_time_to_first_text(120.0, mode="spoken")
    m.record_time_to_first_audio(480.0, mode="spoken")
    m.record_time_to_first_audio(520.0, mode="spoken")
    m.record_real_time_factor(0.25)
    m.record_queue_lag("decoder", 3.0)
    m.record_queue_lag("decoder", -1.0)  # clock skew between hosts: clamped to 0
    points = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    points[metric.name] = (p.count, p.sum, dict(p.attributes), metric.unit)
    assert points["baichuan_audio.turn.time_to_first_text"] == (1, 120.0, {"mode": "spoken"}, "ms")
    assert points["baichuan_audio.turn.time_to_first_audio"][:2] == (2, 1000.0)
    assert points["baichuan_audio.turn.real_time_factor"][:2] == (1, 0.25)
    assert points["baichuan_audio.stage.queue_lag"][:3] == (2, 3.0, {"stage": "decoder"})
    provider.shutdown()


def test_metrics_are_a_noop_when_not_configured():
    get_metrics().record_queue_lag("llm", 5.0)  # must not raise or print
    assert get_metrics() is get_metrics()


def test_exporter_none_exports_nothing_but_keeps_real_trace_ids():
    tp, mp = build_providers(TelemetrySettings())
    assert mp is None                                          # metrics stay no-ops
    assert isinstance(tp, TracerProvider)
    assert tp._active_span_processor._span_processors == ()     # no exporter behind it
    with start_span("turn", tracer_provider=tp):
        carrier = inject_context()
    assert TRACEPARENT_RE.match(carrier["traceparent"])         # ... yet the context propagates


def test_console_exporter_builds_sdk_providers():
    tp, mp = build_providers(Settings.load(env={"BAICHUAN_AUDIO__TELEMETRY__EXPORTER": "console"}))
    assert isinstance(tp, TracerProvider) and isinstance(mp, MeterProvider)
    assert tp.resource.attributes["service.name"] == "baichuan-audio"
    tp.shutdown()
    mp.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("opentelemetry.exporter.otlp") is not None,
                    reason="the OTLP exporter is installed here")
def test_otlp_without_its_package_names_the_package():
    with pytest.raises(TelemetryError, match=f"pip install {OTLP_PACKAGE}"):
        build_providers(TelemetrySettings(exporter="otlp", otlp_endpoint="http://localhost:4317"))
