"""One turn from prompt to the caller's event stream (plain Python over the bus; no Ray).

The producer reads the turn's stage streams (turn:{id}:llm, turn:{id}:audio), merges them
(merge.py) and appends every client event to turn:{id}:events, whose entry ids are the
events' ids. A caller streams from that stream, and one that reconnects resumes after the
last id it got. The producer runs on its own, so a dropped caller loses nothing; when the turn
has ended its stage streams are deleted and its events kept `bus.finished_turn_ttl_s` for a
resume (Bus.end_turn).

Redis at its memory limit refuses writes: the producer and every reader notice it (a write
fails, or `Bus.check_writable` when idle) and end with RESOURCE_EXHAUSTED instead of waiting
for events nobody can write; the producer keeps trying to send the turn's end for
REFUSED_RETRY_S, so the session takes its next turn as soon as Redis takes writes again."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from baichuan_audio.v1 import conversation_pb2 as pb
from services.common.audio import to_pcm16
from services.common.bus import Bus, RedisFull, reply_record_key, unreachable
from services.common.entries import ClientEvent, StreamEntry, TurnEnd, TurnError, decode_entry
from services.common.errors import Status
from services.common.telemetry import get_metrics
from orchestrator.conversation import Reply, UserTurn, codes_from_b64, codes_to_b64

log = logging.getLogger(__name__)

READ_BLOCK_MS = 200
STALL_TIMEOUT_S = 120.0      # a turn whose stages wrote nothing for this long is abandoned
PROBE_IDLE_S = 1.0           # a reader or producer waiting this long checks that Redis takes writes
REFUSED_RETRY_S = 120.0      # how long the end of a turn refused by a full Redis is retried
OUTAGE_S = 30.0              # how long a producer waits for a Redis that does not answer
OUTAGE_POLL_S = 0.5
EVENT_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")   # a Redis stream entry id
MAX_ID_PART = (1 << 64) - 1                                   # each part of an entry id is a uint64
PRODUCER, LLM = "producer", "llm"   # the leases of a turn: its conversation replica, its LLM replica
CONTINUE_WITHIN_S = 60.0     # how long a continuation waits for an LLM replica (Serve restarts a dead one)
CONTINUE_RETRY_S = 1.0


def check_event_id(after: str) -> str:
    """A resume's `after_event_id` ("" = from the start), or ValueError naming the format."""
    if not after:
        return "0"
    m = EVENT_ID_RE.fullmatch(after)
    if not m or max(int(m[1]), int(m[2])) > MAX_ID_PART:
        raise ValueError(f"after_event_id {after!r} is not an event id: use the event_id of the last "
                         "event received (digits-digits), or leave it empty to start over")
    return after


def _id_key(eid: str) -> tuple[int, int]:
    ms, seq = eid.split("-")
    return int(ms), int(seq)


class Sent:
    """What a turn's caller stream already holds, for a producer that takes the turn over
    from a dead one: replaying the stage streams through a new merger gives the same events
    (merge.py is deterministic), and those already sent are skipped by what they are (text
    deltas by count, audio by sequence, boundaries by segment and kind, timing marks by name),
    so every event reaches the caller once."""

    def __init__(self, events: list[pb.TurnEvent]):
        self.text = sum(e.HasField("text") for e in events)
        self.audio = {e.audio.sequence for e in events if e.HasField("audio")}
        self.boundaries = {(e.segment.segment, e.segment.kind) for e in events if e.HasField("segment")}
        self.timings = {e.timing.name for e in events if e.HasField("timing")}

    def skip(self, ev: pb.TurnEvent) -> bool:
        if ev.HasField("text") and self.text > 0:
            self.text -= 1
            return True
        if ev.HasField("audio"):
            return ev.audio.sequence in self.audio
        if ev.HasField("segment"):
            return (ev.segment.segment, ev.segment.kind) in self.boundaries
        if ev.HasField("timing"):
            return ev.timing.name in self.timings
        return False


def sent_events(bus: Bus, turn_id: str) -> tuple[list[pb.TurnEvent], bool]:
    """The events of turn:{id}:events and whether the last one closed it."""
    out, final = [], False
    for _eid, fields in bus.redis.xrange(bus.turn_stream(turn_id, "events")):
        entry = decode_entry(fields)
        out.append(pb.TurnEvent.FromString(entry.payload))
        final = final or bool(entry.last)
    return out, final


class LostTurn(RuntimeError):
    """Another replica produces this turn now."""


