"""The work-stream worker (services/common/worker.py) against a real redis-server: shared
consumer groups, once-only results, reclaim, retries and dead letters, tracing, and a loop that
outlives failures around the handler."""
from __future__ import annotations

import dataclasses
import threading
import time

import redis

from services.common.bus import Bus
from services.common.entries import Job, PcmChunk, PermanentError, TextDelta
from services.common.telemetry import start_span
from services.common.worker import start_worker, worker_options
from tests.common.test_bus import TRACEPARENT, decode_job


def test_workers_share_jobs_and_publish_each_result_once(bus, redis_url, uid):
    stream, n = f"jobs:{uid}", 24
    out = bus.turn_stream(uid, "audio")
    done_by: dict[str, list[int]] = {"w0": [], "w1": []}

    def make_handler(name: str):
        def handler(job: Job):
            time.sleep(0.01)  # long enough that the other worker takes the next job
            done_by[name].append(job.entry.segment)
            key = Bus.result_key("vocoder", uid, job.entry.segment, 0)
            return [(out, PcmChunk.from_pcm16(uid, job.entry.segment, 0, b"\1\0", 24000), key)]
        return handler

    for s in range(n):
        bus.submit(stream, decode_job(uid, s))
    stop = threading.Event()
    threads = [start_worker(Bus(redis_url), stream, "g", name, make_handler(name), stop,
                            block_ms=50, visibility_timeout_ms=5000) for name in done_by]
    deadline = time.monotonic() + 20
    while bus.redis.xlen(out) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join(5)
    segs = [m.entry.segment for m in bus.read({out: "0"})]
    assert sorted(segs) == list(range(n))
    assert sorted(done_by["w0"] + done_by["w1"]) == list(range(n))
    assert done_by["w0"] and done_by["w1"], "both consumers got work"
    assert sum(t.stats.completed for t in threads) == n
    assert bus.redis.xlen(stream) == 0
    assert bus.redis.xpending(stream, "g")["pending"] == 0


def test_worker_serves_the_urgent_lane_first(bus, redis_url, uid):
    """A backlog in the stream, then an urgent job: the worker's next batch is the urgent one,
    and a job of the urgent lane whose consumer died is reclaimed like any other."""
    from services.common.entries import lanes

    urgent, normal = lanes(f"jobs:{uid}")
    for st in (urgent, normal):
        bus.ensure_group(st, "g")
    bus.submit(urgent, decode_job(uid, 99))
    [held] = bus.claim_next([urgent, normal], "g", "dying")     # then "dies"
    for s in range(6):
        bus.submit(normal, decode_job(uid, s))
    order: list[int] = []
    gate = threading.Event()

    def handler(job: Job):
        if job.entry.segment == 0:
            bus.submit(urgent, decode_job(uid, 50))     # arrives behind five queued jobs
            gate.set()
        order.append(job.entry.segment)
        return []

    stop = threading.Event()
    t = start_worker(Bus(redis_url), [urgent, normal], "g", "w", handler, stop, block_ms=20, count=1,
                     visibility_timeout_ms=300, reclaim_interval_ms=100)
    deadline = time.monotonic() + 10
    while len(order) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    t.join(5)
    assert order.index(50) < order.index(1), order   # before segments 1..5 that waited longer
    assert sorted(order) == [0, 1, 2, 3, 4, 5, 50, 99] and t.stats.reclaimed == 1
    assert held.entry.segment == 99 and gate.is_set()
    assert bus.redis.xlen(urgent) == 0 and bus.redis.xlen(normal) == 0


