"""Tracing and metrics: OpenTelemetry set-up, W3C trace-context propagation, latency histograms.

One trace spans a whole turn although the turn crosses processes (orchestrator, LLM replica,
decoder and vocoder pools) through Redis stream entries. Each entry carries the W3C
`traceparent` / `tracestate` of the span that wrote it (`inject_context`); the stage that reads
it opens its span as a child of that context (`start_span(name, parent_carrier=entry fields)`).

Without `setup_telemetry` the OpenTelemetry API is a no-op: spans are not recorded and metrics
are dropped, but propagation still works (a span opened from an extracted context keeps the
caller's trace id), so traces stay connected across a process that exports nothing.

    exporter: none     nothing is exported (default)
              console  spans and metrics printed to stdout (local debugging)
              otlp     OTLP/gRPC to `otlp_endpoint` (opentelemetry-exporter-otlp-proto-grpc, a dependency)
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:  # settings imports nothing from here; avoid a hard cycle at import time
    from services.common.settings import Settings, TelemetrySettings

INSTRUMENTATION_NAME = "baichuan_audio"
OTLP_PACKAGE = "opentelemetry-exporter-otlp"

# The W3C Trace Context propagator only (no baggage): exactly the `traceparent` and
# `tracestate` fields every bus entry carries.
_PROPAGATOR = TraceContextTextMapPropagator()
TRACE_FIELDS = ("traceparent", "tracestate")


class TelemetryError(RuntimeError):
    """Telemetry cannot be set up as configured (e.g. the OTLP exporter package is missing)."""


# --------------------------------------------------------------------------- set-up

_lock = threading.Lock()
_tracer_provider: Any = None  # the SDK TracerProvider this process installed, if any
_meter_provider: Any = None


def _telemetry_settings(settings: "Settings | TelemetrySettings") -> "TelemetrySettings":
    return getattr(settings, "telemetry", settings)  # accept the whole Settings or its section


def _otlp_exporters(endpoint: str) -> tuple[Any, Any]:
    try:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise TelemetryError(
            f"telemetry.exporter is 'otlp' but the OTLP exporter is not installed: "
            f"pip install {OTLP_PACKAGE} (or set telemetry.exporter to 'console' or 'none')"
        ) from e
    kw = {"endpoint": endpoint} if endpoint else {}  # empty: the exporter's own default/env
    return OTLPSpanExporter(**kw), OTLPMetricExporter(**kw)


def build_providers(settings: "Settings | TelemetrySettings") -> tuple[Any, Any]:
    """(TracerProvider, MeterProvider) for the configured exporter.

    'none' still gives a TracerProvider, without any exporter: spans then have real ids, so the
    trace context travels through the stream entries (and can be logged) at almost no cost;
    its MeterProvider is None (metrics stay no-ops).
    Nothing global is touched; `setup_telemetry` installs them. Tests build their own."""
    t = _telemetry_settings(settings)
    if t.exporter == "none":
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        return TracerProvider(resource=Resource.create({"service.name": t.service_name})), None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if t.exporter == "console":
        span_exporter, metric_exporter = ConsoleSpanExporter(), ConsoleMetricExporter()
    elif t.exporter == "otlp":
        span_exporter, metric_exporter = _otlp_exporters(t.otlp_endpoint)
    else:  # Settings validates this; a hand-built section may not have been
        raise TelemetryError(f"telemetry.exporter must be none, console or otlp, not {t.exporter!r}")
    resource = Resource.create({"service.name": t.service_name})
    tracer_provider = TracerProvider(resource=resource)
    # Batching keeps span export off the hot path (one background thread per process).
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    reader = PeriodicExportingMetricReader(
        metric_exporter, export_interval_millis=int(t.metrics_interval_s * 1000))
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    return tracer_provider, meter_provider


def setup_telemetry(settings: "Settings | TelemetrySettings") -> tuple[Any, Any]:
    """Install the configured tracer and meter providers globally, once per process.

    Returns (tracer_provider, meter_provider); the meter provider is None for exporter 'none'.
    OpenTelemetry allows one global provider per process, so a second call returns the first
    providers."""
    global _tracer_provider, _meter_provider
    with _lock:
        if _tracer_provider is not None:
            return _tracer_provider, _meter_provider
        tracer_provider, meter_provider = build_providers(settings)
        trace.set_tracer_provider(tracer_provider)
        if meter_provider is not None:
            metrics.set_meter_provider(meter_provider)
        _tracer_provider, _meter_provider = tracer_provider, meter_provider
        return tracer_provider, meter_provider


def setup_tracing(settings: "Settings | TelemetrySettings") -> Any:
    """Install tracing (and metrics) for this process; returns the TracerProvider or None."""
    return setup_telemetry(settings)[0]


def shutdown_telemetry() -> None:
    """Flush and stop the exporters installed by `setup_telemetry` (call at process exit)."""
    with _lock:
        for p in (_tracer_provider, _meter_provider):
            if p is not None:
                p.shutdown()


# --------------------------------------------------------------------------- propagation

def inject_context(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """The W3C trace context of `ctx` (default: the current one) as {'traceparent', 'tracestate'}.

    Empty when there is no valid span in the context (nothing to continue)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier


def extract_context(carrier: Mapping[str, Any] | None) -> otel_context.Context:
    """A context whose parent span is the one named by `carrier['traceparent']`.

    Accepts str or bytes values (raw Redis fields); a missing or malformed traceparent gives a
    context without a parent, so a new trace starts instead of an error."""
    clean: dict[str, str] = {}
    for k in TRACE_FIELDS:
        v = (carrier.get(k) or carrier.get(k.encode())) if carrier else None  # type: ignore[call-overload]
        if isinstance(v, bytes):
            v = v.decode("ascii", "replace")
        if v:
            clean[k] = v
    return _PROPAGATOR.extract(clean)


def tracer(tracer_provider: Any = None) -> trace.Tracer:
    """The stack's tracer; resolved through the global proxy so a later set-up still applies."""
    return trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)


@contextmanager
def start_span(
    name: str,
    parent_carrier: Mapping[str, Any] | None = None,
    attributes: Mapping[str, Any] | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    tracer_provider: Any = None,
) -> Iterator[trace.Span]:
    """Open a span as the current one; its parent is `parent_carrier`'s trace context if given
    (a job read from a stream), else the current span. Exceptions are recorded on the span."""
    ctx = extract_context(parent_carrier) if parent_carrier is not None else None
    with tracer(tracer_provider).start_as_current_span(
        name, context=ctx, kind=kind, attributes=dict(attributes) if attributes else None,
    ) as span:
        yield span


def trace_id_hex(span: trace.Span | None = None) -> str:
    """The 32-hex-digit trace id of `span` (default: the current span), '' if none (for logs)."""
    sc = (span or trace.get_current_span()).get_span_context()
    return format(sc.trace_id, "032x") if sc.is_valid else ""


# --------------------------------------------------------------------------- metrics

class Metrics:
    """The stack's instruments. Record through these methods; the attribute keys are `stage`
    for the work-stream ones, `mode` (spoken/text/asr/tts) for the turn-level ones and
    `method`, `status` (a gRPC status name, OK included) for calls. The collector of
    k8s/components/monitoring turns them into Prometheus series for its dashboard and alerts.

    Built over the global meter by default: until `setup_telemetry` installs a provider the
    instruments are no-op proxies, and they start recording once one is installed."""

    def __init__(self, meter_provider: Any = None) -> None:
        meter = metrics.get_meter(INSTRUMENTATION_NAME, meter_provider=meter_provider)
        self.time_to_first_text = meter.create_histogram(
            "baichuan_audio.turn.time_to_first_text", unit="ms",
            description="Turn start (request received) to the first text delta sent")
        self.time_to_first_audio = meter.create_histogram(
            "baichuan_audio.turn.time_to_first_audio", unit="ms",
            description="Turn start (request received) to the first audio chunk sent")
        self.real_time_factor = meter.create_histogram(
            "baichuan_audio.turn.real_time_factor", unit="1",
            description="Wall time of the turn divided by the duration of the audio produced")
        self.queue_lag = meter.create_histogram(
            "baichuan_audio.stage.queue_lag", unit="ms",
            description="Time a job waited in its stage's work stream before a replica took it")
        self.stage_latency = meter.create_histogram(
            "baichuan_audio.stage.latency", unit="ms",
            description="Time a stage spent on a job (a batch's time for each job in it)")
        self.backlog = meter.create_gauge(
            "baichuan_audio.stage.backlog", unit="{job}",
            description="Jobs in a stage's work stream (waiting or running), as autoscaling sees it")
        self.dead_lettered = meter.create_counter(
            "baichuan_audio.stage.dead_lettered", unit="{job}",
            description="Jobs moved to a stage's dead-letter stream (their audio is lost)")
        self.calls = meter.create_counter(
            "baichuan_audio.rpc.calls", unit="{call}",
            description="gRPC calls served, by method and final status (OK or the error's code)")

    def record_time_to_first_text(self, ms: float, **attributes: Any) -> None:
        self.time_to_first_text.record(ms, attributes or None)

    def record_time_to_first_audio(self, ms: float, **attributes: Any) -> None:
        self.time_to_first_audio.record(ms, attributes or None)

    def record_real_time_factor(self, rtf: float, **attributes: Any) -> None:
        self.real_time_factor.record(rtf, attributes or None)

    def record_queue_lag(self, stage: str, ms: float, **attributes: Any) -> None:
        self.queue_lag.record(max(0.0, ms), {"stage": stage, **attributes})

    def record_stage_latency(self, stage: str, ms: float, **attributes: Any) -> None:
        self.stage_latency.record(max(0.0, ms), {"stage": stage, **attributes})

    def record_backlog(self, stage: str, jobs: float) -> None:
        self.backlog.set(jobs, {"stage": stage})

    def record_dead_lettered(self, stage: str) -> None:
        self.dead_lettered.add(1, {"stage": stage})

    def record_call(self, method: str, status: str) -> None:
        self.calls.add(1, {"method": method, "status": status})


_default_metrics: Metrics | None = None


def get_metrics() -> Metrics:
    """The process-wide `Metrics` over the global meter (created on first use)."""
    global _default_metrics
    if _default_metrics is None:
        with _lock:
            if _default_metrics is None:
                _default_metrics = Metrics()
    return _default_metrics