class TurnStalled(RuntimeError):
    """No stage wrote anything for too long."""


@dataclass
class TurnOutcome(Reply):
    """The turn's Reply (for the history; error: a pb.TurnError) and its caller-side end."""

    end: pb.EndOfTurn | None = None
    final: list[pb.TurnEvent] = field(default_factory=list)           # held back for `finish`


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def send(bus: Bus, turn_id: str, ev: pb.TurnEvent, final: bool = False, retry_full_s: float = 0.0) -> str:
    """Append one caller event to turn:{id}:events (its entry id becomes the event id)."""
    return bus.publish(turn_id, "events", ClientEvent(turn_id=turn_id, payload=ev.SerializeToString(), last=final),
                retry_full_s=retry_full_s)


# continue_llm(n): ask an LLM replica to continue the turn's reply (its n-th continuation);
# raises if none can (ValueError: the continuation cannot be built; anything else: try again)
ContinueLLM = Callable[[int], None]


def continue_reply(turn_id: str, continue_llm: ContinueLLM, n: int, within_s: float = CONTINUE_WITHIN_S) -> str | None:
    """Ask for the n-th continuation, again while no LLM replica takes it (one restarting),
    for up to `within_s`. None when it started, else why it could not."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            continue_llm(n)
            return None
        except ValueError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - the replica restarting, or another one busy: again
            if time.monotonic() > deadline:
                return f"no LLM replica took it within {within_s:.0f} s ({e})"
            log.warning("turn %s: continuation %d not taken yet (%s); trying again", turn_id, n, e)
            time.sleep(CONTINUE_RETRY_S)


def produce(bus: Bus, merger, turn_id: str, *, interrupted: Callable[[], bool],
            stall_timeout_s: float = STALL_TIMEOUT_S, sent: Sent | None = None,
            owns: Callable[[], bool] = lambda: True, continue_llm: ContinueLLM | None = None,
            max_continuations: int = 0) -> TurnOutcome:
    """Merge the stage streams into turn:{id}:events until the turn ends; return its outcome.

    The final events (the end, or an error) are NOT sent: they are in `outcome.final`, for
    `finish` to send once the caller has recorded the turn, so that a client which starts its
    next turn as soon as it sees the end always finds this one in the history.

    sent: a turn taken over from a dead producer (replayed from the start; what its caller
    stream already holds is skipped). The LLM replica holds the turn's LLM lease until it has
    written its end: a lease gone without an end means that replica died (or was stopped),
    known within `bus.lease_ttl_s`: another replica continues the reply after what was
    published of it (continue_llm, at most `max_continuations` times per turn), or, past that
    or when it cannot, the turn ends with UNAVAILABLE instead of waiting for the stall timeout.

    Redis not answering for a while (up to OUTAGE_S) does not end the turn: events wait in an
    outbox, and reading goes on where it stopped once Redis answers again, unless another
    replica took the turn over meanwhile (owns() is False: this producer's lease lapsed and
    a resume took it): then LostTurn, and this one stops."""
    last = {bus.turn_stream(turn_id, "llm"): "0", bus.turn_stream(turn_id, "audio"): "0"}
    out = TurnOutcome()
    progress = probed = time.monotonic()
    metrics = get_metrics()
    outbox: list[pb.TurnEvent] = []      # merged, not yet in turn:{id}:events

    tail = bus.redis.xrevrange(bus.turn_stream(turn_id, "events"), count=1)
    written = [_s(tail[0][0]) if tail else ""]      # the id of the last event known written
    continued = 0
    # a reply is continued only if an LLM replica took the turn (not one whose conversation
    # replica died before asking for it): its lease held, or something of it written
    llm_began = bus.holds_lease(turn_id, LLM)

    def flush() -> None:
        while outbox:
            written[0] = send(bus, turn_id, outbox[0])
            outbox.pop(0)

    def emit(ev: pb.TurnEvent) -> None:
        if ev.HasField("timing"):
            if ev.timing.name == "first_text":
                metrics.record_time_to_first_text(ev.timing.ms_since_turn_start)
            elif ev.timing.name == "first_audio":
                metrics.record_time_to_first_audio(ev.timing.ms_since_turn_start)
        if ev.HasField("end"):
            out.end = ev.end
            if ev.end.audio_seconds:
                metrics.record_real_time_factor(ev.end.real_time_factor)
        if ev.HasField("error"):
            out.error = ev.error
        if ev.HasField("end") or ev.HasField("error") or out.final:
            out.final.append(ev)        # the end and anything after it wait for `finish`
        elif sent is None or not sent.skip(ev):
            outbox.append(ev)

    while not merger.finished:
        try:
            flush()
            if interrupted():
                out.interrupted = True
                for ev in merger.interrupt():
                    emit(ev)
                break
            msgs = bus.read(last, block_ms=READ_BLOCK_MS)
            now = time.monotonic()
            if msgs:
                progress = now
            elif now - max(progress, probed) > PROBE_IDLE_S:     # the stages may be unable to write
                bus.check_writable()
                probed = now
                if merger.llm_done is None and merger.error is None and not bus.holds_lease(turn_id, LLM):
                    msgs = bus.read(last)       # its end may have come just before the lease went
                    why = "continuing it is off"
                    if not msgs and not llm_began:
                        why = "no LLM replica had begun it"
                    elif not msgs and continue_llm is not None and continued < max_continuations:
                        if interrupted():
                            continue            # the next round ends it as interrupted, not continued
                        continued += 1
                        why = continue_reply(turn_id, continue_llm, continued)
                        if why is None:
                            log.warning("turn %s: its LLM replica stopped; another one continues it", turn_id)
                            progress = time.monotonic()
                            continue
                    elif not msgs and continue_llm is not None:
                        why = (f"it was continued {continued} times, the limit (bus.llm_continuations)" if continued
                               else "continuing is off (bus.llm_continuations: 0)")
                    if not msgs:
                        msgs = [StreamEntry("", "", TurnError(
                            turn_id=turn_id, stage="llm", code=Status.UNAVAILABLE,
                            message="the LLM replica generating this turn stopped before the end (it died or "
                                    f"was shut down) and the reply cannot be continued ({why}); what you received "
                                    "stays, the session is ready: send the turn again"))]
        except Exception as e:  # noqa: BLE001 - Redis away: wait for it, up to OUTAGE_S
            if not unreachable(e):
                raise
            log.warning("turn %s: Redis is not answering (%s); waiting for it", turn_id, e)
            _wait_for_redis(bus, OUTAGE_S)
            if not owns():
                raise LostTurn(f"turn {turn_id} was taken over by another replica while Redis was away")
            # the event being sent when Redis stopped answering may have been written after all
            # (a command that timed out here can still run there): then it is not sent again
            # (only this producer writes the stream: a last entry it did not see written is that one)
            tail = bus.redis.xrevrange(bus.turn_stream(turn_id, "events"), count=1)
            if outbox and tail and _s(tail[0][0]) != written[0]:
                written[0] = _s(tail[0][0])
                outbox.pop(0)
            progress = probed = time.monotonic()
            continue
        if not msgs and now - progress > stall_timeout_s:
            emit(pb.TurnEvent(turn_id=turn_id, error=pb.TurnError(
                code=Status.UNAVAILABLE, message=f"no stage produced anything for {stall_timeout_s:.0f} s; the turn was abandoned")))
            return out
        for m in msgs:
            if m.stream:
                last[m.stream] = m.id
                llm_began = True
            if isinstance(m.entry, TurnEnd):
                out.history, out.reply_codes = m.entry.tokens.numpy().tolist(), m.entry.codes.numpy()
            for ev in merger.feed(m.entry):
                emit(ev)
    flush()
    out.text = "".join(merger.text)
    out.text_tokens = list(merger.text_tokens)
    out.audio_seconds = merger.audio_samples / merger.sample_rate
    for k in sorted(set(merger.segment_text) | set(merger.segment_audio)):
        pcm = to_pcm16(np.concatenate(merger.segment_audio[k]), limit=1.0) if k in merger.segment_audio else b""
        out.segments.append((merger.segment_text.get(k, ""), pcm))
        out.segment_tokens.append(merger.segment_tokens.get(k, 0))
        out.segment_seconds.append(sum(len(x) for x in merger.segment_audio.get(k, ())) / merger.sample_rate)
    return out


def _wait_for_redis(bus: Bus, within_s: float) -> None:
    """Until Redis answers a PING (read-only: nothing piles up to run twice), at most `within_s`;
    then the last error is raised."""
    deadline = time.monotonic() + within_s
    while True:
        time.sleep(OUTAGE_POLL_S)
        try:
            bus.redis.ping()
            return
        except Exception as e:  # noqa: BLE001
            if not unreachable(e) or time.monotonic() > deadline:
                raise


def finish(bus: Bus, turn_id: str, outcome: "TurnOutcome | None", retry_s: float = 0.0) -> None:
    """Send the held-back final events (the last one closes the caller's stream), retrying
    those Redis refuses (full) for up to `retry_s`."""
    final = outcome.final if outcome is not None else []
    if not final:
        final = [pb.TurnEvent(turn_id=turn_id, error=pb.TurnError(
            code=Status.INTERNAL, message="the turn failed in the orchestrator; see its logs"))]
    deadline = time.monotonic() + retry_s
    for i, ev in enumerate(final):
        send(bus, turn_id, ev, final=i == len(final) - 1, retry_full_s=max(0.0, deadline - time.monotonic()))


def run(bus: Bus, merger, turn_id: str, *, interrupted: Callable[[], bool],
        record: Callable[["TurnOutcome | None"], None], sent: Sent | None = None,
        owns: Callable[[], bool] = lambda: True, continue_llm: ContinueLLM | None = None,
        max_continuations: int = 0) -> "TurnOutcome | None":
    """The producer of one turn: produce, `record(outcome)` (the history, before the caller
    hears the end), send the end, free the turn's stage streams. outcome None: the
    orchestrator failed. A full Redis ends the turn with RESOURCE_EXHAUSTED."""
    outcome = None
    try:
        outcome = produce(bus, merger, turn_id, interrupted=interrupted, sent=sent, owns=owns,
                          continue_llm=continue_llm, max_continuations=max_continuations)
    except LostTurn as e:
        log.warning("%s; this replica stops producing it", e)
        return None
    except RedisFull as e:
        log.warning("turn %s: %s", turn_id, e)
        outcome = TurnOutcome(error=pb.TurnError(code=Status.RESOURCE_EXHAUSTED, message=str(e)))
        outcome.final = [pb.TurnEvent(turn_id=turn_id, error=outcome.error)]
    except Exception:  # noqa: BLE001 - the caller hears an INTERNAL error with the trace in the log
        log.exception("turn %s failed", turn_id)
    try:
        record(outcome)
    except Exception:  # noqa: BLE001 - e.g. Redis full: the turn still ends for the caller
        log.exception("turn %s: recording it in the session failed", turn_id)
    try:
        finish(bus, turn_id, outcome, retry_s=REFUSED_RETRY_S)
    except RedisFull:
        log.error("turn %s: Redis refused its end for %.0f s; the session's next turn waits for "
                  "the stall timeout", turn_id, REFUSED_RETRY_S)
    try:
        bus.end_turn(turn_id)
        bus.redis.delete(setup_key(turn_id), reply_record_key(turn_id))
    except Exception:  # noqa: BLE001 - Redis unreachable: the streams expire with their TTL
        log.warning("turn %s: could not free its streams now; they expire", turn_id)
    return outcome


def interrupt_key(turn_id: str) -> str:
    """Set by Interrupt on any orchestrator replica; read by the replica producing the turn."""
    return f"turn:{turn_id}:interrupt"


def request_interrupt(bus: Bus, turn_id: str) -> None:
    bus.redis.set(interrupt_key(turn_id), b"1", ex=bus.turn_ttl_s)


def interrupt_requested(bus: Bus, turn_id: str) -> bool:
    return bool(bus.redis.exists(interrupt_key(turn_id)))


def is_over(bus: Bus, turn_id: str) -> bool:
    """The turn's caller stream ended, or no replica holds its producer lease (the one that
    produced it died, before its first event or after): a new turn may start."""
    last = bus.redis.xrevrange(bus.turn_stream(turn_id, "events"), count=1)
    if last and decode_entry(last[0][1]).last:
        return True
    return not bus.holds_lease(turn_id, PRODUCER)


def ended_at(bus: Bus, turn_id: str) -> str | None:
    """The id of the turn's last event if that event closed its stream, else None."""
    last = bus.redis.xrevrange(bus.turn_stream(turn_id, "events"), count=1)
    if last and decode_entry(last[0][1]).last:
        eid = last[0][0]
        return eid.decode() if isinstance(eid, bytes) else eid
    return None


