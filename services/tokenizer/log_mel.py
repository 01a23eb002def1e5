"""Audio front end: 16 kHz mono, 30 s splits, Whisper log-mel (reference-model.md §3).

Every size comes from AudioConfig (sampling_rate, n_fft, hop_length, num_mel_bins,
max_audio_seconds, split_overlap, kernel_size, stride_size, avg_pooler).

Order of operations that changes numbers (§12 item 3):
  resample each channel (sinc, lowpass_filter_width 128) -> mean over channels ->
  cut into 30 s splits -> per split: zero-pad to 30 s -> reflect-centred STFT -> |X|^2,
  last frame dropped -> Slaney mel -> log10(max(., 1e-10)) -> max(., M - 8) with M over the
  whole padded 30 s spectrogram -> (x + 4) / 4 -> crop to the valid frames.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache

import torch
import torchaudio
from torch import nn

from services.common.layers import length_mask
from services.common.model_config import AudioConfig


# ------------------------------------------------------------------ length arithmetic (§3.4)
@dataclass(frozen=True)
class SplitLengths:
    samples: int          # 16 kHz samples in the split
    mel_frames: int       # valid log-mel frames
    encoder_length: int   # frames after conv1 (s1) and conv2 (s2)
    bridge_length: int    # tokens (12.5 Hz); 0 means the split is dropped


def max_split_samples(audio: AudioConfig) -> int:
    return audio.max_audio_seconds * audio.sampling_rate


def mel_frames(samples: int, audio: AudioConfig) -> int:
    return min(max_split_samples(audio) // audio.hop_length, samples // audio.hop_length + 1)


def encoder_length(mel, audio: AudioConfig):
    """Encoder output frames of `mel` input frames (an int, or a tensor of lengths)."""
    k, s = audio.kernel_size, audio.stride_size
    n = (mel + 2 * (k // 2) - k) // 1 + 1          # conv1: stride 1, pad k//2
    return (n + 2 * (k // 2) - k) // s + 1          # conv2: stride s, pad k//2


def split_lengths(samples: int, audio: AudioConfig) -> SplitLengths:
    mel = mel_frames(samples, audio)
    enc = encoder_length(mel, audio)
    return SplitLengths(samples, mel, enc, enc // audio.avg_pooler)


def resampled_length(samples: int, orig_sr: int, new_sr: int) -> int:
    """Output length of torchaudio.functional.resample (ceil(new·n / orig) on the reduced ratio)."""
    if orig_sr == new_sr:
        return samples
    g = math.gcd(int(orig_sr), int(new_sr))
    o, n = int(orig_sr) // g, int(new_sr) // g
    return -(-n * samples // o)


def split_bounds(samples: int, audio: AudioConfig) -> list[tuple[int, int]]:
    """[start, end) of each split, as the reference's `split_with_overlap`.

    One split if it fits in max_audio_seconds; otherwise consecutive splits stepping back by
    split_overlap seconds, keeping only pieces of at least n_fft samples."""
    max_n = max_split_samples(audio)
    if samples <= max_n or audio.split_overlap < 0:
        return [(0, samples)]
    overlap = int(audio.sampling_rate * audio.split_overlap)
    out, start = [], 0
    while start < samples:
        if start > overlap:
            start -= overlap
        end = min(start + max_n, samples)
        if end - start >= audio.n_fft:
            out.append((start, end))
        start = end
    return out


def plan_splits(samples: int, audio: AudioConfig) -> list[tuple[int, int, SplitLengths]]:
    """Splits of a 16 kHz mono signal that give at least one token: (start, end, lengths)."""
    out = []
    for s, e in split_bounds(samples, audio):
        n = split_lengths(e - s, audio)
        if n.samples >= audio.n_fft and n.bridge_length > 0:
            out.append((s, e, n))
    return out


# ------------------------------------------------------------------ waveform
def to_mono_16k(waveform: torch.Tensor, sample_rate: int, audio: AudioConfig) -> torch.Tensor:
    """(C, N) float at sample_rate -> (N16,) float32 at audio.sampling_rate.

    Each channel is resampled first, then the channels are averaged (the reference order)."""
    x = waveform.float()
    if sample_rate != audio.sampling_rate:
        x = torchaudio.functional.resample(x, sample_rate, audio.sampling_rate, lowpass_filter_width=128)
    if x.shape[0] > 1:
        x = x.mean(dim=0, keepdim=True)
    return x[0]


# ------------------------------------------------------------------ log-mel
_DTYPE_LOCK = threading.Lock()


@lru_cache(maxsize=8)
def slaney_filterbank(n_fft: int, num_mel_bins: int, sampling_rate: int) -> torch.Tensor:
    """(num_mel_bins, n_fft//2 + 1) float32 Slaney-scale, Slaney-normalised triangles, 0..sr/2.

    torchaudio builds the bank in the default dtype; built in float64 and cast, it equals the
    reference's bank (transformers `mel_filter_bank`, float64, cast to float32) bit for bit,
    where a float32 build is off by up to ~2e-7."""
    with _DTYPE_LOCK:
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            fb = torchaudio.functional.melscale_fbanks(
                n_fft // 2 + 1, 0.0, sampling_rate / 2.0, num_mel_bins, sampling_rate,
                norm="slaney", mel_scale="slaney")
        finally:
            torch.set_default_dtype(old)
    return fb.t().contiguous().float()


class LogMel(nn.Module):
    """List of 16 kHz splits -> right-padded log-mel features, all splits in one batch."""

    def __init__(self, audio: AudioConfig):
        super().__init__()
        self.audio = audio
        self.register_buffer("window", torch.hann_window(audio.n_fft), persistent=False)
        self.register_buffer("filters", slaney_filterbank(audio.n_fft, audio.num_mel_bins, audio.sampling_rate),
                             persistent=False)      # (mel, n_fft//2+1)

    @torch.no_grad()
    def forward(self, splits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """splits: 1-D float tensors of n_fft..max_split_samples samples.

        Returns features (B, mel, T) float32, zero beyond each split's frames, with
        T = the longest split's frames, and mel_lengths (B,) int64."""
        a = self.audio
        max_n = max_split_samples(a)
        lengths = []
        padded = torch.zeros(len(splits), max_n, dtype=torch.float32, device=self.window.device)
        for i, c in enumerate(splits):
            n = c.shape[-1]
            if not a.n_fft <= n <= max_n:
                raise ValueError(f"log-mel split {i} has {n} samples; a split needs {a.n_fft}..{max_n}")
            padded[i, :n] = c                                    # zero-pad to 30 s before the STFT
            lengths.append(mel_frames(n, a))
        spec = torch.stft(padded, a.n_fft, a.hop_length, window=self.window,
                          center=True, pad_mode="reflect", return_complex=True)   # (B, F, frames+1)
        power = spec[..., :-1].abs() ** 2                       # (B, F, 3000), the reference's |X|^2
        mel = self.filters @ power                              # (B, mel, 3000)
        log_spec = mel.clamp(min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)          # over the padded 30 s split
        log_spec = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
        T = max(lengths)
        mel_lengths = torch.tensor(lengths, dtype=torch.int64, device=padded.device)
        valid = length_mask(mel_lengths, T)                                        # (B, T)
        features = torch.where(valid[:, None, :], log_spec[..., :T], 0.0)
        return features, mel_lengths
