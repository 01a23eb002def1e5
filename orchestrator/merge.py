"""Merge a turn's stage streams into the ordered event stream a caller receives.

Inputs, as they arrive (from turn:{id}:llm and turn:{id}:audio, possibly interleaved in any
order across the two streams): text deltas, segment boundaries, PCM chunks (one per decoded
piece, keyed by (segment, chunk)), the LLM's end, errors.

Output, in order: text deltas as they come; audio as gap-free numbered chunks in (segment,
chunk) order, with the reference's 240-sample crossfade block inserted between consecutive
segments (§11.4: inserted, not replacing); an AUDIO_END boundary when a segment's audio is
all out; timing marks; one EndOfTurn when the LLM is done and every announced chunk is out.

Pure logic, no I/O: feed entries, get TurnEvent messages. Deterministic for the same inputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from baichuan_audio.v1 import conversation_pb2 as pb
from services.common.audio import from_pcm16, to_pcm16
from services.common.crossfade import crossfade_block, crossfade_samples
from services.common.entries import Entry, PcmChunk, SegmentBoundary, TextDelta, TurnEnd, TurnError


@dataclass
class _Segment:
    frames: int | None = None          # announced by the LLM's audio boundary
    chunks: int | None = None
    received: dict[int, PcmChunk] = field(default_factory=dict)
    next_chunk: int = 0


class ReplyMerger:
    def __init__(self, turn_id: str, *, sample_rate: int = 24000, spoken: bool = True,
                 started: float | None = None):
        self.turn_id = turn_id
        self.sample_rate = sample_rate
        self.overlap = crossfade_samples(sample_rate)    # 240 samples at 24 kHz (reference)
        self.spoken = spoken
        self.t0 = started if started is not None else time.time()
        self.segments: dict[int, _Segment] = {}
        self.next_segment = 0                             # audio segment to emit next
        self.sequence = 0
        self.prev_tail: np.ndarray | None = None          # last `overlap` samples of the previous segment
        self.prev_len = 0                                 # samples of the previous audio segment
        self.cur_len = 0                                  # samples of the current one so far
        self.text: list[str] = []
        self.text_tokens: list[int] = []                  # token ids of the text sent so far
        self.audio_samples = 0
        self.llm_done: TurnEnd | None = None
        self.error: TurnError | None = None
        self.finished = False
        self.marks: dict[str, float] = {}
        self.segment_text: dict[int, str] = {}            # reply text per text segment
        self.segment_tokens: dict[int, int] = {}          # text tokens per text segment
        self.segment_audio: dict[int, list[np.ndarray]] = {}  # emitted samples per audio segment (no crossfade)

    # ------------------------------------------------------------------ helpers
    def _ms(self) -> float:
        return (time.time() - self.t0) * 1000.0

    def _mark(self, name: str) -> pb.TurnEvent | None:
        if name in self.marks:
            return None
        self.marks[name] = self._ms()
        return pb.TurnEvent(turn_id=self.turn_id, timing=pb.TimingMark(name=name, ms_since_turn_start=self.marks[name]))

    def _seg(self, i: int) -> _Segment:
        return self.segments.setdefault(i, _Segment())

    # ------------------------------------------------------------------ feeding
    def feed(self, entry: Entry) -> list[pb.TurnEvent]:
        if self.finished:
            return []
        out: list[pb.TurnEvent] = []
        if isinstance(entry, TextDelta):
            if entry.text:
                m = self._mark("first_text")
                if m:
                    out.append(m)
                self.text.append(entry.text)
                ids = entry.tokens.numpy().tolist()
                self.text_tokens.extend(ids)
                self.segment_text[entry.segment] = self.segment_text.get(entry.segment, "") + entry.text
                self.segment_tokens[entry.segment] = self.segment_tokens.get(entry.segment, 0) + len(ids)
                out.append(pb.TurnEvent(turn_id=self.turn_id, text=pb.TextDelta(text=entry.text, segment=entry.segment)))
        elif isinstance(entry, SegmentBoundary):
            if entry.kind == "text":
                out.append(pb.TurnEvent(turn_id=self.turn_id, segment=pb.SegmentBoundary(
                    segment=entry.segment, kind=pb.SegmentBoundary.TEXT_END)))
            else:
                seg = self._seg(entry.segment)
                seg.frames, seg.chunks = entry.audio_frames, entry.chunks
        elif isinstance(entry, PcmChunk):
            if entry.sample_rate != self.sample_rate:   # the vocoder's rate rules
                self.sample_rate, self.overlap = entry.sample_rate, int(entry.sample_rate * 0.01)
            self._seg(entry.segment).received.setdefault(entry.chunk, entry)
        elif isinstance(entry, TurnEnd):
            self.llm_done = entry
        elif isinstance(entry, TurnError):
            self.error = entry
        out.extend(self._drain())
        return out

    def _audio_event(self, samples: np.ndarray, segment: int) -> pb.TurnEvent:
        ev = pb.TurnEvent(turn_id=self.turn_id, audio=pb.AudioChunk(
            sequence=self.sequence, sample_rate=self.sample_rate, pcm16=to_pcm16(samples, limit=1.0),
            segment=segment))
        self.sequence += 1
        self.audio_samples += len(samples)
        return ev

    def _drain(self) -> list[pb.TurnEvent]:
        out: list[pb.TurnEvent] = []
        while True:
            seg = self.segments.get(self.next_segment)
            if seg is None:
                break
            # emit the chunks of the current segment that are next in order
            while seg.next_chunk in seg.received:
                piece = seg.received.pop(seg.next_chunk)
                samples = from_pcm16(piece.pcm16.data)
                if seg.next_chunk == 0:
                    # §11.4: the inserted block when both segments are longer than the overlap
                    # (a first chunk is at least one token, far longer than the overlap)
                    if self.prev_tail is not None and self.prev_len > self.overlap and len(samples) > self.overlap:
                        block = crossfade_block(torch.from_numpy(self.prev_tail),
                                                torch.from_numpy(samples[:self.overlap])).numpy()
                        out.append(self._audio_event(block, self.next_segment))
                    self.cur_len = 0
                m = self._mark("first_audio")
                if m:
                    out.append(m)
                out.append(self._audio_event(samples, self.next_segment))
                self.segment_audio.setdefault(self.next_segment, []).append(samples)
                # the segment's last `overlap` samples, across its chunks
                tail = samples if self.cur_len == 0 or self.prev_tail is None else np.concatenate([self.prev_tail, samples])
                self.prev_tail = tail[-self.overlap:].copy()
                self.cur_len += len(samples)
                seg.next_chunk += 1
            if seg.chunks is not None and seg.next_chunk >= seg.chunks:
                if seg.chunks > 0:
                    self.prev_len = self.cur_len
                    out.append(pb.TurnEvent(turn_id=self.turn_id, segment=pb.SegmentBoundary(
                        segment=self.next_segment, kind=pb.SegmentBoundary.AUDIO_END, audio_frames=seg.frames or 0)))
                self.next_segment += 1
                continue
            break
        out.extend(self._maybe_end())
        return out

    def pending_audio(self) -> bool:
        """Announced audio not yet emitted (segments the LLM closed whose chunks are missing)."""
        return any(i >= self.next_segment and (s.chunks is None or s.next_chunk < s.chunks)
                   for i, s in self.segments.items())

    def interrupt(self) -> list[pb.TurnEvent]:
        """End the turn now (Interrupt): audio not yet emitted is dropped, so the reply is
        exactly what the caller was sent."""
        if self.finished:
            return []
        self.llm_done = TurnEnd(turn_id=self.turn_id, reason="cancelled")
        self.segments = {i: s for i, s in self.segments.items() if i < self.next_segment}
        return self._maybe_end()

    def _maybe_end(self) -> list[pb.TurnEvent]:
        if self.error is not None:
            self.finished = True
            e = self.error
            return [pb.TurnEvent(turn_id=self.turn_id, error=pb.TurnError(
                code=e.code, message=f"{e.stage}: {e.message}"))]
        if self.llm_done is None or self.pending_audio():
            return []
        self.finished = True
        out = [m for m in (self._mark("end"),) if m]
        seconds = self.audio_samples / self.sample_rate
        wall = self._ms() / 1000.0
        reason = {"eos": "complete", "cancelled": "interrupted"}.get(self.llm_done.reason, self.llm_done.reason)
        out.append(pb.TurnEvent(turn_id=self.turn_id, end=pb.EndOfTurn(
            reason=reason, text="".join(self.text), audio_seconds=seconds,
            real_time_factor=(wall / seconds) if seconds else 0.0)))
        return out