def events(bus: Bus, turn_id: str, after: str = "0", *, wait_s: float = 600.0,
           idle: Callable[[], None] | None = None) -> Iterator[tuple[str, pb.TurnEvent]]:
    """(event id, event) of turn:{id}:events after `after`, until the turn's last event.
    RedisFull when nothing comes and Redis refuses writes (nobody can write the rest).
    idle(): called whenever nothing came for PROBE_IDLE_S (the caller checks that someone
    still produces the turn; it may raise). Nothing after the last event: returns at once."""
    stream = bus.turn_stream(turn_id, "events")
    end = ended_at(bus, turn_id)
    if end is not None and after != "0" and _id_key(after) >= _id_key(end):
        return
    deadline = time.monotonic() + wait_s
    idle_since = time.monotonic()
    while time.monotonic() < deadline:
        msgs = bus.read({stream: after}, block_ms=READ_BLOCK_MS)
        if msgs:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > PROBE_IDLE_S:
            bus.check_writable()
            if idle is not None:
                idle()
            idle_since = time.monotonic()
        for m in msgs:
            after = m.id
            ev = pb.TurnEvent.FromString(m.entry.payload)
            ev.turn_id = turn_id
            ev.event_id = m.id
            yield m.id, ev
            if m.entry.last:
                return
        if msgs:
            deadline = time.monotonic() + wait_s


