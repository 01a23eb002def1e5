"""Decoding and validating caller audio before the front end (reference-model.md §3.1).

Samples are floats in [-1, 1] as torchaudio `load(normalize=True)` gives them: int PCM is
divided by its full scale (int16 / 32768, int32 / 2^31). soundfile is imported inside the
functions, so model code and benchmarks import this module on machines without it.

Every rejection is an `AudioInputError` whose `reason` is one of REASONS, so a service can map
it to a status code without parsing the message. What is accepted (`AudioLimits`: duration,
decoded size, sample-rate range) is the operator's `limits.*`, and a file's header is checked
against it before any sample is decoded: a few hundred KB of FLAC silence can declare 600 s at
384 kHz stereo, gigabytes once decoded.
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import torch

from services.common.model_config import AudioConfig
from services.common.audio_limits import AudioLimits
from services.tokenizer.log_mel import split_lengths, resampled_length

REASONS = ("empty", "corrupt", "too_short", "non_finite", "channels", "too_long", "too_large", "sample_rate")

# The front end downmixes at most stereo (the reference asserts <= 2 channels).
MAX_CHANNELS = 2


DEFAULT_LIMITS = AudioLimits()
DEFAULT_MAX_SECONDS = DEFAULT_LIMITS.max_seconds


class AudioInputError(ValueError):
    """Audio the tokenizer cannot use; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown AudioInputError reason {reason!r}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        # picklable with both arguments: errors cross process boundaries (Ray handles)
        return (type(self), (self.reason, str(self)))


def _check_sample_rate(sample_rate, limits: AudioLimits) -> int:
    lo, hi = limits.min_sample_rate, limits.max_sample_rate
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
            or not lo <= sample_rate <= hi:
        raise AudioInputError("sample_rate", f"sample rate {sample_rate!r} Hz is not supported; send an "
                              f"integer rate from {lo} to {hi} Hz (limits.min_audio_sample_rate, "
                              "limits.max_audio_sample_rate)")
    return int(sample_rate)


def _check_channels(channels: int) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioInputError("channels", f"audio has {channels} channels; send mono or stereo "
                              f"(at most {MAX_CHANNELS} channels)")


def _check_size(frames: int, channels: int, sample_rate: int, limits: AudioLimits) -> None:
    """Duration and decoded size of `frames` x `channels` samples (from a header: before decoding)."""
    if frames == 0:
        raise AudioInputError("empty", "audio contains no samples")
    if frames > limits.max_seconds * sample_rate:
        raise AudioInputError("too_long", f"audio lasts {frames / sample_rate:.1f} s; the limit is "
                              f"{limits.max_seconds:g} s (longer audio must be split by the caller)")
    if frames * channels > limits.max_samples:
        raise AudioInputError("too_large", f"audio decodes to {frames * channels:,} samples "
                              f"({frames / sample_rate:.1f} s at {sample_rate} Hz, {channels} "
                              f"channel{'s' if channels > 1 else ''}); the limit is "
                              f"{limits.max_samples:,} samples (limits.max_audio_samples): send mono audio, a lower "
                              "sample rate or a shorter clip")


@lru_cache(maxsize=64)
def min_samples(sample_rate: int, audio: AudioConfig) -> int:
    """Fewest samples at sample_rate that give one token after resampling to audio.sampling_rate."""
    def enough(n: int) -> bool:
        n16 = resampled_length(n, sample_rate, audio.sampling_rate)
        return n16 >= audio.n_fft and split_lengths(n16, audio).bridge_length > 0

    hi = 1
    while not enough(hi):
        hi *= 2
    lo = hi // 2 + 1
    while lo < hi:                                   # smallest n that is enough
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def check_waveform(waveform: torch.Tensor, sample_rate: int, audio: AudioConfig | None = None,
                   limits: AudioLimits = DEFAULT_LIMITS) -> None:
    """Validate a decoded (C, N) float waveform; raises AudioInputError.

    With `audio` given, audio too short for one token (about 60 ms) is rejected too."""
    sample_rate = _check_sample_rate(sample_rate, limits)
    if not isinstance(waveform, torch.Tensor) or waveform.dim() != 2 or not waveform.is_floating_point():
        desc = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
        raise AudioInputError("corrupt", f"waveform must be a float tensor (channels, samples), got {desc}")
    _check_channels(waveform.shape[0])
    _check_size(waveform.shape[1], waveform.shape[0], sample_rate, limits)
    if not bool(torch.isfinite(waveform).all()):
        raise AudioInputError("non_finite", "audio contains NaN or infinite samples")
    n = min_samples(sample_rate, audio) if audio is not None else 0
    if waveform.shape[1] < n:
        raise AudioInputError("too_short", f"audio is too short: {1000 * waveform.shape[1] / sample_rate:.1f} ms; "
                              f"at least {1000 * n / sample_rate:.1f} ms ({n} samples at {sample_rate} Hz) "
                              f"are needed for one audio token")


