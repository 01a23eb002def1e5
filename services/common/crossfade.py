"""Joining per-segment waveforms as the reference demos do (reference-model.md §11.4, §12 item 14).

Between consecutive segments A and B, both longer than `overlap` samples, the stream is
A ‖ X ‖ B with X = A[-overlap:]·ramp(1→0) + B[:overlap]·ramp(0→1) (linspace ramps). X is
*inserted*: it replaces nothing, so each such boundary adds `overlap` samples. If either side is
not longer than `overlap`, the two are simply concatenated. overlap = int(sample_rate · 0.01)
(240 at 24 kHz).

Since X comes after all of A, every sample of A is final the moment A exists: the streaming
joiner emits each segment whole (preceded by the X of its left boundary) and only remembers the
last `overlap` samples for the next boundary. The conversation's reply merger
(orchestrator/merge.py) joins segments with `crossfade_block` too: one join everywhere.
"""
from __future__ import annotations

from typing import Iterable

import torch

CROSSFADE_SECONDS = 0.01


def crossfade_samples(sample_rate: int) -> int:
    """The reference overlap: int(sample_rate · 0.01) samples (240 at 24 kHz)."""
    return int(sample_rate * CROSSFADE_SECONDS)


def crossfade_block(a_tail: torch.Tensor, b_head: torch.Tensor) -> torch.Tensor:
    """X = a_tail·linspace(1, 0) + b_head·linspace(0, 1); both (..., overlap)."""
    n = a_tail.shape[-1]
    ramp = torch.linspace(0.0, 1.0, n, device=a_tail.device, dtype=a_tail.dtype)
    down = torch.linspace(1.0, 0.0, n, device=a_tail.device, dtype=a_tail.dtype)  # not 1 - ramp: rounding
    return a_tail * down + b_head * ramp


def join_segments(segments: Iterable[torch.Tensor], overlap: int) -> torch.Tensor:
    """Concatenate (..., N_k) segments along the last dim with the inserted crossfade blocks."""
    segments = list(segments)
    if not segments:
        raise ValueError("join_segments: no segments to join")
    pieces = [segments[0]]
    for a, b in zip(segments, segments[1:]):
        if a.shape[-1] > overlap and b.shape[-1] > overlap:
            pieces.append(crossfade_block(a[..., -overlap:], b[..., :overlap]))
        pieces.append(b)
    return torch.cat(pieces, dim=-1)


class StreamJoiner:
    """Feed segments one at a time; each `push` returns the samples that are final now.

    The concatenation of every `push` result and `finish()` equals `join_segments` of all
    segments. A segment is returned in full when it arrives (after the X of its left boundary);
    `finish()` returns nothing more and resets the joiner."""

    def __init__(self, overlap: int):
        if overlap < 1:
            raise ValueError(f"crossfade overlap must be at least 1 sample, got {overlap}")
        self.overlap = overlap
        self._tail: torch.Tensor | None = None   # last `overlap` samples of the previous segment
        self._prev_long = False                   # previous segment longer than `overlap`

    def push(self, segment: torch.Tensor) -> torch.Tensor:
        """segment (..., N) -> (..., N) or (..., overlap + N) samples to emit now."""
        long = segment.shape[-1] > self.overlap
        out = segment
        if self._tail is not None and self._prev_long and long:
            out = torch.cat([crossfade_block(self._tail, segment[..., :self.overlap]), segment], dim=-1)
        self._tail = segment[..., -self.overlap:].clone()
        self._prev_long = long
        return out

    def finish(self) -> torch.Tensor:
        """Samples still held back (always none: see the module note); resets for a new stream."""
        empty = self._tail[..., :0] if self._tail is not None else torch.zeros(0)
        self._tail, self._prev_long = None, False
        return empty
