"""audio_io: decoding (WAV/FLAC, int/float, mono/stereo) and every rejection reason."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from services.tokenizer.audio_io import (DEFAULT_MAX_SECONDS, REASONS, AudioInputError, check_waveform,
                                         min_samples, pcm16_to_waveform, read_audio)

sf = pytest.importorskip("soundfile")


def encode(x: np.ndarray, sr: int, fmt="WAV", subtype="PCM_16") -> bytes:
    b = io.BytesIO()
    sf.write(b, x, sr, format=fmt, subtype=subtype)
    return b.getvalue()


def reason_of(fn, *args, **kw) -> str:
    with pytest.raises(AudioInputError) as e:
        fn(*args, **kw)
    assert str(e.value), "the message must say what is wrong"
    assert e.value.reason in REASONS
    return e.value.reason


@pytest.fixture(scope="module")
def speech(fixtures):
    return fixtures.load("01_frontend", "frontend.safetensors")


@pytest.fixture(scope="module")
def audio(fixtures):
    return fixtures.model_config.audio


# ---------------------------------------------------------------- decoding
def test_pcm16_wav_is_int16_over_32768(speech):
    pcm = speech["stereo.wave_in_int16"]                          # (2, N) int16 at 48 kHz
    wave, sr = read_audio(encode(pcm.T.numpy(), 48000))
    assert sr == 48000 and wave.dtype == torch.float32 and wave.shape == pcm.shape
    assert torch.equal(wave, pcm.float() / 32768.0)


def test_flac_and_float_and_24bit(speech):
    pcm = speech["tone.wave_in_int16"][0].numpy()
    exact = torch.from_numpy(pcm.astype(np.float32) / 32768.0)[None]
    assert torch.equal(read_audio(encode(pcm, 16000, "FLAC", "PCM_16"))[0], exact)
    assert torch.equal(read_audio(encode(pcm, 16000, "FLAC", "PCM_24"))[0], exact)
    assert torch.equal(read_audio(encode(pcm, 16000, "WAV", "PCM_24"))[0], exact)
    assert torch.equal(read_audio(encode(pcm, 16000, "WAV", "PCM_32"))[0], exact)
    f = (pcm.astype(np.float32) / 32768.0)
    assert torch.equal(read_audio(encode(f, 16000, "WAV", "FLOAT"))[0], exact)


def test_pcm16_bytes(speech):
    pcm = speech["stereo.wave_in_int16"]
    raw = pcm.T.contiguous().numpy().astype("<i2").tobytes()     # interleaved frames
    wave = pcm16_to_waveform(raw, 48000, channels=2)
    assert torch.equal(wave, pcm.float() / 32768.0)


# ---------------------------------------------------------------- rejections
def test_empty():
    assert reason_of(read_audio, b"") == "empty"
    assert reason_of(pcm16_to_waveform, b"", 16000) == "empty"
    assert reason_of(read_audio, encode(np.zeros((0, 1), np.int16), 16000)) == "empty"


def test_corrupt_and_truncated():
    good = encode((np.random.default_rng(0).standard_normal(16000) * 3000).astype(np.int16), 16000)
    assert reason_of(read_audio, good[:20]) == "corrupt"           # header cut inside 'fmt '
    assert reason_of(read_audio, good[:44]) == "corrupt"           # header only, samples missing
    assert reason_of(read_audio, good[:-1000]) == "corrupt"        # data cut short
    assert reason_of(read_audio, b"RIFF") == "corrupt"
    assert reason_of(read_audio, np.random.default_rng(1).bytes(2000)) == "corrupt"
    assert reason_of(pcm16_to_waveform, b"\x00\x01\x02", 16000) == "corrupt"   # half a sample
    assert reason_of(pcm16_to_waveform, b"\x00" * 6, 16000, channels=2) == "corrupt"
    assert reason_of(check_waveform, torch.zeros(16000, dtype=torch.int16)[None], 16000) == "corrupt"
    assert reason_of(check_waveform, torch.zeros(16000), 16000) == "corrupt"   # not (C, N)


def test_non_finite():
    x = np.zeros(16000, np.float32)
    x[100] = np.nan
    assert reason_of(read_audio, encode(x, 16000, "WAV", "FLOAT")) == "non_finite"
    x[100] = np.inf
    assert reason_of(read_audio, encode(x, 16000, "WAV", "FLOAT")) == "non_finite"
    w = torch.zeros(2, 16000)
    w[1, -1] = float("-inf")
    assert reason_of(check_waveform, w, 16000) == "non_finite"


def test_channels():
    assert reason_of(read_audio, encode(np.zeros((16000, 3), np.int16), 16000)) == "channels"
    assert reason_of(pcm16_to_waveform, b"\x00" * 12, 16000, channels=3) == "channels"
    assert reason_of(pcm16_to_waveform, b"\x00" * 12, 16000, channels=0) == "channels"
    assert reason_of(check_waveform, torch.zeros(4, 16000), 16000) == "channels"


def test_sample_rate():
    x = np.zeros(16000, np.int16)
    assert reason_of(read_audio, encode(x, 100)) == "sample_rate"
    assert reason_of(read_audio, encode(x, 1_000_000)) == "sample_rate"
    assert reason_of(pcm16_to_waveform, b"\x00" * 100, 0) == "sample_rate"
    assert reason_of(check_waveform, torch.zeros(1, 16000), 16000.5) == "sample_rate"


def test_too_long():
    assert DEFAULT_MAX_SECONDS == 600
    x = np.zeros(int(4000 * 601), np.int16)                       # 601 s at 4 kHz
    assert reason_of(read_audio, encode(x, 4000)) == "too_long"
    assert reason_of(read_audio, encode(np.zeros(24000, np.int16), 16000), max_seconds=1.0) == "too_long"
    assert reason_of(check_waveform, torch.zeros(1, 16001), 16000, max_seconds=1.0) == "too_long"
    read_audio(encode(np.zeros(16000, np.int16), 16000), max_seconds=1.0)     # exactly 1 s is fine


def test_too_short_is_one_token(fixtures, audio):
    """The boundary is the length table's: 959 samples at 16 kHz give 0 tokens, 960 give 1."""
    table = {r["num_samples_16k"]: r for r in fixtures.json("01_frontend", "frontend.json")["length_table"]
             if "bridge_length" in r}
    assert table[959]["bridge_length"] == 0 and table[960]["bridge_length"] == 1
    assert min_samples(16000, audio) == 960
    # 48 kHz: torchaudio gives ceil(n / 3) samples, so 2878 -> 960 and 2877 -> 959
    assert min_samples(48000, audio) == 2878
    assert reason_of(read_audio, encode(np.zeros(959, np.int16), 16000), audio) == "too_short"
    assert reason_of(read_audio, encode(np.zeros(2877, np.int16), 48000), audio) == "too_short"
    read_audio(encode(np.zeros(960, np.int16), 16000), audio)
    read_audio(encode(np.zeros(2878, np.int16), 48000), audio)
    assert reason_of(pcm16_to_waveform, b"\x00" * 2 * 959, 16000, audio=audio) == "too_short"
    assert reason_of(check_waveform, torch.zeros(1, 959), 16000, audio) == "too_short"


def test_error_is_value_error():
    assert issubclass(AudioInputError, ValueError)
    with pytest.raises(ValueError):
        AudioInputError("nonsense", "x")