def _check_wav_complete(data: bytes) -> None:
    """A RIFF/WAVE file cut short: libsndfile would silently return the samples that are there.

    Sizes 0 and 0xFFFFFFFF in the data chunk mean "unknown" (streamed writers) and pass."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if cid == b"data":
            have = len(data) - pos - 8
            if size not in (0, 0xFFFFFFFF) and have < size:
                raise AudioInputError("corrupt", f"WAV file is truncated: its header declares {size} bytes "
                                      f"of samples, {have} are present; send the complete file")
            return
        pos += 8 + size + (size & 1)          # chunks are word-aligned


def read_audio(data: bytes, audio: AudioConfig | None = None,
               limits: AudioLimits = DEFAULT_LIMITS) -> tuple[torch.Tensor, int]:
    """Decode WAV/FLAC (or anything libsndfile reads) -> (waveform (C, N) float32, sample_rate).

    The header's rate, channels and length are checked against `limits` before decoding, and
    no more frames than it declares are read."""
    import soundfile as sf

    if not data:
        raise AudioInputError("empty", "audio is empty (0 bytes)")
    _check_wav_complete(data)
    try:
        with sf.SoundFile(io.BytesIO(bytes(data))) as f:
            sample_rate, channels, frames, subtype = f.samplerate, f.channels, f.frames, f.subtype
            _check_sample_rate(sample_rate, limits)
            _check_channels(channels)
            _check_size(frames, channels, sample_rate, limits)     # before decoding a huge file
            # int PCM read as integers and scaled here: exact int/full-scale like torchaudio
            if subtype == "PCM_16":
                x = f.read(dtype="int16", always_2d=True).astype(np.float32)
                x /= 32768.0                                       # in place: one float copy
            elif subtype in ("PCM_24", "PCM_32"):
                x = f.read(dtype="int32", always_2d=True).astype(np.float64) / 2147483648.0
            else:
                x = f.read(dtype="float32", always_2d=True)
    except AudioInputError:
        raise
    except (sf.LibsndfileError, RuntimeError, EOFError, ValueError, TypeError) as e:
        why = getattr(e, "error_string", None) or str(e)
        raise AudioInputError("corrupt", f"audio could not be decoded as WAV/FLAC ({why}); "
                              "send a complete WAV or FLAC file") from None
    if x.shape[0] == 0:
        raise AudioInputError("empty", "audio contains no samples (the header is complete, the data is not)")
    waveform = torch.from_numpy(np.ascontiguousarray(x.T, dtype=np.float32))  # (C, N)
    check_waveform(waveform, sample_rate, audio, limits)
    return waveform, sample_rate


def pcm16_to_waveform(data: bytes, sample_rate: int, channels: int = 1, audio: AudioConfig | None = None,
                      limits: AudioLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Raw little-endian int16 PCM, channels interleaved -> (C, N) float32 = int16 / 32768."""
    sample_rate = _check_sample_rate(sample_rate, limits)
    if not data:
        raise AudioInputError("empty", "audio is empty (0 bytes)")
    _check_channels(channels)
    frame_bytes = 2 * channels
    if len(data) % frame_bytes:
        raise AudioInputError("corrupt", f"PCM-16 data of {len(data)} bytes is not a whole number of "
                              f"{channels}-channel frames ({frame_bytes} bytes each)")
    _check_size(len(data) // frame_bytes, channels, sample_rate, limits)
    x = np.frombuffer(bytes(data), dtype="<i2").reshape(-1, channels)
    waveform = torch.from_numpy(x.T.astype(np.float32))                      # (C, N)
    waveform /= 32768.0
    check_waveform(waveform, sample_rate, audio, limits)
    return waveform
