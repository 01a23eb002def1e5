"""The Redis Streams bus against a real redis-server (the session fixture `redis_url`)."""
from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import numpy as np
import pytest
import redis

from services.common import bus as busmod
from services.common.bus import (
    AudioFrames, BacklogFull, ClientEvent, Bus, BusError, DecodeJob, Job, PcmChunk, PermanentError,
    SegmentBoundary, TextDelta, Timing, TurnEnd, TurnError, VocodeJob, decode_entry,
    start_worker,
)
from services.common.telemetry import start_span

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def bus(redis_url):
    b = Bus(redis_url, turn_ttl_s=60, turn_maxlen=1000, job_max_backlog=100, max_deliveries=2)
    yield b
    b.redis.close()


@pytest.fixture
def uid():
    return uuid.uuid4().hex[:12]


def every_entry(turn: str) -> list[busmod.Entry]:
    codes = np.arange(24, dtype=np.int32).reshape(3, 8) - 5
    mel = np.linspace(-3, 1, 80 * 11, dtype=np.float32).reshape(80, 11)
    return [
        DecodeJob.from_codes(turn, 2, 1, codes, final=False, context_frames=1, seed=2**63 - 1,
                             session_id="s-1", traceparent=TRACEPARENT, tracestate="k=v"),
        VocodeJob.from_mel(turn, 2, 1, mel, final=True, context_frames=4, seed=7),
        TextDelta(turn, 0, "你好, world\n"),
        AudioFrames.from_codes(turn, 1, 12, codes),
        PcmChunk(turn, 1, 3, np.array([0, -32768, 32767], "<i2").tobytes(), 24000, final=False),
        SegmentBoundary(turn, 1, "audio", audio_frames=13, chunks=3),
        Timing(turn, "first_audio", 1.7e12 + 0.125),
        TurnEnd.with_tokens(turn, "eos", [151643, 0, 7], text="done"),
        TurnError(turn, "decoder", 13, "decoder replica crashed", segment=2, chunk=0),
        ClientEvent(turn, b"\x00\x01serialized-event\xff", last=True),
    ]


# --------------------------------------------------------------------------- entries

def test_every_entry_type_round_trips_through_redis(bus, uid):
    stream = f"test:{uid}"
    entries = every_entry(uid)
    assert {type(e).TYPE for e in entries} == set(busmod.ENTRY_TYPES), "test misses an entry type"
    for e in entries:
        bus.add(stream, e)
    got = bus.read({stream: "0"})
    assert [m.entry for m in got] == entries
    assert [m.stream for m in got] == [stream] * len(entries)
    dj, vj = got[0].entry, got[1].entry
    np.testing.assert_array_equal(dj.codes_array(), np.arange(24).reshape(3, 8) - 5)
    assert dj.codes_array().dtype == np.int32
    np.testing.assert_array_equal(vj.mel_array(), entries[1].mel_array())
    assert got[7].entry.token_list() == [151643, 0, 7]
    assert got[4].entry.samples == 3


def test_float_and_large_int_fields_are_exact():
    e = Timing("t", "x", 0.1 + 0.2)
    assert decode_entry(e.encode()).unix_ms == 0.1 + 0.2
    j = DecodeJob.from_codes("t", 0, 0, np.zeros((1, 8), np.int64), seed=2**64 - 1)
    assert decode_entry(j.encode()).seed == 2**64 - 1


def test_malformed_entries_are_named_errors():
    with pytest.raises(BusError, match="integer payload expected"):
        DecodeJob.from_codes("t", 0, 0, np.zeros((2, 8)))
    good = DecodeJob.from_codes("t", 0, 0, np.zeros((2, 8), np.int32)).encode()
    with pytest.raises(BusError, match="unknown type 'nope'"):
        decode_entry({**good, b"type": b"nope"})
    with pytest.raises(BusError, match="lacks field 'codes_shape'"):
        decode_entry({k: v for k, v in good.items() if k != b"codes_shape"})
    with pytest.raises(BusError, match=r"do not hold shape \(3, 8\)"):
        decode_entry({**good, b"codes_shape": b"3,8"})
    with pytest.raises(BusError, match="field 'final' is not a valid bool"):
        decode_entry({**good, b"final": b"yes"})
    with pytest.raises(BusError, match="schema version '2'"):
        decode_entry({**good, b"v": b"2"})
    # a field added by a newer writer is ignored
    assert decode_entry({**good, b"new_field": b"x"}) == decode_entry(good)


def test_bus_refuses_clients_it_cannot_read(redis_url):
    with pytest.raises(BusError, match="decode_responses=False"):
        Bus(redis.Redis.from_url(redis_url, decode_responses=True, protocol=2))
    with pytest.raises(BusError, match="protocol=2"):
        Bus(redis.Redis.from_url(redis_url, protocol=3))
    Bus(redis.Redis.from_url(redis_url, protocol=2)).redis.close()


