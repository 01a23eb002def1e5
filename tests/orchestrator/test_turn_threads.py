"""A conversation replica's threads (orchestrator/turns.py TurnThreads) on a real redis-server:
a caller's stream is read even while every producer thread is busy with a running turn."""
from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from baichuan_audio.v1 import conversation_pb2 as pb
from orchestrator import turns
from orchestrator.merge import ReplyMerger
from services.common.bus import Bus

PRODUCERS = 2


@pytest.fixture
def bus(redis_url):
    b = Bus(redis_url, turn_ttl_s=60)
    yield b
    b.redis.close()


def finished_turn(bus: Bus, n: int = 5) -> str:
    tid = uuid.uuid4().hex
    for i in range(n):
        turns.send(bus, tid, pb.TurnEvent(turn_id=tid, text=pb.TextDelta(text=f"t{i}")))
    turns.send(bus, tid, pb.TurnEvent(turn_id=tid, end=pb.EndOfTurn(reason="complete")), final=True)
    return tid


def test_reader_answers_while_producers_saturate_their_pool(bus):
    """PRODUCERS + 1 producers of turns whose stages write nothing yet (each holds a thread; one
    waits for a thread): a caller's stream of another turn is still read to its end."""
    threads = turns.TurnThreads(producers=PRODUCERS, readers=2)
    stop = threading.Event()
    started = threading.Semaphore(0)

    def interrupted() -> bool:
        started.release()
        return stop.is_set()

    async def scenario() -> list[pb.TurnEvent]:
        producers = [threads.produce(lambda tid=uuid.uuid4().hex: turns.run(
            bus, ReplyMerger(tid), tid, interrupted=interrupted, record=lambda _o: None))
            for _ in range(PRODUCERS + 1)]
        for _ in range(PRODUCERS):             # the pool's threads are all taken by running turns
            assert await asyncio.get_running_loop().run_in_executor(None, started.acquire, True, 30)
        tid = finished_turn(bus)

        async def read():
            return [ev async for _, ev in threads.stream(turns.events(bus, tid))]
        try:
            return await asyncio.wait_for(read(), timeout=20)
        finally:
            stop.set()
            await asyncio.gather(*producers)

    try:
        events = asyncio.run(scenario())
    finally:
        threads.shutdown()
    assert [e.text.text for e in events[:-1]] == [f"t{i}" for i in range(5)] and events[-1].HasField("end")
