"""HiFT generator (CosyVoice2 24 kHz; reference-model.md §10.5): 80-bin mel at 50 Hz -> waveform.

    mel (B, 80, T) --f0_predictor--> f0 (B, T) --×hop--> (B, N) --m_source--> s (B, 1, N)
    s --STFT(16/4)--> (B, 18, F)                     F = N/4 + 1,  N = hop·T (hop = 480)
    mel --conv_pre--> (B, C, T) --[lrelu, up_i, (+reflect pad on the last), + source_i,
                                   mean of 3 resblocks] × 3--> (B, C/8, F)
        --lrelu 0.01, conv_post--> (B, 18, F) --exp/sin, iSTFT--> (B, N), clamped ±audio_limit

Runs in fp32 (the demos do). State-dict keys are those of `hift.pt` (§10.7), no prefix.

Batching: `lengths` (B,) gives each mel's valid frame count. Padded positions are zeroed after
every convolution (every activation maps 0 to 0), the source STFT reflects each signal at its own
end, and the iSTFT's window envelope counts only each item's own frames, so the valid samples of
an item are those it would get alone (up to fp32 rounding).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from services.common.layers import length_mask
from services.common.model_config import HiFTConfig
from services.vocoder.f0_predictor import (ConvRNNF0Predictor, WNConv1d, WNConvTranspose1d, fold_weight_norm,
                                           unfold_weight_norm)
from services.vocoder.source import SourceDraws, SourceModule, upsample_f0


def hann_window(n: int) -> torch.Tensor:
    """Periodic Hann, computed in float64 and rounded once, like scipy get_window('hann', n, fftbins=True)."""
    fac = torch.linspace(-math.pi, math.pi, n + 1, dtype=torch.float64)[:-1]
    return (0.5 + 0.5 * torch.cos(fac)).float()


def channel_mask(valid: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """(B,) valid lengths -> (B, 1, length) float mask for (B, C, T) tensors, or None when
    nothing is padded."""
    if valid is None:
        return None
    return length_mask(valid, length).unsqueeze(1).float()


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


class Snake(nn.Module):
    """x + (1/α)·sin²(αx), α per channel on a linear scale (key: alpha (C,))."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]                                 # (1, C, 1)
        return x + (1.0 / (a + 1e-9)) * torch.sin(x * a).pow(2)


