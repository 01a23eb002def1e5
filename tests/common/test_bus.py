"""The Redis Streams bus against a real redis-server (the session fixture `redis_url`)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis

from services.common.bus import WRITE_PROBE_KEY, BacklogFull, Bus, RedisFull
from services.common.entries import (
    ENTRY_TYPES, INT32, Array, BusError, ClientEvent, DecodeJob, Entry, PcmChunk, SegmentBoundary, TextDelta,
    Timing, TurnEnd, TurnError, VocodeJob,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def every_entry(turn: str) -> list[Entry]:
    codes = np.arange(24, dtype=np.int32).reshape(3, 8) - 5
    mel = np.linspace(-3, 1, 80 * 11, dtype=np.float32).reshape(80, 11)
    return [
        DecodeJob.from_codes(turn, 2, 1, codes, final=False, context_frames=1, seed=2**63 - 1,
                             session_id="s-1", traceparent=TRACEPARENT, tracestate="k=v"),
        VocodeJob.from_mel(turn, 2, 1, mel, final=True, context_frames=4, seed=7),
        TextDelta(turn, 0, "你好, world\n", tokens=Array.of([108386, 11, 1879, 198], INT32)),
        PcmChunk.from_pcm16(turn, 1, 3, np.array([0, -32768, 32767], "<i2").tobytes(), 24000, final=False),
        SegmentBoundary(turn, 1, "audio", audio_frames=13, chunks=3),
        Timing(turn, "first_audio", 1.7e12 + 0.125),
        TurnEnd.with_tokens(turn, "eos", [151643, 0, 7], codes[:2], text="done"),
        TurnError(turn, "decoder", 13, "decoder replica crashed", segment=2, chunk=0),
        ClientEvent(turn, b"\x00\x01serialized-event\xff", last=True),
    ]


# --------------------------------------------------------------------------- entries

def test_every_entry_type_round_trips_through_redis(bus, uid):
    stream = f"test:{uid}"
    entries = every_entry(uid)
    assert {type(e).TYPE for e in entries} == set(ENTRY_TYPES), "test misses an entry type"
    for e in entries:
        bus.add(stream, e)
    got = bus.read({stream: "0"})
    assert [m.entry for m in got] == entries
    assert [m.stream for m in got] == [stream] * len(entries)
    dj, vj = got[0].entry, got[1].entry
    np.testing.assert_array_equal(dj.codes.numpy(), np.arange(24).reshape(3, 8) - 5)
    assert dj.codes.numpy().dtype == np.int32
    np.testing.assert_array_equal(vj.mel.numpy(), entries[1].mel.numpy())
    assert got[2].entry.tokens.numpy().tolist() == [108386, 11, 1879, 198]
    assert got[6].entry.tokens.numpy().tolist() == [151643, 0, 7]
    np.testing.assert_array_equal(got[6].entry.codes.numpy(), np.arange(16).reshape(2, 8) - 5)
    assert got[3].entry.samples == 3


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


def test_an_ended_turn_keeps_its_events_for_resume_and_drops_its_stage_streams(redis_url, uid):
    bus = Bus(redis_url, turn_ttl_s=600, finished_turn_ttl_s=30)
    for kind in ("llm", "audio", "events"):
        bus.publish(uid, kind, TextDelta(uid, 0, kind))
    assert bus.redis.ttl(bus.turn_stream(uid, "events")) > 30
    bus.end_turn(uid)
    assert not bus.redis.exists(bus.turn_stream(uid, "llm"), bus.turn_stream(uid, "audio"))
    assert 0 < bus.redis.ttl(bus.turn_stream(uid, "events")) <= 30
    assert bus.read({bus.turn_stream(uid, "events"): "0"})[0].entry.text == "events"
    bus.redis.close()


def test_a_full_redis_refuses_every_write_as_redis_full(bus, uid):
    """maxmemory reached (policy noeviction): each kind of write raises RedisFull, a
    ResourceExhausted naming the limit; the probe says so without writing; a turn's end is
    retried until Redis takes writes again; freeing a turn needs no memory."""
    from services.common.errors import ResourceExhausted

    r = bus.redis
    bus.publish(uid, "events", TextDelta(uid, 0, "before"))
    saved = r.config_get("maxmemory")["maxmemory"]
    r.config_set("maxmemory", 1)
    try:
        writes = [lambda: bus.publish(uid, "llm", TextDelta(uid, 0, "x")),
                  lambda: bus.add(f"test:{uid}", TextDelta(uid, 0, "x"), maxlen=10),
                  lambda: bus.submit(f"jobs:{uid}", DecodeJob.from_codes(uid, 0, 0, np.zeros((1, 8), np.int32))),
                  lambda: bus.put_result_once(f"result:x:{uid}:0:0", bus.turn_stream(uid, "audio"),
                                              TextDelta(uid, 0, "x")),
                  bus.check_writable]
        for write in writes:
            with pytest.raises(RedisFull, match=r"memory limit \(maxmemory\)"):
                write()
        assert issubclass(RedisFull, ResourceExhausted)
        t0 = time.monotonic()
        with pytest.raises(RedisFull):
            bus.publish(uid, "events", TextDelta(uid, 0, "end"), retry_full_s=0.6)
        assert 0.5 < time.monotonic() - t0 < 5
        threading.Timer(0.7, lambda: Bus(bus.redis).redis.config_set("maxmemory", saved)).start()
        bus.publish(uid, "events", TextDelta(uid, 0, "end"), retry_full_s=10)      # lands once Redis takes it
        assert time.monotonic() - t0 > 1.0
        r.config_set("maxmemory", 1)
        bus.end_turn(uid)
    finally:
        r.config_set("maxmemory", saved)
    assert [m.entry.text for m in bus.read({bus.turn_stream(uid, "events"): "0"})] == ["before", "end"]
    assert not r.exists(WRITE_PROBE_KEY)
    bus.check_writable()


def test_reader_resumes_from_last_id_without_loss_or_duplication(bus, redis_url, uid):
    n = 300
    llm, audio = bus.turn_stream(uid, "llm"), bus.turn_stream(uid, "audio")

    def writer() -> None:
        w = Bus(redis_url)
        for i in range(n):
            w.publish(uid, "llm", TextDelta(uid, 0, str(i)))
            if i % 3 == 0:
                w.publish(uid, "audio", PcmChunk.from_pcm16(uid, 0, i // 3, b"\0\0" * 4, 24000))
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

def decode_job(uid: str, segment: int, chunk: int = 0) -> DecodeJob:
    return DecodeJob.from_codes(uid, segment, chunk, np.full((2, 8), segment, dtype=np.int32))


def test_two_consumers_share_a_group(bus, uid):
    stream = f"jobs:{uid}"
    for s in range(4):
        bus.submit(stream, decode_job(uid, s))  # before the group exists: not skipped
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


def test_lanes_are_claimed_in_priority_order(bus, uid):
    """A work stream's urgent lane is served first: a batch fills from it, then from the stream,
    and a worker waiting on both wakes for either."""
    from services.common.entries import lanes

    urgent, normal = lanes(f"jobs:{uid}")
    for s in range(3):
        bus.submit(normal, decode_job(uid, s))       # queued first
    bus.submit(urgent, decode_job(uid, 10))
    for st in (urgent, normal):
        bus.ensure_group(st, "g")
    first = bus.claim_next([urgent, normal], "g", "a", count=2)
    assert [(j.stream, j.entry.segment) for j in first] == [(urgent, 10), (normal, 0)]
    rest = bus.claim_next([urgent, normal], "g", "a", count=5)
    assert [(j.stream, j.entry.segment) for j in rest] == [(normal, 1), (normal, 2)]
    assert all(bus.ack(j) for j in first + rest)

    def later():
        time.sleep(0.2)
        bus.submit(urgent, decode_job(uid, 11))     # another connection of the pool
    t = threading.Thread(target=later)
    t.start()
    woke = bus.claim_next([urgent, normal], "g", "a", block_ms=2000, count=4)
    t.join()
    assert [(j.stream, j.entry.segment) for j in woke] == [(urgent, 11)]


def test_put_result_once(bus, uid):
    out, key = bus.turn_stream(uid, "llm"), Bus.result_key("llm", uid, 0, 0)
    ok1, id1 = bus.put_result_once(key, out, TextDelta(uid, 0, "a"))
    ok2, id2 = bus.put_result_once(key, out, TextDelta(uid, 0, "b"))
    assert (ok1, ok2) == (True, False) and id1 == id2
    assert [m.entry.text for m in bus.read({out: "0"})] == ["a"]
    assert 0 < bus.redis.ttl(key) <= 60 and 0 < bus.redis.ttl(out) <= 60
    # into a work stream: no expiry on the stream
    jobs = f"jobs:{uid}"
    assert bus.put_result_once(Bus.result_key("decoder", uid, 0, 0), jobs, decode_job(uid, 0))[0]
    assert bus.redis.ttl(jobs) == -1


def test_poison_job_is_dead_lettered_after_max_deliveries(bus, uid):
    stream = f"jobs:{uid}"
    bus.ensure_group(stream, "g")
    bus.submit(stream, decode_job(uid, 9))
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


def test_undecodable_job_is_dead_lettered_not_looped(bus, uid):
    stream = f"jobs:{uid}"
    bus.ensure_group(stream, "g")
    bus.redis.xadd(stream, {b"type": b"garbage"})
    bus.submit(stream, decode_job(uid, 3))
    jobs = bus.claim_next(stream, "g", "c", count=5)
    assert [j.entry.segment for j in jobs] == [3]
    assert bus.redis.xlen(f"{stream}:dead") == 1


def test_submit_refuses_past_the_backlog(bus, uid):
    stream = f"jobs:{uid}"
    for s in range(100):
        bus.submit(stream, decode_job(uid, s))
    with pytest.raises(BacklogFull, match=f"jobs:{uid} already holds 100 jobs"):
        bus.submit(stream, decode_job(uid, 100))


def test_a_record_goes_in_with_its_entry_and_only_then(bus, uid):
    """A reply record's item is written with the entry it describes (turn stream or job), in
    one transaction, and not when the job is refused: the record holds what was published."""
    key, stream = f"turn:{uid}:reply", f"jobs:{uid}"
    bus.publish(uid, "llm", TextDelta(uid, 0, "a"), record=(key, b"t0"))
    bus.submit(stream, decode_job(uid, 0), record=(key, b"a0"))
    assert bus.redis.lrange(key, 0, -1) == [b"t0", b"a0"] and 0 < bus.redis.ttl(key) <= bus.turn_ttl_s
    assert bus.redis.xlen(bus.turn_stream(uid, "llm")) == 1 and bus.redis.xlen(stream) == 1
    for s in range(1, bus.job_max_backlog):
        bus.submit(stream, decode_job(uid, s))
    with pytest.raises(BacklogFull):
        bus.submit(stream, decode_job(uid, bus.job_max_backlog), record=(key, b"refused"))
    assert bus.redis.lrange(key, 0, -1) == [b"t0", b"a0"]


def test_a_stopping_consumer_hands_its_jobs_back_at_once(bus, uid):
    """Graceful drain: jobs a consumer still holds when it stops are claimable by another at
    its next reclaim, not only after the visibility timeout (here a minute)."""
    stream, group = f"jobs:{uid}", "g"
    bus.ensure_group(stream, group)
    for i in range(3):
        bus.submit(stream, decode_job(uid, i))
    held = bus.claim_next(stream, group, "stopping", count=3)
    assert len(held) == 3
    assert bus.reclaim_stale(stream, group, "other", min_idle_ms=60_000) == []   # not yet idle
    assert bus.hand_back(stream, group, "stopping", idle_ms=60_000) == 3
    taken = bus.reclaim_stale(stream, group, "other", min_idle_ms=60_000, count=10)
    assert sorted(j.id for j in taken) == sorted(j.id for j in held)
    assert bus.hand_back(stream, group, "stopping", idle_ms=60_000) == 0          # nothing left


def test_leases_belong_to_their_holder(redis_url, uid):
    """A turn's lease: held and renewed by one process; another can take it only once it
    lapsed; the first then finds it lost (keep() False) instead of producing the turn twice,
    and its release leaves the new holder's lease alone."""
    from services.common.leases import Leases

    a_bus, b_bus = Bus(redis_url, lease_ttl_s=0.3), Bus(redis_url, lease_ttl_s=0.3)
    a, b = Leases(a_bus), Leases(b_bus)
    a.stop()                                    # a's process stalls: nothing renews its lease
    a.hold(uid, "producer")
    assert a_bus.holds_lease(uid, "producer") and not b.take(uid, "producer")
    time.sleep(0.5)
    assert not a_bus.holds_lease(uid, "producer")          # lapsed
    assert b.take(uid, "producer")
    assert not a.keep(uid, "producer")                     # a learns it lost the turn
    a.release(uid, "producer")
    assert b_bus.holds_lease(uid, "producer") and b.keep(uid, "producer")
    time.sleep(0.5)                                        # b's thread renews it
    assert b_bus.holds_lease(uid, "producer")
    b.release(uid, "producer")
    assert not b_bus.holds_lease(uid, "producer")
    b.stop()