# --------------------------------------------------------------------------- turn streams

def test_turn_streams_are_capped_and_expire(bus, uid):
    stream = bus.turn_stream(uid, "llm")
    assert stream == f"turn:{uid}:llm"
    bus.publish(uid, "llm", TextDelta(uid, 0, "a"))
    assert 0 < bus.redis.ttl(stream) <= 60
    bus.redis.expire(stream, 5)
    bus.publish(uid, "llm", TextDelta(uid, 0, "b"))
    assert bus.redis.ttl(stream) > 5, "expiry is refreshed on write"
    pipe = bus.redis.pipeline(transaction=False)
    for i in range(3000):  # approximate MAXLEN trims whole radix nodes (100 entries each)
        pipe.xadd(stream, TextDelta(uid, 0, str(i)).encode())
    pipe.execute()
    bus.publish(uid, "llm", TextDelta(uid, 0, "last"))
    assert 1000 <= bus.redis.xlen(stream) < 1200
    assert bus.read({stream: "0"})[-1].entry.text == "last"
    # an explicit cap and ttl on a plain stream
    bus.add(f"test:{uid}", TextDelta(uid, 0, "x"), maxlen=10, ttl_s=30)
    assert 0 < bus.redis.ttl(f"test:{uid}") <= 30
    bus.delete_turn(uid)
    assert not bus.redis.exists(stream)


