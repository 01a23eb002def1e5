"""What one request's audio may be: the defaults of the operator's `limits.*` audio keys.

A plain dataclass so that the tokenizer's runner and the benchmarks (which run where only torch
is installed) get the defaults without importing the settings machinery; `LimitsSettings` takes
its defaults from here, so they are written once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float = 600.0          # longest user audio accepted per turn
    # checked from a file's header before decoding: decoded samples (frames x channels; 4 bytes
    # each as float32; default 600 s of 48 kHz mono = 115 MB) and the sample-rate range
    max_samples: int = 28_800_000
    min_sample_rate: int = 4_000
    max_sample_rate: int = 192_000

    @classmethod
    def from_settings(cls, limits: Any) -> "AudioLimits":
        """From a `LimitsSettings` (taken by its fields, so this module imports no settings)."""
        return cls(limits.max_audio_seconds, limits.max_audio_samples,
                   limits.min_audio_sample_rate, limits.max_audio_sample_rate)


DEFAULT_AUDIO_LIMITS = AudioLimits()
