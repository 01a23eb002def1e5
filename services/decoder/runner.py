"""DecoderRunner: audio codes in, 80-bin 50 Hz mels out (plain Python, no Ray).

    codes (L, 8) --CodeDecoder (RVQ sum + proj_decoder)--> (L, d) --AudioDecoder--> (4L-1, d)
        --Prenet--> mu (4L-1, 80) --CFM (10 Euler steps, CFG)--> mel (80, 4L-1)

Faithful mode (`decode`): one whole segment per item, as the reference decodes it. Items of
different lengths run as one padded batch; every stage is per-segment (the decoder's GroupNorm
statistics included, correction 5), so an item's mel does not depend on its batch.

Low-latency mode (`iter_chunked` / `decode_chunked`, our addition): one segment is decoded in
growing chunks, each re-decoding the tokens before it (all of them by default, or `left_context`)
and dropping their frames, so the first audio is ready after `first_chunk` tokens instead of after
the whole segment. A chunk differs from faithful decoding only because it cannot see the future:
the decoder's GroupNorm statistics and the U-Net's 100-frame attention blocks are non-causal;
tests/decoder/test_chunked.py measures the distance.

Noise: a segment's initial CFM state is (80, 4L-1), drawn in the model dtype from one generator
in input order (seeded when `seed` is given), or passed by the caller.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from services.common.checkpoint import PREFIX, Checkpoint, load_state
from services.common.chunking import chunk_plan
from services.common.codebooks import CodeDecoder
from services.common.cuda_graphs import GraphCache, bucket, ladder
from services.common.dtypes import default_dtype
from services.common.layers import length_mask, sinusoids
from services.common.model_config import ModelConfig
from services.decoder import cfm
from services.decoder.audio_decoder import AudioDecoder
from services.decoder.estimator import Estimator
from services.decoder.prenet import Prenet

# The reference stops a segment after 500 frames (40 s).
MAX_FRAMES = 500


class DecodeInputError(ValueError):
    """Codes the decoder cannot take; the message names the segment, frame and codebook."""


class FlowDecoder(nn.Module):
    """The stage container of `audio_tokenizer.audio_flow_matching_decoder.` (the CFM has no weights)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.prenet = Prenet(config.flow)
        self.conditional_decoder = Estimator(config.flow)


# CFM graphs are captured per batch bucket and per this many mel frames (padding is masked)
SOLVE_FRAME_BUCKET = 64
# Windows captured at start (deployment warm-up): low-latency windows are a segment's prefix,
# and most spoken segments are shorter than this (10 s); longer ones capture on first use.
WARM_UP_TOKENS = 128


def mel_frames(tokens: int, stride: int) -> int:
    """Mel frames of a segment of `tokens` code frames: stride·L - 1 (4L-1 with k=3 < stride=4, §8)."""
    return tokens * stride - 1


