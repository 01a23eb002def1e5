"""The instruments behind the dashboard and alerts (k8s/components/monitoring) are recorded where
the work happens: stage latency and dead letters by the worker, backlog by a replica's
autoscaling report, calls by status by grpc_errors. Real redis-server, real meter provider."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.common import telemetry
from services.common.bus import Bus
from services.common.entries import Job, PermanentError
from services.common.errors import NotFound
from services.common.grpc_status import StatusError, grpc_errors
from services.common.telemetry import Metrics
from services.common.worker import start_worker
from tests.common.test_bus import decode_job


@pytest.fixture
def meter():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield Metrics(meter_provider=provider), reader
    provider.shutdown()


def points(reader: InMemoryMetricReader) -> dict[str, list]:
    out: dict[str, list] = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = list(metric.data.data_points)
    return out


@pytest.mark.parametrize("batched", [False, True], ids=["one job", "batched"])
def test_worker_records_stage_latency_and_dead_letters(redis_url, uid, meter, batched):
    metrics, reader = meter
    stream = f"jobs:{uid}"
    bus = Bus(redis_url, metrics=metrics)
    bus.submit(stream, decode_job(uid, 1))
    bus.submit(stream, decode_job(uid, 2))

    def outcome(job: Job):
        return PermanentError("bad codes") if job.entry.segment == 1 else []

    def handler(job: Job):
        time.sleep(0.02)
        if isinstance(outcome(job), Exception):
            raise outcome(job)
        return []

    def batch_handler(jobs: list[Job]):
        time.sleep(0.02)
        return [outcome(j) for j in jobs]

    stop = threading.Event()
    t = start_worker(bus, stream, "g", "w", batch_handler if batched else handler, stop, stage="vocoder",
                     block_ms=10, batched=batched, count=2)
    deadline = time.monotonic() + 10
    while t.stats.completed + t.stats.dead_lettered < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    t.join(5)
    got = points(reader)
    [latency] = got["baichuan_audio.stage.latency"]
    assert latency.count == 2 and latency.sum >= 20 * (1 + (not batched)) and dict(latency.attributes) == {"stage": "vocoder"}
    [dead] = got["baichuan_audio.stage.dead_lettered"]
    assert dead.value == 1 and dict(dead.attributes) == {"stage": "vocoder"}


def test_grpc_errors_counts_calls_by_status(meter, monkeypatch):
    metrics, reader = meter
    monkeypatch.setattr(telemetry, "_default_metrics", metrics)  # the process-wide instruments

    class Servicer:
        @grpc_errors
        def Ok(self, request, grpc_context=None):
            return "fine"

        @grpc_errors
        async def Stream(self, request, grpc_context=None):
            yield 1
            yield 2

        @grpc_errors
        async def Missing(self, request, grpc_context=None):
            raise NotFound("no such session")

    import asyncio

    async def drain(stream):
        return [x async for x in stream]

    assert Servicer().Ok(None) == "fine"
    assert asyncio.run(drain(Servicer().Stream(None))) == [1, 2]
    with pytest.raises(StatusError):
        asyncio.run(Servicer().Missing(None))
    calls = {(p.attributes["method"], p.attributes["status"]): p.value
             for p in points(reader)["baichuan_audio.rpc.calls"]}
    assert {(m.rsplit(".", 1)[-1], s): n for (m, s), n in calls.items()} == {
        ("Ok", "OK"): 1, ("Stream", "OK"): 1, ("Missing", grpc.StatusCode.NOT_FOUND.name): 1}


def test_backlog_is_reported_as_a_gauge(redis_url, uid, meter):
    from services.common.settings import Settings
    from services.common.stage_worker import WorkStreamReplica

    metrics, reader = meter
    release = threading.Event()
    settings = Settings.load(env={"REDIS_URL": redis_url, "BAICHUAN_AUDIO__BUS__BLOCK_MS": "100"})
    stream = f"jobs:{uid}"
    Bus(redis_url).submit(stream, decode_job(uid, 1))
    r = WorkStreamReplica()
    r.start_worker(settings, stream, "decoder", lambda jobs: release.wait(10) and [[] for _ in jobs], 1)
    r.worker.bus.metrics = metrics
    try:
        r.record_autoscaling_stats()
    finally:
        release.set()
        r.worker.stop()
    [backlog] = points(reader)["baichuan_audio.stage.backlog"]
    assert backlog.value == 1 and dict(backlog.attributes) == {"stage": "decoder"}
