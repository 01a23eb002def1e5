"""The Tokenizer gRPC service through Serve's real gRPC proxy, on the tiny checkpoint."""
from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import soundfile as sf

from baichuan_audio.v1 import conversation_pb2, stages_pb2, stages_pb2_grpc

META = (("application", "tokenizer"),)


def wav_bytes(seconds: float, rate: int = 16000, channels: int = 1, fmt: str = "WAV",
              subtype: str = "PCM_16", freq: float = 220.0) -> bytes:
    n = int(seconds * rate)
    t = np.arange(n) / rate
    x = 0.3 * np.sin(2 * math.pi * freq * t)
    x = np.stack([x] * channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def stub(serve_stack):
    serve_stack.deploy("tokenizer")
    channel = grpc.insecure_channel(serve_stack.address)
    yield stages_pb2_grpc.TokenizerStub(channel)
    channel.close()


def tokenize(stub, data: bytes):
    req = stages_pb2.TokenizeRequest(audio=conversation_pb2.AudioInput(file=data))
    return stub.Tokenize(req, metadata=META, timeout=60)


def test_tokenize_lengths_follow_the_reference_arithmetic(stub):
    # 1.0 s at 16 kHz -> 101 mel frames -> 51 encoder frames -> 12 tokens (reference §3.4)
    r = tokenize(stub, wav_bytes(1.0))
    assert (r.codes.frames, r.codes.codebooks) == (12, 8)
    assert len(r.codes.values) == 12 * 8
    assert r.audio_seconds == pytest.approx(1.0)
    # other rates, stereo and FLAC are accepted and resampled
    r2 = tokenize(stub, wav_bytes(1.0, rate=48000, channels=2, fmt="FLAC"))
    assert r2.codes.frames == 12


def test_concurrent_requests_are_batched_and_independent(stub):
    clips = [wav_bytes(s, freq=f) for s, f in [(0.5, 200), (1.3, 300), (2.0, 400), (0.7, 500)]]
    alone = [list(tokenize(stub, c).codes.values) for c in clips]
    with ThreadPoolExecutor(len(clips)) as pool:
        together = list(pool.map(lambda c: list(tokenize(stub, c).codes.values), clips))
    assert together == alone


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (wav_bytes(1.0)[:30], "decoded"),            # truncated header
    (b"RIFF\x00\x00\x00\x00garbage-not-audio" * 4, "decoded"),
    (wav_bytes(0.04), "too short"),              # 40 ms < one 80 ms token
    (wav_bytes(0.5, channels=3), "channels"),
])
def test_bad_audio_is_invalid_argument(stub, data, words):
    with pytest.raises(grpc.RpcError) as e:
        tokenize(stub, data)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in e.value.details().lower()
    # the service stays up for everyone else
    assert tokenize(stub, wav_bytes(0.5)).codes.frames > 0


def test_non_finite_samples_are_rejected(stub):
    x = np.zeros((8000, 1), dtype=np.float32)
    x[100] = np.nan
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(grpc.RpcError) as e:
        tokenize(stub, buf.getvalue())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nan" in e.value.details().lower() or "finite" in e.value.details().lower()


def test_too_long_audio_is_invalid_argument(stub, serve_stack):
    # 601 s of silence, 4 kHz mono PCM-16 (~4.8 MB): over the default 600 s limit
    data = wav_bytes(601, rate=4000, freq=0.0)
    with pytest.raises(grpc.RpcError) as e:
        tokenize(stub, data)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "600" in e.value.details()


def test_raw_pcm16_input(stub):
    pcm = (0.3 * np.sin(np.arange(16000) / 16000 * 2 * math.pi * 220) * 32767).astype("<i2").tobytes()
    req = stages_pb2.TokenizeRequest(audio=conversation_pb2.AudioInput(
        pcm16=conversation_pb2.RawPcm16(data=pcm, sample_rate=16000, channels=1)))
    assert stub.Tokenize(req, metadata=META, timeout=60).codes.frames == 12
