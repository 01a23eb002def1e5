"""One turn from prompt to the caller's event stream (plain Python over the bus; no Ray).

The producer reads the turn's stage streams (turn:{id}:llm, turn:{id}:audio), merges them
(merge.py) and appends every client event to turn:{id}:events, whose entry ids are the
events' ids. A caller streams from that stream, and one that reconnects resumes after the
last id it got. The producer runs on its own, so a dropped caller loses nothing."""
from __future__ import annotations

import time

import numpy as np
from dataclasses import dataclass, field
from typing import Callable, Iterator

from baichuan_audio.v1 import conversation_pb2 as pb
from services.common import bus as B
from services.common.telemetry import get_metrics

READ_BLOCK_MS = 200


class TurnStalled(RuntimeError):
    """No stage wrote anything for too long."""


@dataclass
class TurnOutcome:
    end: pb.EndOfTurn | None = None
    error: pb.TurnError | None = None
    tokens: list[int] | None = None          # the LLM's final sequence
    generated_codes: object = None           # np.ndarray (frames, 8)
    text: str = ""
    audio_seconds: float = 0.0
    interrupted: bool = False
    segments: list[tuple[str, bytes]] = field(default_factory=list)   # (text, 24 kHz pcm16) per segment


def produce(bus: B.Bus, merger, turn_id: str, *, interrupted: Callable[[], bool],
            stall_timeout_s: float = 120.0) -> TurnOutcome:
    """Merge the stage streams into turn:{id}:events until the turn ends; return its outcome."""
    from orchestrator.merge import ReplyMerger  # noqa: F401 (type of `merger`)

    last = {bus.turn_stream(turn_id, "llm"): "0", bus.turn_stream(turn_id, "audio"): "0"}
    out = TurnOutcome()
    progress = time.monotonic()
    metrics = get_metrics()

    def send(ev: pb.TurnEvent, final: bool = False) -> None:
        ev_copy = pb.TurnEvent()
        ev_copy.CopyFrom(ev)
        bus.publish(turn_id, "events", B.ClientEvent(turn_id=turn_id, payload=ev_copy.SerializeToString(), last=final))

    while not merger.finished:
        if interrupted():
            for ev in merger.interrupt():
                send(ev, final=ev.HasField("end"))
            out.interrupted = True
            break
        msgs = bus.read(last, block_ms=READ_BLOCK_MS)
        now = time.monotonic()
        if msgs:
            progress = now
        elif now - progress > stall_timeout_s:
            ev = pb.TurnEvent(turn_id=turn_id, error=pb.TurnError(
                code=14, message=f"no stage produced anything for {stall_timeout_s:.0f} s; the turn was abandoned"))
            send(ev, final=True)
            out.error = ev.error
            return out
        for m in msgs:
            last[m.stream] = m.id
            if isinstance(m.entry, B.TurnEnd):
                out.tokens = m.entry.token_list()
            for ev in merger.feed(m.entry):
                if ev.HasField("timing"):
                    if ev.timing.name == "first_text":
                        metrics.record_time_to_first_text(ev.timing.ms_since_turn_start)
                    elif ev.timing.name == "first_audio":
                        metrics.record_time_to_first_audio(ev.timing.ms_since_turn_start)
                final = ev.HasField("end") or ev.HasField("error")
                if ev.HasField("end"):
                    out.end = ev.end
                    if ev.end.audio_seconds:
                        metrics.record_real_time_factor(ev.end.real_time_factor)
                if ev.HasField("error"):
                    out.error = ev.error
                send(ev, final=final)
    out.text = "".join(merger.text)
    out.audio_seconds = merger.audio_samples / merger.sample_rate
    out.generated_codes = merger.generated_codes()
    from services.common.audio import to_pcm16
    for k in sorted(set(merger.segment_text) | set(merger.segment_audio)):
        pcm = to_pcm16(np.concatenate(merger.segment_audio[k]), limit=1.0) if k in merger.segment_audio else b""
        out.segments.append((merger.segment_text.get(k, ""), pcm))
    return out


def events(bus: B.Bus, turn_id: str, after: str = "0", *, wait_s: float = 600.0) -> Iterator[tuple[str, pb.TurnEvent]]:
    """(event id, event) of turn:{id}:events after `after`, until the turn's last event."""
    stream = bus.turn_stream(turn_id, "events")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        msgs = bus.read({stream: after}, block_ms=READ_BLOCK_MS)
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
