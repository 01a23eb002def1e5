"""Decoding and validating caller audio before the front end (reference-model.md §3.1).

Samples are floats in [-1, 1] as torchaudio `load(normalize=True)` gives them: int PCM is
divided by its full scale (int16 / 32768, int32 / 2^31). soundfile is imported inside the
functions, so model code and benchmarks import this module on machines without it.

Every rejection is an `AudioInputError` whose `reason` is one of REASONS, so a service can map
it to a status code without parsing the message.
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import torch

from services.common.model_config import AudioConfig
from services.tokenizer.log_mel import split_lengths, resampled_length

REASONS = ("empty", "corrupt", "too_short", "non_finite", "channels", "too_long", "sample_rate")

# The front end downmixes at most stereo (the reference asserts <= 2 channels).
MAX_CHANNELS = 2
# Sample rates outside this range are not audio a caller meant to send (8 kHz telephony up to
# 384 kHz studio rates, with margin); resampling from them would be meaningless or huge.
MIN_SAMPLE_RATE = 4_000
MAX_SAMPLE_RATE = 384_000
DEFAULT_MAX_SECONDS = 600.0


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


def _check_sample_rate(sample_rate) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
            or not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioInputError("sample_rate", f"sample rate {sample_rate!r} Hz is not supported; "
                              f"send an integer rate from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz")
    return int(sample_rate)


def _check_channels(channels: int) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioInputError("channels", f"audio has {channels} channels; send mono or stereo "
                              f"(at most {MAX_CHANNELS} channels)")


def _check_duration(frames: int, sample_rate: int, max_seconds: float) -> None:
    if frames == 0:
        raise AudioInputError("empty", "audio contains no samples")
    if frames > max_seconds * sample_rate:
        raise AudioInputError("too_long", f"audio lasts {frames / sample_rate:.1f} s; the limit is "
                              f"{max_seconds:g} s (longer audio must be split by the caller)")


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
                   max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
    """Validate a decoded (C, N) float waveform; raises AudioInputError.

    With `audio` given, audio too short for one token (about 60 ms) is rejected too."""
    sample_rate = _check_sample_rate(sample_rate)
    if not isinstance(waveform, torch.Tensor) or waveform.dim() != 2 or not waveform.is_floating_point():
        desc = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
        raise AudioInputError("corrupt", f"waveform must be a float tensor (channels, samples), got {desc}")
    _check_channels(waveform.shape[0])
    _check_duration(waveform.shape[1], sample_rate, max_seconds)
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
               max_seconds: float = DEFAULT_MAX_SECONDS) -> tuple[torch.Tensor, int]:
    """Decode WAV/FLAC (or anything libsndfile reads) -> (waveform (C, N) float32, sample_rate)."""
    import soundfile as sf

    if not data:
        raise AudioInputError("empty", "audio is empty (0 bytes)")
    _check_wav_complete(data)
    try:
        with sf.SoundFile(io.BytesIO(bytes(data))) as f:
            sample_rate, channels, frames, subtype = f.samplerate, f.channels, f.frames, f.subtype
            _check_sample_rate(sample_rate)
            _check_channels(channels)
            _check_duration(frames, sample_rate, max_seconds)     # before decoding a huge file
            # int PCM read as integers and scaled here: exact int/full-scale like torchaudio
            if subtype == "PCM_16":
                x = f.read(dtype="int16", always_2d=True).astype(np.float32) / 32768.0
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
    check_waveform(waveform, sample_rate, audio, max_seconds)
    return waveform, sample_rate


def pcm16_to_waveform(data: bytes, sample_rate: int, channels: int = 1, audio: AudioConfig | None = None,
                      max_seconds: float = DEFAULT_MAX_SECONDS) -> torch.Tensor:
    """Raw little-endian int16 PCM, channels interleaved -> (C, N) float32 = int16 / 32768."""
    sample_rate = _check_sample_rate(sample_rate)
    if not data:
        raise AudioInputError("empty", "audio is empty (0 bytes)")
    _check_channels(channels)
    frame_bytes = 2 * channels
    if len(data) % frame_bytes:
        raise AudioInputError("corrupt", f"PCM-16 data of {len(data)} bytes is not a whole number of "
                              f"{channels}-channel frames ({frame_bytes} bytes each)")
    x = np.frombuffer(bytes(data), dtype="<i2").reshape(-1, channels)
    waveform = torch.from_numpy(x.T.astype(np.float32) / 32768.0)            # (C, N)
    check_waveform(waveform, sample_rate, audio, max_seconds)
    return waveform