T = TypeVar("T")


class TurnThreads:
    """The threads a conversation replica blocks on Redis with: one pool for turn producers
    (each holds its thread for the whole turn) and one for stream readers (a caller's stream
    waits on one between events, for at most READ_BLOCK_MS).

    They must not share a pool smaller than what may run at once: Serve gives a replica's
    user code a default pool of num_cpus + 4 threads (5 at the default CPU share), so with
    five turns producing, every caller's reader queued behind them and each turn waited for
    whole other turns to end. Readers get one thread per request the replica may have ongoing,
    producers one per turn it may run; threads are made as needed, up to those sizes."""

    def __init__(self, producers: int, readers: int):
        self.producers = ThreadPoolExecutor(max_workers=producers, thread_name_prefix="turn-producer")
        self.readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="stream-reader")

    def produce(self, fn: Callable[[], T]) -> "asyncio.Future[T]":
        """Run a producer (turns.run) on the producers' pool; the caller's loop gets its future."""
        return asyncio.get_running_loop().run_in_executor(self.producers, fn)

    async def stream(self, it: Iterable[T]):
        """Iterate a blocking iterator (turns.events) on the readers' pool."""
        it = iter(it)
        loop = asyncio.get_running_loop()
        while True:
            item = await loop.run_in_executor(self.readers, next, it, None)
            if item is None:
                return
            yield item

    def shutdown(self) -> None:
        self.producers.shutdown(wait=False, cancel_futures=False)
        self.readers.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- taking a turn over
