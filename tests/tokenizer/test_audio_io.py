"""audio_io: decoding (WAV/FLAC, int/float, mono/stereo) and every rejection reason."""
from __future__ import annotations

import dataclasses
import io
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch

from services.tokenizer.audio_io import (DEFAULT_LIMITS, DEFAULT_MAX_SECONDS, REASONS, AudioInputError,
                                         check_waveform, min_samples, pcm16_to_waveform, read_audio)
from services.tokenizer.log_mel import to_mono_16k
from tests.tokenizer.flac import silent_flac


RATE = 16000   # a valid file sample rate for the decoding and rejection tests (no model involved)


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
    fixtures.require("01_frontend")
    return fixtures.load("01_frontend", "frontend.safetensors")


@pytest.fixture(scope="module")
def rates(fixtures):
    """Source sample rate of each 01_frontend case."""
    return {c: m["source_sample_rate"] for c, m in fixtures.json("01_frontend", "frontend.json")["cases"].items()}


@pytest.fixture(scope="module")
def audio(fixtures):
    return fixtures.model_config.audio


# ---------------------------------------------------------------- decoding
def test_pcm16_wav_is_int16_over_32768(speech, rates):
    pcm = speech["stereo.wave_in_int16"]                          # (2, N) int16 at its source rate
    wave, sr = read_audio(encode(pcm.T.numpy(), rates["stereo"]))
    assert sr == rates["stereo"] and wave.dtype == torch.float32 and wave.shape == pcm.shape
    assert torch.equal(wave, pcm.float() / 32768.0)


def test_flac_and_float_and_24bit(speech, rates):
    # int16 samples widened or stored as float32 x/32768 decode to exactly x/32768 (no arithmetic rounding)
    pcm = speech["tone.wave_in_int16"][0].numpy()
    sr = rates["tone"]
    exact = torch.from_numpy(pcm.astype(np.float32) / 32768.0)[None]
    assert torch.equal(read_audio(encode(pcm, sr, "FLAC", "PCM_16"))[0], exact)
    assert torch.equal(read_audio(encode(pcm, sr, "FLAC", "PCM_24"))[0], exact)
    assert torch.equal(read_audio(encode(pcm, sr, "WAV", "PCM_24"))[0], exact)
    assert torch.equal(read_audio(encode(pcm, sr, "WAV", "PCM_32"))[0], exact)
    f = (pcm.astype(np.float32) / 32768.0)
    assert torch.equal(read_audio(encode(f, sr, "WAV", "FLOAT"))[0], exact)


def test_pcm16_bytes(speech, rates):
    pcm = speech["stereo.wave_in_int16"]
    raw = pcm.T.contiguous().numpy().astype("<i2").tobytes()     # interleaved frames
    wave = pcm16_to_waveform(raw, rates["stereo"], channels=pcm.shape[0])
    assert torch.equal(wave, pcm.float() / 32768.0)


# ---------------------------------------------------------------- rejections
def test_empty():
    assert reason_of(read_audio, b"") == "empty"
    assert reason_of(pcm16_to_waveform, b"", RATE) == "empty"
    assert reason_of(read_audio, encode(np.zeros((0, 1), np.int16), RATE)) == "empty"


def test_corrupt_and_truncated():
    good = encode((np.random.default_rng(0).standard_normal(RATE) * 3000).astype(np.int16), RATE)
    assert reason_of(read_audio, good[:20]) == "corrupt"           # header cut inside 'fmt '
    assert reason_of(read_audio, good[:44]) == "corrupt"           # header only, samples missing
    assert reason_of(read_audio, good[:-1000]) == "corrupt"        # data cut short
    assert reason_of(read_audio, b"RIFF") == "corrupt"
    assert reason_of(read_audio, np.random.default_rng(1).bytes(2000)) == "corrupt"
    assert reason_of(pcm16_to_waveform, b"\x00\x01\x02", RATE) == "corrupt"   # half a sample
    assert reason_of(pcm16_to_waveform, b"\x00" * 6, RATE, channels=2) == "corrupt"
    assert reason_of(check_waveform, torch.zeros(RATE, dtype=torch.int16)[None], RATE) == "corrupt"
    assert reason_of(check_waveform, torch.zeros(RATE), RATE) == "corrupt"   # not (C, N)


