"""Joining per-segment waveforms as the reference demos do (reference-model.md §11.4, §12 item 14).

Between consecutive segments A and B, both longer than `overlap` samples, the stream is
A ‖ X ‖ B with X = A[-overlap:]·ramp(1→0) + B[:overlap]·ramp(0→1) (linspace ramps). X is
*inserted*: it replaces nothing, so each such boundary adds `overlap` samples. If either side is
not longer than `overlap`, the two are simply concatenated. overlap = int(sample_rate · 0.01)
(240 at 24 kHz).

Since X comes after all of A, every sample of A is final the moment A exists: a streaming join
emits each segment as it comes (preceded by the X of its left boundary) and only remembers the
last `overlap` samples for the next boundary. That is what the conversation's reply merger
(orchestrator/merge.py) does, with `crossfade_block`: one join everywhere, and `join_segments`,
the whole-reply join, is what the merger's output is tested against.
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
