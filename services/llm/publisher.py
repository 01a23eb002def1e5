"""Turn one engine request's events into the turn's stream entries and decode jobs.

Engine events (services/llm/protocol.py) -> turn:{id}:llm (text deltas with their token ids,
segment boundaries, the end with the session's history) and jobs:decoder (one job per audio
segment in faithful mode; in low-latency mode the first audio segment is cut into growing
chunks, each job carrying the segment's prefix so the decoder sees the whole history, see
services/decoder/deployment.py). Audio codes travel only in the decode jobs and, for the
history, once in the end entry: nobody else needs them frame by frame.

With a `recorded(target, entry, item)` sink, each text delta, decode job and segment boundary
also records what it adds to the reply so far (continuation.py), so that another replica can
continue the turn after it if this one dies; that replica's publisher skips the first `skip`
of them (its replay of the decisions publishes them again).

Plain Python over an abstract `emit(stream_kind_or_jobs, entry)` sink, so it is tested without
Redis; the deployment plugs the bus in."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from services.common import entries
from services.common.chunking import chunk_plan
from services.common.errors import Status
from services.llm import continuation
from services.llm.protocol import AudioFrame, Done, Event, SegmentEnd, SegmentStart, TextToken

# emit(target, entry): target is "llm" (the turn's LLM stream) or one of entries.lanes(DECODER_JOBS):
# the turn's first decode job goes to the urgent lane (its first audio), the others to the stream
Emit = Callable[[str, entries.Entry], None]
# recorded(target, entry, item): emit `entry` and record `item` (continuation.item) with it, atomically
Recorded = Callable[[str, entries.Entry, bytes], None]


def segment_seed(turn_id: str, segment: int, seed: int | None) -> int:
    """CFM/vocoder noise seed of one audio segment: from the request's seed when it has one
    (reproducible turns), else from the turn id (fresh per turn, the same for all its jobs)."""
    base = f"{seed}" if seed is not None else turn_id
    return int.from_bytes(hashlib.sha256(f"{base}:{segment}".encode()).digest()[:8], "little") >> 1


@dataclass
class ChunkPolicy:
    """Low-latency decode chunks (tokens): first chunk, growth factor, cap; 0 = off."""

    first: int = 0
    growth: float = 2.0
    max_chunk: int = 50

    @property
    def enabled(self) -> bool:
        return self.first > 0


@dataclass
class TurnPublisher:
    turn_id: str
    session_id: str
    emit: Emit
    chunks: ChunkPolicy = field(default_factory=ChunkPolicy)
    seed: int | None = None
    text: list[str] = field(default_factory=list)
    _text_ids: list[int] = field(default_factory=list)   # tokens whose text is not sent yet
    _frames: list[tuple[int, ...]] = field(default_factory=list)
    _sent_chunks: int = 0          # decode jobs sent for the current audio segment
    _sent_tokens: int = 0          # frames of the current segment covered by those jobs
    _audio_segment: int = -1
    _jobs: int = 0                 # decode jobs sent for the turn
    recorded: Recorded | None = None
    skip: int = 0                  # recorded entries already published (a continued reply's replay)

    def _out(self, target: str, entry: entries.Entry, item: bytes) -> None:
        if self.skip > 0:
            self.skip -= 1
        elif self.recorded is not None:
            self.recorded(target, entry, item)
        else:
            self.emit(target, entry)

    def _job(self, segment: int, chunk: int, start: int, end: int, final: bool) -> None:
        codes = np.asarray(self._frames[:end], dtype=np.int32)
        lane = entries.urgent_lane(entries.DECODER_JOBS) if self._jobs == 0 else entries.DECODER_JOBS
        self._jobs += 1
        self._out(lane, entries.DecodeJob.from_codes(
            self.turn_id, segment, chunk, codes, final=final, context_frames=start,
            seed=segment_seed(self.turn_id, segment, self.seed), session_id=self.session_id),
            continuation.item("a", segment, c=chunk, f=[list(f) for f in self._frames[self._sent_tokens:end]]))
        self._sent_chunks += 1
        self._sent_tokens = end

    def _chunking(self) -> bool:
        return self.chunks.enabled and self._audio_segment == 0

    def feed(self, ev: Event) -> None:
        t = self.turn_id
        if isinstance(ev, TextToken):
            if ev.token_id is not None:
                self._text_ids.append(ev.token_id)
            if ev.text:
                # the ids travel with the text they show, so a reader knows the tokens of the text
                # it delivered (an interrupted turn's history keeps exactly those)
                self.text.append(ev.text)
                self._out("llm", entries.TextDelta(turn_id=t, segment=ev.segment, text=ev.text,
                                                   tokens=entries.Array.of(self._text_ids, entries.INT32)),
                          continuation.item("t", ev.segment, ids=self._text_ids))
                self._text_ids = []
        elif isinstance(ev, SegmentStart) and ev.kind == "audio":
            self._audio_segment = ev.segment
            self._frames, self._sent_chunks, self._sent_tokens = [], 0, 0
        elif isinstance(ev, AudioFrame):
            self._frames.append(tuple(ev.codes))
            if self._chunking():
                plan = chunk_plan(len(self._frames), self.chunks.first, self.chunks.growth, self.chunks.max_chunk)
                # a chunk is ready once the frames after its end exist (the plan of a longer
                # segment starts with the same chunks), i.e. its end is not the last frame
                for s, e in plan[self._sent_chunks:]:
                    if e >= len(self._frames):
                        break
                    self._job(ev.segment, self._sent_chunks, s, e, final=False)
        elif isinstance(ev, SegmentEnd):
            if ev.kind == "text":
                self._text_ids = []             # tokens that show nothing (EOS, stripped specials)
                self._out("llm", entries.SegmentBoundary(turn_id=t, segment=ev.segment, kind="text"),
                          continuation.item("te", ev.segment, ids=list(ev.token_ids), r=ev.reason))
            else:
                if ev.segment != self._audio_segment:   # a 0-frame segment has no SegmentStart
                    self._audio_segment = ev.segment
                    self._frames, self._sent_chunks, self._sent_tokens = [], 0, 0
                n = len(self._frames)
                if n > self._sent_tokens:       # the rest of the segment (all of it when faithful)
                    self._job(ev.segment, self._sent_chunks, self._sent_tokens, n, final=True)
                self._out("llm", entries.SegmentBoundary(turn_id=t, segment=ev.segment, kind="audio",
                                                     audio_frames=n, chunks=self._sent_chunks),
                          continuation.item("ae", ev.segment, n=n, r=ev.reason, e=list(ev.end_codes)))
        elif isinstance(ev, Done):
            if ev.reason == "error":
                self.emit("llm", entries.TurnError(turn_id=t, stage="llm", code=Status.INTERNAL,
                                               message=ev.error or "generation failed"))
            else:
                self.emit("llm", entries.TurnEnd.with_tokens(t, ev.reason, ev.history, ev.reply_codes,
                                                             text="".join(self.text)))