def test_non_finite():
    x = np.zeros(RATE, np.float32)
    x[100] = np.nan
    assert reason_of(read_audio, encode(x, RATE, "WAV", "FLOAT")) == "non_finite"
    x[100] = np.inf
    assert reason_of(read_audio, encode(x, RATE, "WAV", "FLOAT")) == "non_finite"
    w = torch.zeros(2, RATE)
    w[1, -1] = float("-inf")
    assert reason_of(check_waveform, w, RATE) == "non_finite"


def test_channels():
    assert reason_of(read_audio, encode(np.zeros((RATE, 3), np.int16), RATE)) == "channels"
    assert reason_of(pcm16_to_waveform, b"\x00" * 12, RATE, channels=3) == "channels"
    assert reason_of(pcm16_to_waveform, b"\x00" * 12, RATE, channels=0) == "channels"
    assert reason_of(check_waveform, torch.zeros(4, RATE), RATE) == "channels"


def test_sample_rate():
    x = np.zeros(RATE, np.int16)
    assert reason_of(read_audio, encode(x, 100)) == "sample_rate"
    assert reason_of(read_audio, encode(x, 1_000_000)) == "sample_rate"
    assert reason_of(pcm16_to_waveform, b"\x00" * 100, 0) == "sample_rate"
    assert reason_of(check_waveform, torch.zeros(1, RATE), RATE + 0.5) == "sample_rate"