def mel_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two (80, T) log-mels (the report's "mel MAE")."""
    if a.shape != b.shape:
        raise ValueError(f"mel shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.float() - b.float()).abs().mean().item()


def waveform_distance(a: torch.Tensor, b: torch.Tensor, n_ffts: Sequence[int] = (512, 1024, 2048)) -> float:
    """Multi-resolution log-magnitude STFT distance of two waveforms (mean L1 of ln|X|, averaged
    over resolutions). Phase-blind on purpose: HiFT draws random source phases and noise, so two
    vocodings of one mel differ sample by sample but not in their spectra."""
    n = min(a.shape[-1], b.shape[-1])
    a, b = a.reshape(-1)[:n].float(), b.reshape(-1)[:n].float()
    total = 0.0
    for n_fft in n_ffts:
        win = torch.hann_window(n_fft, device=a.device)
        spec = [torch.stft(x, n_fft, n_fft // 4, window=win, return_complex=True).abs().clamp_min(1e-5).log()
                for x in (a, b)]
        total += (spec[0] - spec[1]).abs().mean().item()
    return total / len(n_ffts)


class DecoderRunner:
    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], *,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 max_frames: int = MAX_FRAMES, max_batch: int = 16, batch_cfg: bool | None = None,
                 cuda_graphs: bool | None = None, source: str = "decoder tensors"):
        """config + tensors (full reference keys of the bridge codebooks / proj_decoder, the audio
        decoder and the flow decoder). dtype: bf16 on CUDA and fp32 on CPU unless given.

        max_frames: longest accepted segment in code frames (the reference's cap is 500).
        batch_cfg: run the CFG branches as one estimator call of batch 2B (see cfm.solve); None: on
        CUDA (measured on an H100, bf16: the same mel bit for bit, the first chunk 80 -> 45 ms).
        cuda_graphs: replay the CFM solve (2 x diffusion_steps estimator calls, the decoder's
        time) as a CUDA graph per padded (batch, frames) shape (None: on CUDA)."""
        self.config = config
        self.device = torch.device(device if device is not None else "cpu")
        self.dtype = dtype or default_dtype(self.device)
        self.max_frames, self.max_batch = max_frames, max_batch
        self.batch_cfg = self.device.type == "cuda" if batch_cfg is None else batch_cfg
        a = config.audio
        self.codebook_sizes = a.codebook_sizes
        self.stride = a.avg_pooler
        # seconds per code frame: 16 kHz hop 160, encoder stride 2, bridge pooling 4 -> 0.08 s
        self.frame_s = a.avg_pooler * a.stride_size * a.hop_length / a.sampling_rate

        # Built in fp32 and loaded, then cast: buffers round exactly as the reference's model.to(bf16).
        self.code_decoder = CodeDecoder(a)
        load_state(self.code_decoder, tensors, PREFIX["bridge"], source=source, partial=True)
        self.audio_decoder = AudioDecoder(config)
        pos_key = "positional_embedding"
        load_state(self.audio_decoder, tensors, PREFIX["audio_decoder"], source=source, optional=[pos_key])
        if PREFIX["audio_decoder"] + pos_key not in tensors:
            # Not stored: the reference builds the table under the load dtype (§12 item 16).
            table = sinusoids(a.decoder_max_positions, a.d_model, dtype=self.dtype)
            self.audio_decoder.positional_embedding.copy_(table.float())
        self.flow = FlowDecoder(config)
        load_state(self.flow, tensors, PREFIX["flow"], source=source)
        for m in (self.code_decoder, self.audio_decoder, self.flow):
            m.to(self.device, self.dtype).eval()

        self.graphs = GraphCache(self.device, cuda_graphs)
        self.batch_sizes = ladder(max_batch)
        self._solve_buffers: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

        table_tokens = (self.audio_decoder.max_frames + 1) // self.stride
        if not 1 <= max_frames <= table_tokens:
            raise ValueError(f"max_frames={max_frames}: must be between 1 and {table_tokens} code frames "
                             f"(the audio decoder's positional table has {self.audio_decoder.max_frames} rows)")

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint | str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, **kw) -> "DecoderRunner":
        """From a checkpoint directory; reads only the decoder stage's prefixes."""
        if not isinstance(ckpt, Checkpoint):
            ckpt = Checkpoint(ckpt)
        bridge = PREFIX["bridge"]
        tensors = ckpt.tensors([bridge + "vq_list.", bridge + "proj_decoder.",
                                PREFIX["audio_decoder"], PREFIX["flow"]])
        return cls(ckpt.config, tensors, device=device, dtype=dtype, source=str(ckpt.path), **kw)

    # ------------------------------------------------------------------ validation
    def check_segment(self, i: int, codes) -> torch.Tensor:
        """Validate segment i: -> Long[L, n_books] on the CPU, a trailing end-of-audio frame removed.
        Raises DecodeInputError naming the segment, frame and codebook of what is wrong."""
        n_books = len(self.codebook_sizes)
        if not isinstance(codes, torch.Tensor):
            try:
                codes = torch.as_tensor(codes)
            except (TypeError, ValueError, RuntimeError) as e:
                raise DecodeInputError(f"segment {i}: codes are not an integer array ({e})") from None
        if codes.dim() != 2 or codes.shape[1] != n_books:
            raise DecodeInputError(f"segment {i} has shape {tuple(codes.shape)}; expected (frames, {n_books}): "
                                   f"one row per {self.frame_s * 1000:g} ms frame, one column per codebook")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise DecodeInputError(f"segment {i} has dtype {codes.dtype}; codes must be integers")
        codes = codes.to("cpu", torch.int64)
        eos = self.codebook_sizes[0]
        is_eos = codes[:, 0] == eos
        if bool(is_eos[-1:].any()):
            codes, is_eos = codes[:-1], is_eos[:-1]     # the terminating frame itself is not audio
        if bool(is_eos.any()):
            f = int(is_eos.nonzero()[0, 0])
            raise DecodeInputError(
                f"segment {i}: end-of-audio code {eos} in codebook 0 at frame {f} of {codes.shape[0]}; "
                f"a segment ends at its first end-of-audio frame, so split or truncate it there")
        if codes.shape[0] == 0:
            raise DecodeInputError(
                f"segment {i} has no audio frames; the reference emits nothing for a segment whose "
                f"end-of-audio comes at frame 0, so skip it instead of decoding it")
        if codes.shape[0] > self.max_frames:
            raise DecodeInputError(
                f"segment {i} has {codes.shape[0]} frames ({codes.shape[0] * self.frame_s:.1f} s); the limit is "
                f"{self.max_frames} frames ({self.max_frames * self.frame_s:.1f} s), the reference's cap per segment")
        sizes = torch.tensor(self.codebook_sizes)
        bad = (codes < 0) | (codes >= sizes)
        if bool(bad.any()):
            f, k = (int(v) for v in bad.nonzero()[0])
            raise DecodeInputError(
                f"segment {i}: code {int(codes[f, k])} at frame {f}, codebook {k} is out of range; "
                f"codebook {k} has {self.codebook_sizes[k]} entries (0..{self.codebook_sizes[k] - 1})")
        return codes

    _check = check_segment          # the name services/decoder/deployment.py uses

    def _check_noise(self, noise, frames: list[int]) -> list[torch.Tensor]:
        if len(noise) != len(frames):
            raise DecodeInputError(f"got {len(noise)} noise tensors for {len(frames)} segments")
        M = self.config.flow.in_channels
        for i, (z, t) in enumerate(zip(noise, frames)):
            if tuple(z.shape) != (M, t):
                raise DecodeInputError(f"noise {i} has shape {tuple(z.shape)}; segment {i} needs ({M}, {t})")
        return [z.to(self.device, self.dtype) for z in noise]

    def _draw_noise(self, frames: list[int], seed: int | None) -> list[torch.Tensor]:
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        M = self.config.flow.in_channels
        return [cfm.draw_noise((M, t), self.dtype, self.device, gen) for t in frames]

    # ------------------------------------------------------------------ faithful mode
    @torch.inference_mode()
    def embed(self, segments: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Validated code segments -> per-segment (L_i, d_model) inputs of the audio decoder."""
        codes = [self.check_segment(i, s) for i, s in enumerate(segments)]
        rows = self.code_decoder(torch.cat(codes).to(self.device))               # (sum L, d)
        return list(torch.split(rows, [c.shape[0] for c in codes]))

    @torch.inference_mode()
    def decode(self, segments: Sequence[torch.Tensor], noise: Sequence[torch.Tensor] | None = None,
               seed: int | None = None) -> list[torch.Tensor]:
        """segments: list of Long[L_i, 8] -> list of Float[80, 4 L_i - 1] (fp32, on the runner's device).

        noise: optional per-segment initial CFM states Float[80, 4 L_i - 1]; else drawn (seeded if
        `seed` is given). A trailing end-of-audio frame is dropped; see `check_segment` for what is refused."""
        if len(segments) == 0:
            raise DecodeInputError("decode() got no segments; pass a list of (frames, 8) code tensors")
        return self.decode_embeddings(self.embed(segments), noise, seed)

    @torch.inference_mode()
    def decode_embeddings(self, embs: Sequence[torch.Tensor], noise: Sequence[torch.Tensor] | None = None,
                          seed: int | None = None) -> list[torch.Tensor]:
        """The decoder stage from CodeDecoder outputs: list of (L_i, d_model) -> list of (80, 4 L_i - 1)."""
        frames = [mel_frames(e.shape[0], self.stride) for e in embs]
        zs = self._check_noise(noise, frames) if noise is not None else self._draw_noise(frames, seed)
        out: list[torch.Tensor | None] = [None] * len(embs)
        order = sorted(range(len(embs)), key=lambda i: -frames[i])               # longest first: less padding
        for s in range(0, len(order), self.max_batch):
            idx = order[s:s + self.max_batch]
            for i, mel in zip(idx, self._run([embs[i] for i in idx], [zs[i] for i in idx])):
                out[i] = mel
        return out  # type: ignore[return-value]

    def _run(self, embs: list[torch.Tensor], zs: list[torch.Tensor]) -> list[torch.Tensor]:
        frames = [z.shape[1] for z in zs]
        emb = nn.utils.rnn.pad_sequence([e.to(self.device, self.dtype) for e in embs], batch_first=True)
        lengths = torch.tensor([e.shape[0] for e in embs], device=self.device)   # (B,) tokens
        hidden, t_len = self.audio_decoder(emb, lengths)                          # (B, T, d)
        mu = self.flow.prenet(hidden, t_len).transpose(1, 2)                      # (B, 80, T)
        mask = length_mask(t_len, mu.shape[-1])[:, None]                          # (B, 1, T)
        z = torch.zeros_like(mu)
        for b, zb in enumerate(zs):
            z[b, :, :frames[b]] = zb
        mel = self._solve(mu, mask, z)
        return [mel[b, :, :t].float() for b, t in enumerate(frames)]

    def _solve(self, mu: torch.Tensor, mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """cfm.solve. On CUDA the inputs are copied into buffers of the next (batch, frames) bucket,
        right-padded, and the solve runs as that bucket's CUDA graph (or eagerly on the same
        buffers when graphs are off: the same numbers). The estimator is causal in time,
        normalises each frame on its own and attends under the mask, so padding frames do not
        reach the real ones; padding rows get one unmasked frame so their softmax stays finite."""
        f = self.config.flow
        est = self.flow.conditional_decoder
        if self.device.type != "cuda":
            return cfm.solve(est, mu, mask, z, f.diffusion_steps, f.cfm, batch_cfg=self.batch_cfg)
        B, M, T = mu.shape
        key = (bucket(B, self.batch_sizes), -(-T // SOLVE_FRAME_BUCKET) * SOLVE_FRAME_BUCKET)
        if key not in self._solve_buffers:
            self._solve_buffers[key] = tuple(torch.zeros(key[0], c, key[1], dtype=self.dtype, device=self.device)
                                             for c in (M, 1, M, M))       # mu, mask, noise, mel
        b_mu, b_mask, b_z, b_out = self._solve_buffers[key]
        for buf, x in ((b_mu, mu), (b_mask, mask), (b_z, z)):
            buf.zero_()
            buf[:B, :, :T].copy_(x)
        b_mask[B:, :, 0] = 1

        def run() -> None:
            b_out.copy_(cfm.solve(est, b_mu, b_mask, b_z, f.diffusion_steps, f.cfm, batch_cfg=self.batch_cfg))

        self.graphs.run(("cfm",) + key, run)
        return b_out[:B, :, :T].clone()                  # the buffer is rewritten by the next solve

    @torch.inference_mode()
    def warm_up(self, max_tokens: int) -> int:
        """Run (on a GPU: capture) the CFM solve of every (batch, frames) bucket that windows of up
        to `max_tokens` code frames use, so no request waits for a capture; longer windows are
        captured when first needed. Returns the number of shapes (0 without CUDA graphs)."""
        if not self.graphs.enabled:
            return 0
        M = self.config.flow.in_channels
        top = mel_frames(min(max_tokens, self.max_frames), self.stride)
        n = 0
        for B in self.batch_sizes:
            for T in range(SOLVE_FRAME_BUCKET, top + SOLVE_FRAME_BUCKET, SOLVE_FRAME_BUCKET):
                x = torch.zeros(B, M, T, dtype=self.dtype, device=self.device)
                self._solve(x, torch.ones(B, 1, T, dtype=self.dtype, device=self.device), x)
                n += 1
        return n

    # ------------------------------------------------------------------ low-latency mode
    @torch.inference_mode()
    def iter_chunked(self, codes: torch.Tensor, first_chunk: int = 6, growth: float = 2.0,
                     max_chunk: int = 50, left_context: int | None = None, noise: torch.Tensor | None = None,
                     seed: int | None = None) -> Iterator[torch.Tensor]:
        """Decode one segment chunk by chunk; yields consecutive mel pieces (80, n_k) that concatenate
        to (80, 4L-1). Chunk k covers tokens [s, e) of chunk_plan(...). Its window starts
        `left_context` tokens before s (None: at token 0, the whole prefix) and it emits global frames
        [4s-1, 4e-1) (the first chunk from frame 0): frame 4s-1 has no token of its own (k=3 <
        stride 4), so it comes from the window that extends past it.

        Default: the whole prefix. Every stage except the decoder's GroupNorm and the U-Net's
        100-frame attention blocks is causal, so with the whole prefix a chunk lacks only the future;
        a truncated history also changes every frame's attention (the decoder and Pre-Net attend to
        all earlier frames), which measured 10-20x further from faithful decoding (see
        tests/decoder/test_chunked.py). Cost: the windows sum to about 3x a faithful decode for a
        150-token segment with the default plan; an int left_context bounds it.

        The pieces are joined by plain concatenation: the deviation is spread evenly over a chunk, not
        concentrated at its edges (each piece starts with its full history), and a crossfade would
        hold back the tail of every piece until the next chunk exists, adding its length to the
        latency of every chunk. noise: Float[80, 4L-1] for the whole segment; windows use their slice."""
        if left_context is not None and left_context < 1:
            raise ValueError("left_context must be None (whole prefix) or >= 1 token: frame 4s-1 of a chunk "
                             "starting at s exists only in a window that starts before s")
        emb = self.embed([codes])[0]                                              # (L, d)
        L, st = emb.shape[0], self.stride
        T = mel_frames(L, st)
        z = (self._check_noise([noise], [T]) if noise is not None else self._draw_noise([T], seed))[0]
        for k, (s, e) in enumerate(chunk_plan(L, first_chunk, growth, max_chunk)):
            c0 = 0 if left_context is None else max(0, s - left_context)
            g0, g1 = st * c0, mel_frames(e, st)                                  # window frames [g0, g1)
            win = self._run([emb[c0:e]], [z[:, g0:g1]])[0]                       # (80, g1 - g0)
            first = 0 if k == 0 else st * s - 1
            yield win[:, first - g0:]

    def decode_chunked(self, codes: torch.Tensor, first_chunk: int = 6, growth: float = 2.0,
                       max_chunk: int = 50, left_context: int | None = None, noise: torch.Tensor | None = None,
                       seed: int | None = None) -> torch.Tensor:
        """Low-latency decoding of one segment, joined: Float[80, 4L-1] (see iter_chunked)."""
        return torch.cat(list(self.iter_chunked(codes, first_chunk, growth, max_chunk, left_context,
                                                noise, seed)), dim=1)