class ResBlock(nn.Module):
    """For each dilation d: x += conv2(snake2(conv1_d(snake1(x)))), "same" padding, weight-normed."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2)
            for d in dilations)
        self.convs2 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, L), already zero where mask is 0; Snake(0) = 0 keeps the padding zero.
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            xt = _masked(c1(a1(x)), mask)
            xt = _masked(c2(a2(xt)), mask)
            x = xt + x
        return x


class HiFTGenerator(nn.Module):
    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        self.n_fft, self.hop_len = cfg.istft_n_fft, cfg.istft_hop_len
        self.hop = cfg.hop_samples                                    # samples per mel frame (480)
        self.n_freq = cfg.istft_n_fft // 2 + 1                        # 9
        n_up = len(cfg.upsample_rates)
        ch = [cfg.base_channels // 2 ** i for i in range(n_up + 1)]  # 512, 256, 128, 64

        self.f0_predictor = ConvRNNF0Predictor(cfg.in_channels, cfg.f0_cond_channels)
        self.m_source = SourceModule(cfg.sampling_rate, cfg.nb_harmonics, cfg.nsf_alpha, cfg.nsf_sigma,
                                     cfg.nsf_voiced_threshold)
        self.conv_pre = WNConv1d(cfg.in_channels, ch[0], 7, padding=3)
        self.ups = nn.ModuleList(
            WNConvTranspose1d(ch[i], ch[i + 1], k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))

        # Source stage i meets x after up_i, whose frame rate is F / (product of the later up rates).
        self.source_strides = [math.prod(cfg.upsample_rates[i + 1:]) for i in range(n_up)]  # 15, 3, 1
        self.source_downs = nn.ModuleList(
            nn.Conv1d(self.n_fft + 2, ch[i + 1], 1) if u == 1 else
            nn.Conv1d(self.n_fft + 2, ch[i + 1], 2 * u, u, padding=u // 2)
            for i, u in enumerate(self.source_strides))             # no weight norm (§10.5)
        self.source_resblocks = nn.ModuleList(
            ResBlock(ch[i + 1], k, tuple(d))
            for i, (k, d) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)))
        self.resblocks = nn.ModuleList(
            ResBlock(ch[i + 1], k, tuple(d))
            for i in range(n_up)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = WNConv1d(ch[-1], self.n_fft + 2, 7, padding=3)
        self.register_buffer("window", hann_window(self.n_fft), persistent=False)

    # ------------------------------------------------------------------ weights
    def fold_weight_norm(self) -> "HiFTGenerator":
        """Cache the effective conv weights (call after loading; again after changing g/v)."""
        fold_weight_norm(self)
        return self

    def unfold_weight_norm(self) -> "HiFTGenerator":
        unfold_weight_norm(self)
        return self

    # ------------------------------------------------------------------ STFT
    def stft(self, s: torch.Tensor, n_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """s (B, N) -> real, imag (B, n_fft/2+1, N/hop_len + 1): centred STFT, reflect padding, periodic Hann.

        n_valid (B,) samples: each row is reflected at its own end and frames past its own
        n_valid/hop_len + 1 are zero, as if it had been transformed alone."""
        pad = self.n_fft // 2
        n = s.shape[-1]
        if n_valid is None:
            padded = F.pad(s.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)      # (B, N + n_fft)
        else:
            # Reflect index of padded position j = |j - pad| mirrored at each row's last sample.
            p = (torch.arange(n + 2 * pad, device=s.device) - pad).abs()[None, :]      # (1, N + n_fft)
            last = (n_valid - 1)[:, None]                                              # (B, 1)
            idx = torch.where(p > last, 2 * last - p, p).clamp(0, n - 1)              # (B, N + n_fft)
            padded = torch.gather(s, 1, idx)
        frames = padded.unfold(-1, self.n_fft, self.hop_len) * self.window            # (B, F, n_fft)
        spec = torch.fft.rfft(frames, dim=-1).transpose(1, 2)                         # (B, n_freq, F)
        if n_valid is not None:
            spec = spec * channel_mask(n_valid // self.hop_len + 1, spec.shape[-1])
        return spec.real, spec.imag

    def istft(self, magnitude: torch.Tensor, phase: torch.Tensor,
              n_frames: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_freq, F) magnitude and phase -> (B, (F-1)·hop_len): inverse of the centred STFT
        (irfft, Hann synthesis window, overlap-add, division by the summed squared window).

        n_frames (B,): frames past each row's count are left out of both the sum and the window
        envelope, so a row's samples are those of its own inverse; samples past it are 0."""
        b, _, f = magnitude.shape
        w2 = (self.window ** 2)[None, :, None].expand(b, -1, f)                        # (B, n_fft, F)
        mask = channel_mask(n_frames, f)                                               # (B, 1, F)
        if mask is not None:
            magnitude = torch.where(mask > 0, magnitude, 0.0)                         # where: padding may hold inf
            w2 = w2 * mask
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        frames = torch.fft.irfft(spec.transpose(1, 2), n=self.n_fft, dim=-1)          # (B, F, n_fft)
        frames = frames * self.window
        total = (f - 1) * self.hop_len + self.n_fft

        def overlap_add(cols: torch.Tensor) -> torch.Tensor:                          # (B, n_fft, F) -> (B, total)
            return F.fold(cols, (1, total), (1, self.n_fft), stride=(1, self.hop_len)).reshape(b, total)

        y = overlap_add(frames.transpose(1, 2))
        env = overlap_add(w2)
        pad = self.n_fft // 2
        y, env = y[:, pad:total - pad], env[:, pad:total - pad]                       # drop the centring pad
        return torch.where(env > 1e-11, y / env.clamp_min(1e-11), torch.zeros_like(y))

    # ------------------------------------------------------------------ generator
    def excitation(self, mel: torch.Tensor, lengths: torch.Tensor | None = None, *,
                   generator: torch.Generator | None = None, draws: SourceDraws | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mel (B, 80, T) -> f0 (B, T) Hz, source s (B, 1, N), uv (B, N)."""
        f0 = self.f0_predictor(mel, channel_mask(lengths, mel.shape[-1]))
        s, uv = self.m_source(upsample_f0(f0, self.hop), draws=draws, generator=generator)
        return f0, s, uv

    def spectrum(self, mel: torch.Tensor, source: torch.Tensor, lengths: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 80, T), source (B, 1, N) -> magnitude (before the clip at 100) and phase, (B, n_freq, F)."""
        t = mel.shape[-1]
        n_samples = None if lengths is None else lengths * self.hop
        re, im = self.stft(source.squeeze(1), n_samples)
        s_stft = torch.cat([re, im], dim=1)                                          # (B, n_fft+2, F)

        mel_mask = channel_mask(lengths, t)                                           # padding may hold anything
        x = _masked(self.conv_pre(_masked(mel, mel_mask)), mel_mask)                 # (B, C, T)
        rate = 1
        n_up, k = len(self.ups), len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            rate *= self.cfg.upsample_rates[i]
            x = up(F.leaky_relu(x, self.cfg.lrelu_slope))                           # (B, C/2^(i+1), T·rate)
            extra = 0
            if i == n_up - 1:
                x = F.pad(x, (1, 0), mode="reflect")                                 # one frame more: F = hop·T/4 + 1
                extra = 1
            mask = channel_mask(None if lengths is None else lengths * rate + extra, x.shape[-1])
            x = _masked(x, mask)
            si = _masked(self.source_downs[i](s_stft), mask)
            x = x + self.source_resblocks[i](si, mask)
            xs = self.resblocks[i * k](x, mask)
            for j in range(1, k):
                xs = xs + self.resblocks[i * k + j](x, mask)
            x = xs / k
        x = self.conv_post(F.leaky_relu(x))                                         # default slope 0.01 (§10.5)
        magnitude = torch.exp(x[:, :self.n_freq])
        phase = torch.sin(x[:, self.n_freq:])                                        # as the reference: sin of the output
        return magnitude, phase

    def decode(self, mel: torch.Tensor, source: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic part: mel (B, 80, T) and source (B, 1, N) -> waveform (B, N), N = hop·T.

        lengths (B,) valid mel frames (None: all T); samples past hop·lengths are 0."""
        magnitude, phase = self.spectrum(mel, source, lengths)
        n_frames = None if lengths is None else lengths * self.hop // self.hop_len + 1
        wave = self.istft(magnitude.clamp(max=100.0), phase, n_frames)
        wave = wave.clamp(-self.cfg.audio_limit, self.cfg.audio_limit)
        if lengths is not None:                                                      # the last frame spills 7 samples over
            wave = wave * channel_mask(lengths * self.hop, wave.shape[-1]).squeeze(1)
        return wave

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor | None = None, *,
                generator: torch.Generator | None = None, draws: SourceDraws | None = None) -> torch.Tensor:
        """mel (B, 80, T) -> waveform (B, hop·T). The source is random: give `draws` to replay
        recorded numbers, or a `generator` to make them reproducible."""
        _, s, _ = self.excitation(mel, lengths, generator=generator, draws=draws)
        return self.decode(mel, s, lengths)
