"""Decoding the pieces of a streamed segment, as the decoder stage's work-stream jobs do.

A job carries the codes of a whole segment (faithful mode, `context_tokens` = 0) or, in
low-latency mode, the segment's prefix up to the end of chunk k with `context_tokens` = the
tokens before the chunk. The prefix is decoded whole (decoder and Pre-Net are causal, so the
chunk sees its full history) and only the chunk's own mel frames are kept, plus a few frames
of left context for the vocoder, which synthesises them for continuity across the chunk
boundary and drops their samples.

Noise: chunk jobs may run on different replicas, and each re-decodes the prefix; they must
start from the same noise for the frames they share. Drawing frame-major (T, bins) on the CPU
from the segment's seed makes the first T rows identical for every T."""
from __future__ import annotations

from typing import Sequence

import torch

from services.decoder.runner import DecodeInputError, DecoderRunner, mel_frames

# Mel frames of left context given to the vocoder for a later chunk (80 ms at 50 Hz).
VOCODER_CONTEXT_FRAMES = 4


def prefix_noise(seed: int, frames: int, bins: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float[bins, frames] standard normal, a prefix of the same draw for a longer segment."""
    g = torch.Generator(device="cpu").manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(frames, bins, generator=g).T.to(dtype)


def chunk_window(context_tokens: int, stride: int) -> int:
    """First mel frame of a chunk that starts at token `context_tokens`: 4s-1 (frame 4s-1 has
    no token of its own and comes from the window that extends past it), or 0."""
    return 0 if context_tokens == 0 else stride * context_tokens - 1


def check_piece(runner: DecoderRunner, i: int, codes, context_tokens: int) -> torch.Tensor:
    """One piece's codes, validated (DecodeInputError naming piece i)."""
    c = runner.check_segment(i, codes)
    if not 0 <= context_tokens < c.shape[0]:
        raise DecodeInputError(f"piece {i}: context of {context_tokens} tokens leaves nothing of its "
                               f"{c.shape[0]}-token window to decode")
    return c


def decode_pieces(runner: DecoderRunner, pieces: Sequence[tuple[torch.Tensor, int, int]]
                  ) -> list[tuple[torch.Tensor, int]]:
    """[(codes Long[L, C] (the prefix), context_tokens, seed)] -> [(mel Float[bins, n] on the
    CPU, vocoder context frames at its start)], all in one batched decode."""
    codes = [check_piece(runner, i, c, ctx) for i, (c, ctx, _) in enumerate(pieces)]
    bins = runner.config.flow.in_channels
    noise = [prefix_noise(seed, mel_frames(c.shape[0], runner.stride), bins) for c, (_, _, seed) in zip(codes, pieces)]
    mels = runner.decode(codes, noise=noise)
    out = []
    for mel, (_, ctx, _) in zip(mels, pieces):
        first = chunk_window(ctx, runner.stride)
        vctx = min(first, VOCODER_CONTEXT_FRAMES)
        out.append((mel[:, first - vctx:].cpu(), vctx))
    return out