def test_too_long():
    assert DEFAULT_MAX_SECONDS == 600                               # the documented default
    x = np.zeros(int(4000 * (DEFAULT_MAX_SECONDS + 1)), np.int16)  # one second over, at 4 kHz
    assert reason_of(read_audio, encode(x, 4000)) == "too_long"
    one_second = dataclasses.replace(DEFAULT_LIMITS, max_seconds=1.0)
    assert reason_of(read_audio, encode(np.zeros(RATE * 3 // 2, np.int16), RATE), limits=one_second) == "too_long"
    assert reason_of(check_waveform, torch.zeros(1, RATE + 1), RATE, limits=one_second) == "too_long"
    read_audio(encode(np.zeros(RATE, np.int16), RATE), limits=one_second)     # exactly 1 s is fine


def test_sample_rate_range_is_the_configured_one():
    limits = dataclasses.replace(DEFAULT_LIMITS, min_sample_rate=8000, max_sample_rate=48000)
    x = np.zeros(RATE, np.int16)
    read_audio(encode(x, 8000), limits=limits)
    read_audio(encode(x, 48000), limits=limits)
    with pytest.raises(AudioInputError, match="from 8000 to 48000 Hz.*limits.max_audio_sample_rate") as e:
        read_audio(encode(x, 48001), limits=limits)
    assert e.value.reason == "sample_rate"
    assert reason_of(read_audio, encode(x, 7999), limits=limits) == "sample_rate"
    assert reason_of(pcm16_to_waveform, b"\x00" * 100, 96000, limits=limits) == "sample_rate"


def decode_peak_bytes(data: bytes) -> tuple[str, int]:
    """(rejection reason or "", peak bytes Python and numpy allocated) of read_audio(data)."""
    tracemalloc.start()
    try:
        read_audio(data)
        reason = ""
    except AudioInputError as e:
        reason = e.reason
        assert "limits." in str(e), f"the message must name the limit: {e}"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return reason, peak


def test_decoded_size_is_bounded_from_the_header():
    """A few hundred KB of FLAC silence that declares 600 s at 384 kHz stereo (460 million
    samples, 1.8 GB as float32) or at 96 kHz stereo (115 million, within the 600 s limit) is
    refused from its header, before a sample is decoded."""
    huge = silent_flac(600, 384_000, 2)
    assert len(huge) < 1_000_000
    info = sf.info(io.BytesIO(huge))
    assert (info.frames, info.samplerate, info.channels) == (230_400_000, 384_000, 2)
    reason, peak = decode_peak_bytes(huge)
    assert reason == "sample_rate" and peak < 20e6, (reason, peak)

    within_rate = silent_flac(600, 96_000, 2)
    assert sf.info(io.BytesIO(within_rate)).frames * 2 > DEFAULT_LIMITS.max_samples
    reason, peak = decode_peak_bytes(within_rate)
    assert reason == "too_large" and peak < 20e6, (reason, peak)
    # the same kind of file within the cap decodes
    ok = silent_flac(10, 48_000, 2)
    wave, sr = read_audio(ok)
    assert sr == 48_000 and wave.shape == (2, 10 * 48_000 // 4096 * 4096) and not wave.any()


def test_decoded_size_limit_is_exact():
    limits = dataclasses.replace(DEFAULT_LIMITS, max_samples=2 * RATE)
    stereo = encode(np.zeros((RATE, 2), np.int16), RATE)
    assert read_audio(stereo, limits=limits)[0].shape == (2, RATE)           # exactly at the cap
    with pytest.raises(AudioInputError, match=r"32,002 samples .*limit is 32,000 samples \(limits.max_audio_samples\)"):
        read_audio(encode(np.zeros((RATE + 1, 2), np.int16), RATE), limits=limits)
    assert reason_of(pcm16_to_waveform, b"\x00" * 4 * (RATE + 1), RATE, channels=2, limits=limits) == "too_large"
    assert reason_of(check_waveform, torch.zeros(2, RATE + 1), RATE, limits=limits) == "too_large"


def test_too_short_is_one_token(fixtures, audio):
    """The boundary is the length table's: the fewest samples at the model rate that give one
    token (the public table: 959 samples give 0 tokens, 960 give 1)."""
    sr = audio.sampling_rate
    m = min_samples(sr, audio)
    rows = [r for r in fixtures.json("01_frontend", "frontend.json")["length_table"] if "bridge_length" in r]
    for r in rows:
        assert r["kept"] == (r["bridge_length"] > 0) == (r["num_samples_16k"] >= m), (m, r)
    # the table brackets the boundary (exactly, where it lists both sides of it)
    below = max(r["num_samples_16k"] for r in rows if not r["kept"])
    above = min(r["num_samples_16k"] for r in rows if r["kept"])
    assert below < m <= above
    # Another source rate (a test choice): the boundary follows torchaudio's resampled length.
    hi_sr = 3 * sr
    m_hi = min_samples(hi_sr, audio)
    assert to_mono_16k(torch.zeros(1, m_hi - 1), hi_sr, audio).shape[0] < m <= \
        to_mono_16k(torch.zeros(1, m_hi), hi_sr, audio).shape[0]
    assert reason_of(read_audio, encode(np.zeros(m - 1, np.int16), sr), audio) == "too_short"
    assert reason_of(read_audio, encode(np.zeros(m_hi - 1, np.int16), hi_sr), audio) == "too_short"
    read_audio(encode(np.zeros(m, np.int16), sr), audio)
    read_audio(encode(np.zeros(m_hi, np.int16), hi_sr), audio)
    assert reason_of(pcm16_to_waveform, b"\x00" * 2 * (m - 1), sr, audio=audio) == "too_short"
    assert reason_of(check_waveform, torch.zeros(1, m - 1), sr, audio) == "too_short"


def test_error_is_value_error():
    assert issubclass(AudioInputError, ValueError)
    with pytest.raises(ValueError):
        AudioInputError("nonsense", "x")