def setup_key(turn_id: str) -> str:
    """What a turn began with (owner, session, the user's turn), for a replica that takes it over."""
    return f"turn:{turn_id}:setup"


def save_setup(bus: Bus, turn_id: str, owner: str, session_id: str, user: UserTurn, *, started: float) -> None:
    user_rec = {"text": user.text, "audio_seconds": user.audio_seconds}
    if user.codes is not None:
        user_rec.update(codes=codes_to_b64(user.codes), codebooks=int(user.codes.shape[-1]))
    bus.redis.set(setup_key(turn_id), json.dumps({"owner": owner, "session_id": session_id, "user": user_rec,
                                                  "started": started}), ex=bus.turn_ttl_s)


def load_setup(bus: Bus, turn_id: str) -> dict | None:
    raw = bus.redis.get(setup_key(turn_id))
    return json.loads(raw) if raw else None


def user_from_setup(setup: dict) -> UserTurn:
    u = setup["user"]
    codes = codes_from_b64(u["codes"], u["codebooks"]) if "codes" in u else None
    return UserTurn(text=u["text"], codes=codes, audio_seconds=u["audio_seconds"])


def is_known(bus: Bus, turn_id: str) -> bool:
    """Something of the turn is still in Redis: its events, its setup or a live producer."""
    return bool(bus.redis.exists(bus.turn_stream(turn_id, "events"), setup_key(turn_id),
                                 bus.lease_key(turn_id, PRODUCER)))


def abandon(bus: Bus, turn_id: str, message: str) -> None:
    """End a turn nobody can produce: its callers get UNAVAILABLE with `message`."""
    finish(bus, turn_id, TurnOutcome(final=[pb.TurnEvent(turn_id=turn_id, error=pb.TurnError(
        code=Status.UNAVAILABLE, message=message))]))
    bus.end_turn(turn_id)