def test_reader_resumes_from_last_id_without_loss_or_duplication(bus, redis_url, uid):
    n = 300
    llm, audio = bus.turn_stream(uid, "llm"), bus.turn_stream(uid, "audio")

    def writer() -> None:
        w = Bus(redis_url)
        for i in range(n):
            w.publish(uid, "llm", TextDelta(uid, 0, str(i)))
            if i % 3 == 0:
                w.publish(uid, "audio", PcmChunk(uid, 0, i // 3, b"\0\0" * 4, 24000))
        w.redis.close()

    t = threading.Thread(target=writer)
    t.start()
    last = {llm: "0", audio: "0"}
    texts, chunks = [], []
    reader = Bus(redis_url)
    deadline = time.monotonic() + 20
    while (len(texts) < n or len(chunks) < n // 3) and time.monotonic() < deadline:
        for m in reader.read(last, block_ms=200, count=7):
            last[m.stream] = m.id
            if m.stream == llm:
                texts.append(int(m.entry.text))
            else:
                chunks.append(m.entry.chunk)
        if len(texts) > n // 2 and reader is not None and len(texts) < n // 2 + 8:
            reader.redis.close()  # the client drops; a new connection resumes from `last`
            reader = Bus(redis_url)
    t.join()
    reader.redis.close()
    assert texts == list(range(n))
    assert chunks == list(range(n // 3))
    assert bus.read(last) == []


def test_read_rejects_blocking_past_the_socket_timeout(bus):
    with pytest.raises(ValueError, match="block_ms=0"):
        bus.read({"x": "0"}, block_ms=0)
    with pytest.raises(ValueError, match="socket timeout"):
        bus.read({"x": "0"}, block_ms=10**7)


# --------------------------------------------------------------------------- work streams

def _job(uid: str, segment: int, chunk: int = 0) -> DecodeJob:
    return DecodeJob.from_codes(uid, segment, chunk, np.full((2, 8), segment, dtype=np.int32))


def test_two_consumers_share_a_group(bus, uid):
    stream = f"jobs:{uid}"
    for s in range(4):
        bus.submit(stream, _job(uid, s))  # before the group exists: not skipped
    bus.ensure_group(stream, "g")
    bus.ensure_group(stream, "g")  # idempotent
    a = bus.claim_next(stream, "g", "a", count=1)
    b = bus.claim_next(stream, "g", "b", count=2)
    assert [j.entry.segment for j in a] == [0] and [j.entry.segment for j in b] == [1, 2]
    assert all(j.deliveries == 1 and j.group == "g" for j in a + b)
    assert a[0].consumer == "a" and b[0].consumer == "b"
    assert 0 <= a[0].lag_ms < 60_000
    assert bus.ack(a[0]) and not bus.ack(a[0])
    assert bus.redis.xlen(stream) == 3, "acked jobs leave the stream"
    rest = bus.claim_next(stream, "g", "a", count=10)
    assert [j.entry.segment for j in rest] == [3]
    assert bus.claim_next(stream, "g", "a", block_ms=50) == []


def test_workers_share_jobs_and_publish_each_result_once(bus, redis_url, uid):
    stream, n = f"jobs:{uid}", 24
    out = bus.turn_stream(uid, "audio")
    done_by: dict[str, list[int]] = {"w0": [], "w1": []}

    def make_handler(name: str):
        def handler(job: Job):
            time.sleep(0.01)  # long enough that the other worker takes the next job
            done_by[name].append(job.entry.segment)
            key = Bus.result_key("vocoder", uid, job.entry.segment, 0)
            return [(out, PcmChunk(uid, job.entry.segment, 0, b"\1\0", 24000), key)]
        return handler

    for s in range(n):
        bus.submit(stream, _job(uid, s))
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


def test_dead_consumer_job_is_reclaimed_and_completed_exactly_once(bus, redis_url, uid):
    stream, out = f"jobs:{uid}", bus.turn_stream(uid, "audio")
    bus.ensure_group(stream, "g")
    bus.submit(stream, _job(uid, 5, 2))
    [held] = bus.claim_next(stream, "g", "dying")  # claims it, then "dies" without acking
    assert bus.reclaim_stale(stream, "g", "other", min_idle_ms=60_000) == []

    def handler(job: Job):
        e = job.entry
        return [(out, PcmChunk(uid, e.segment, e.chunk, b"\2\0", 24000),
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


def test_put_result_once(bus, uid):
    out, key = bus.turn_stream(uid, "llm"), Bus.result_key("llm", uid, 0, 0)
    ok1, id1 = bus.put_result_once(key, out, TextDelta(uid, 0, "a"))
    ok2, id2 = bus.put_result_once(key, out, TextDelta(uid, 0, "b"))
    assert (ok1, ok2) == (True, False) and id1 == id2
    assert [m.entry.text for m in bus.read({out: "0"})] == ["a"]
    assert 0 < bus.redis.ttl(key) <= 60 and 0 < bus.redis.ttl(out) <= 60
    # into a work stream: no expiry on the stream
    jobs = f"jobs:{uid}"
    assert bus.put_result_once(Bus.result_key("decoder", uid, 0, 0), jobs, _job(uid, 0))[0]
    assert bus.redis.ttl(jobs) == -1


def test_poison_job_is_dead_lettered_after_max_deliveries(bus, uid):
    stream = f"jobs:{uid}"
    bus.ensure_group(stream, "g")
    bus.submit(stream, _job(uid, 9))
    [first] = bus.claim_next(stream, "g", "c1")
    time.sleep(0.03)
    [second] = bus.reclaim_stale(stream, "g", "c2", min_idle_ms=20)
    assert (first.deliveries, second.deliveries) == (1, 2)  # bus max_deliveries is 2
    time.sleep(0.03)
    dead = []
    assert bus.reclaim_stale(stream, "g", "c3", min_idle_ms=20,
                             on_dead_letter=lambda j, r: dead.append((j.id, r))) == []
    assert dead == [(first.id, "delivered 3 times (max_deliveries 2)")]
    assert bus.redis.xlen(stream) == 0 and bus.redis.xpending(stream, "g")["pending"] == 0
    [(msg, meta)] = bus.read_dead(stream)
    assert msg.stream == f"jobs:{uid}:dead" and msg.entry == first.entry
    assert meta == {"dead_reason": "delivered 3 times (max_deliveries 2)", "dead_id": first.id,
                    "dead_deliveries": "3", "dead_group": "g"}


def test_worker_retries_failures_then_dead_letters(bus, redis_url, uid):
    stream = f"jobs:{uid}"
    bus.submit(stream, _job(uid, 1))
    bus.submit(stream, _job(uid, 2))
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


def test_undecodable_job_is_dead_lettered_not_looped(bus, uid):
    stream = f"jobs:{uid}"
    bus.ensure_group(stream, "g")
    bus.redis.xadd(stream, {b"type": b"garbage"})
    bus.submit(stream, _job(uid, 3))
    jobs = bus.claim_next(stream, "g", "c", count=5)
    assert [j.entry.segment for j in jobs] == [3]
    assert bus.redis.xlen(f"{stream}:dead") == 1


def test_submit_refuses_past_the_backlog(bus, uid):
    stream = f"jobs:{uid}"
    for s in range(100):
        bus.submit(stream, _job(uid, s))
    with pytest.raises(BacklogFull, match=f"jobs:{uid} already holds 100 jobs"):
        bus.submit(stream, _job(uid, 100))


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
        bus.submit(stream, _job(uid, 0))        # filled from the current span
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
        bus.submit(stream, dataclasses.replace(_job(uid, s), traceparent=tp))
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
                outcomes.append([(out, PcmChunk(uid, seg, 0, b"\0\0", 24000),
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
    opts = busmod.worker_options(Settings.load(env={"BAICHUAN_AUDIO__BUS__MAX_DELIVERIES": "7"}))
    assert opts == {"visibility_timeout_ms": 30000, "block_ms": 1000, "reclaim_interval_ms": 5000,
                    "max_deliveries": 7}