def test_dead_consumer_job_is_reclaimed_and_completed_exactly_once(bus, redis_url, uid):
    stream, out = f"jobs:{uid}", bus.turn_stream(uid, "audio")
    bus.ensure_group(stream, "g")
    bus.submit(stream, decode_job(uid, 5, 2))
    [held] = bus.claim_next(stream, "g", "dying")  # claims it, then "dies" without acking
    assert bus.reclaim_stale(stream, "g", "other", min_idle_ms=60_000) == []

    def handler(job: Job):
        e = job.entry
        return [(out, PcmChunk.from_pcm16(uid, e.segment, e.chunk, b"\2\0", 24000),
                 Bus.result_key("vocoder", e.turn_id, e.segment, e.chunk))]

    stop = threading.Event()
    t = start_worker(Bus(redis_url), stream, "g", "rescuer", handler, stop, block_ms=20,
                     visibility_timeout_ms=150, reclaim_interval_ms=20)
    deadline = time.monotonic() + 10
    while bus.redis.xlen(out) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    t.join(5)
    assert t.stats.reclaimed == 1 and t.stats.completed == 1 and t.stats.claimed == 0
    # the first consumer comes back and also finishes the job
    for stream_name, entry, key in handler(held):
        published, first_id = bus.put_result_once(key, stream_name, entry)
        assert not published
    assert not bus.ack(held)
    msgs = bus.read({out: "0"})
    assert [(m.entry.segment, m.entry.chunk) for m in msgs] == [(5, 2)]
    assert first_id == msgs[0].id
    assert bus.redis.xpending(stream, "g")["pending"] == 0


def test_worker_retries_failures_then_dead_letters(bus, redis_url, uid):
    stream = f"jobs:{uid}"
    bus.submit(stream, decode_job(uid, 1))
    bus.submit(stream, decode_job(uid, 2))
    calls: list[tuple[int, int]] = []
    dead: list[tuple[int, str]] = []

    def handler(job: Job):
        calls.append((job.entry.segment, job.deliveries))
        if job.entry.segment == 1:
            raise RuntimeError("transient forever")
        raise PermanentError("codes out of range")

    stop = threading.Event()
    t = start_worker(Bus(redis_url, max_deliveries=3), stream, "g", "w", handler, stop,
                     block_ms=10, visibility_timeout_ms=40, reclaim_interval_ms=10,
                     on_dead_letter=lambda j, r: dead.append((j.entry.segment, r)))
    deadline = time.monotonic() + 10
    while len(dead) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    t.join(5)
    assert sorted(calls) == [(1, 1), (1, 2), (1, 3), (2, 1)]
    assert sorted(dead) == [(1, "delivered 4 times (max_deliveries 3)"),
                            (2, "PermanentError: codes out of range")]
    assert t.stats.failed == 3 and t.stats.dead_lettered == 2
    assert len(bus.read_dead(stream)) == 2 and bus.redis.xlen(stream) == 0


# --------------------------------------------------------------------------- tracing

def test_trace_context_travels_through_entries(bus, redis_url, uid):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stream, out = f"jobs:{uid}", bus.turn_stream(uid, "audio")
    with start_span("llm.generate", tracer_provider=provider) as span:
        bus.submit(stream, decode_job(uid, 0))        # filled from the current span
        bus.add(f"test:{uid}", TextDelta(uid, 0, "x", traceparent=TRACEPARENT))  # kept as given
    trace_id = format(span.get_span_context().trace_id, "032x")
    span_id = format(span.get_span_context().span_id, "016x")
    assert bus.read({f"test:{uid}": "0"})[0].entry.traceparent == TRACEPARENT

    def handler(job: Job):
        assert job.entry.traceparent.split("-")[1:3] == [trace_id, span_id]
        return [(out, TextDelta(uid, 0, "y"), Bus.result_key("t", uid, 0, 0))]

    stop = threading.Event()
    t = start_worker(Bus(redis_url), stream, "g", "w", handler, stop, block_ms=20)
    deadline = time.monotonic() + 10
    while not bus.redis.xlen(out) and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    t.join(5)
    [result] = bus.read({out: "0"})
    # the worker's span (a no-op one here: no global provider) continues the job's trace
    assert result.entry.traceparent.split("-")[1] == trace_id


