"""NSF excitation of HiFT (reference-model.md §10.4): f0 -> harmonic sines + noise -> one channel.

The source is stochastic (a random initial phase per harmonic and Gaussian noise). The draws are
an explicit input (`SourceDraws`) so a test can replay the reference's recorded draws; when they
are not given they come from a `torch.Generator` (or the global RNG).

The arithmetic follows the reference order exactly (f0·h then /sr, cumsum in fp32, `% 1`, 2π·),
because the phase is a cumulative sum over tens of thousands of samples: a 1e-4 relative change
of f0 moves the waveform by ~1e-2.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn


class SourceDraws(NamedTuple):
    """The random numbers of one source call.

    phase: (B, H+1, 1) Uniform(-π, π), as drawn (the fundamental's row is zeroed by the source).
    noise: (B, H+1, N) standard normal."""
    phase: torch.Tensor
    noise: torch.Tensor


def draw_source(batch: int, harmonics: int, n_samples: int, *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> SourceDraws:
    """Fresh draws for `batch` sources of `n_samples`, with `harmonics` + 1 sine channels."""
    u = torch.rand(batch, harmonics + 1, 1, generator=generator, device=device)
    # As torch.distributions.Uniform(-π, π).sample: low + u·(high - low), in fp32.
    low = torch.tensor(-math.pi, device=device)
    phase = low + u * (torch.tensor(math.pi, device=device) - low)
    noise = torch.randn(batch, harmonics + 1, n_samples, generator=generator, device=device)
    return SourceDraws(phase, noise)


def upsample_f0(f0: torch.Tensor, hop: int) -> torch.Tensor:
    """Nearest-neighbour ×hop: (B, T) -> (B, T·hop). Equal to the reference nn.Upsample(scale_factor=hop)."""
    return f0.repeat_interleave(hop, dim=-1)


class SourceModule(nn.Module):
    """SineGen + merge (the reference `m_source`): f0 at the sample rate -> excitation s.

    Keys: l_linear.weight (1, H+1), l_linear.bias (1). The reference's second noise branch does not
    reach any output and is not computed."""

    def __init__(self, sampling_rate: int, harmonics: int, sine_amp: float = 0.1, noise_std: float = 0.003,
                 voiced_threshold: float = 10.0):
        super().__init__()
        self.sampling_rate = sampling_rate
        self.harmonics = harmonics
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold
        self.l_linear = nn.Linear(harmonics + 1, 1)

    def sine_waves(self, f0: torch.Tensor, draws: SourceDraws) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 (B, N) Hz -> (e (B, H+1, N) voiced sines + noise, uv (B, 1, N) voiced flag as float)."""
        f0 = f0.unsqueeze(1)                                                    # (B, 1, N)
        h = torch.arange(1, self.harmonics + 2, device=f0.device, dtype=f0.dtype)[:, None]  # (H+1, 1)
        rad = f0 * h / self.sampling_rate                                       # (B, H+1, N) cycles/sample
        theta = 2 * math.pi * (torch.cumsum(rad, dim=-1) % 1)                   # fp32 cumsum, like the reference
        phase = draws.phase.clone()
        phase[:, 0] = 0                                                         # the fundamental starts at phase 0
        sines = self.sine_amp * torch.sin(theta + phase)                        # (B, H+1, N)
        uv = (f0 > self.voiced_threshold).to(f0.dtype)                          # (B, 1, N)
        # Unvoiced samples get noise of about the sine amplitude (std amp/3), voiced ones a little.
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        return sines * uv + noise_amp * draws.noise, uv

    def forward(self, f0: torch.Tensor, draws: SourceDraws | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 (B, N) Hz at the sample rate -> (s (B, 1, N) in (-1, 1), uv (B, N))."""
        if draws is None:
            draws = draw_source(f0.shape[0], self.harmonics, f0.shape[-1], generator=generator, device=f0.device)
        b, n = f0.shape
        if draws.phase.shape != (b, self.harmonics + 1, 1) or draws.noise.shape != (b, self.harmonics + 1, n):
            raise ValueError(f"source draws have shapes {tuple(draws.phase.shape)} / {tuple(draws.noise.shape)}, "
                             f"expected {(b, self.harmonics + 1, 1)} / {(b, self.harmonics + 1, n)}")
        e, uv = self.sine_waves(f0, draws)
        s = torch.tanh(self.l_linear(e.transpose(1, 2)))                        # (B, N, H+1) -> (B, N, 1)
        return s.transpose(1, 2), uv.squeeze(1)
