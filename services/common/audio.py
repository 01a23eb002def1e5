"""PCM conversions and WAV writing shared by the stages, the orchestrator and the CLI."""
from __future__ import annotations

import io
import wave

import numpy as np


def to_pcm16(samples, limit: float = 0.99) -> bytes:
    """Float samples -> little-endian int16 bytes, as the reference demo: int16(clamp(w, ±0.99)·32768)."""
    x = np.clip(np.asarray(samples, dtype=np.float32), -limit, limit)
    return (x * 32768.0).astype("<i2").tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
    """Little-endian int16 bytes -> float32 samples in [-1, 1)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def wav_bytes(pcm16: bytes, sample_rate: int, channels: int = 1) -> bytes:
    """A mono/stereo PCM-16 WAV file in memory (stdlib only: works where soundfile is absent)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm16)
    return buf.getvalue()