def test_batched_worker_finishes_each_job_on_its_own(bus, redis_url, uid):
    stream, out = f"jobs:{uid}", bus.turn_stream(uid, "audio")
    traces = [f"00-{i:032x}-{i + 100:016x}-01" for i in range(1, 7)]
    for s, tp in enumerate(traces):
        bus.submit(stream, dataclasses.replace(decode_job(uid, s), traceparent=tp))
    sizes: list[int] = []

    def handler(jobs: list[Job]):
        sizes.append(len(jobs))
        outcomes = []
        for job in jobs:
            seg = job.entry.segment
            if seg == 4:
                outcomes.append(PermanentError("bad codes"))
            elif seg == 5:
                outcomes.append(RuntimeError("retry me"))
            else:
                outcomes.append([(out, PcmChunk.from_pcm16(uid, seg, 0, b"\0\0", 24000),
                                  Bus.result_key("vocoder", uid, seg, 0))])
        return outcomes

    stop = threading.Event()
    t = start_worker(Bus(redis_url), stream, "g", "w", handler, stop, batched=True, count=8,
                     block_ms=20, visibility_timeout_ms=60_000)
    deadline = time.monotonic() + 10
    while bus.redis.xlen(out) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()  # the worker finishes the batch it is on before it stops
    t.join(5)
    assert sizes == [6], "all waiting jobs in one batch"
    msgs = bus.read({out: "0"})
    assert sorted(m.entry.segment for m in msgs) == [0, 1, 2, 3]
    # each result continues its own job's trace
    assert all(m.entry.traceparent.split("-")[1] == traces[m.entry.segment].split("-")[1] for m in msgs)
    assert [meta["dead_reason"] for _, meta in bus.read_dead(stream)] == ["PermanentError: bad codes"]
    assert (t.stats.completed, t.stats.failed, t.stats.dead_lettered) == (4, 1, 1)
    pending = bus.redis.xpending_range(stream, "g", "-", "+", 10)
    assert len(pending) == 1, "the failed job stays pending for a retry"


def test_worker_options_follow_settings():
    from services.common.settings import Settings
    opts = worker_options(Settings.load(env={"BAICHUAN_AUDIO__BUS__MAX_DELIVERIES": "7"}))
    assert opts == {"visibility_timeout_ms": 30000, "block_ms": 1000, "reclaim_interval_ms": 5000,
                    "max_deliveries": 7}


def _fail_first(bus: Bus, method: str, *errors: Exception) -> None:
    """Make `bus.<method>` raise `errors` on its first calls, then work."""
    real, pending = getattr(bus, method), list(errors)

    def call(*args, **kw):
        if pending:
            raise pending.pop(0)
        return real(*args, **kw)
    setattr(bus, method, call)


def test_worker_outlives_failures_around_the_handler(bus, redis_url, uid):
    stream, out = f"jobs:{uid}", bus.turn_stream(uid, "audio")
    bus.submit(stream, decode_job(uid, 1))
    flaky = Bus(redis_url)
    _fail_first(flaky, "ensure_group", redis.ConnectionError("redis not up yet"))
    _fail_first(flaky, "claim_next", RuntimeError("a bug"), redis.ResponseError("ERR unexpected reply"))

    def handler(job: Job):
        e = job.entry
        return [(out, PcmChunk.from_pcm16(uid, e.segment, 0, b"\0\0", 24000), Bus.result_key("vocoder", uid, e.segment, 0))]

    stop = threading.Event()
    t = start_worker(flaky, stream, "g", "w", handler, stop, block_ms=20)
    deadline = time.monotonic() + 10
    while not bus.redis.xlen(out) and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = t.is_alive()
    stop.set()
    t.join(5)
    assert alive, "the worker thread died"
    assert (t.stats.restarts, t.stats.completed) == (3, 1)
    assert [m.entry.segment for m in bus.read({out: "0"})] == [1]
