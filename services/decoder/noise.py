"""Initial CFM noise that is the same for every prefix of a segment.

In low-latency mode a segment's chunks are decoded by separate jobs (maybe on different
replicas), each re-decoding the segment's prefix; they must start from the same noise for the
frames they share, or chunk k's history would differ from what chunk k-1 emitted. Drawing
frame-major (T, bins) on the CPU from a seeded generator makes the first T rows identical for
every T, so any job can rebuild the noise of frames [0, T) from the segment's seed alone."""
from __future__ import annotations

import torch


def prefix_noise(seed: int, frames: int, bins: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float[bins, frames] standard normal, a prefix of the same draw for a longer segment."""
    g = torch.Generator(device="cpu").manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(frames, bins, generator=g).T.to(dtype)
