"""The Tokenizer gRPC service through Serve's real gRPC proxy, on the tiny checkpoint."""
from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import soundfile as sf
import torch

from baichuan_audio.v1 import conversation_pb2, stages_pb2, stages_pb2_grpc
from services.common.checkpoint import Checkpoint
from services.tokenizer.audio_io import DEFAULT_MAX_SECONDS, min_samples, read_audio
from services.tokenizer.log_mel import split_lengths
from services.tokenizer.runner import TokenizerRunner
from tests.conftest import metadata
from tests.tokenizer.test_runner import assert_same_codes

META = metadata("internal", "tokenizer")   # a stage service: the internal key


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
def audio(serve_stack):
    """The audio config of the checkpoint the stack serves."""
    return Checkpoint(serve_stack.checkpoint).config.audio


@pytest.fixture(scope="module")
def stub(serve_stack):
    serve_stack.deploy("tokenizer")
    channel = grpc.insecure_channel(serve_stack.address)
    yield stages_pb2_grpc.TokenizerStub(channel)
    channel.close()


def tokenize(stub, data: bytes):
    req = stages_pb2.TokenizeRequest(audio=conversation_pb2.AudioInput(file=data))
    return stub.Tokenize(req, metadata=META, timeout=60)


def test_tokenize_lengths_follow_the_reference_arithmetic(stub, audio):
    # 1.0 s at the model rate -> mel frames -> encoder frames -> tokens (reference §3.4; 12 for the real config)
    sr = audio.sampling_rate
    tokens = split_lengths(sr, audio).bridge_length
    r = tokenize(stub, wav_bytes(1.0, rate=sr))
    assert (r.codes.frames, r.codes.codebooks) == (tokens, audio.num_codebooks)
    assert len(r.codes.values) == tokens * audio.num_codebooks
    assert r.audio_seconds == pytest.approx(1.0)
    # other rates, stereo and FLAC are accepted and resampled
    r2 = tokenize(stub, wav_bytes(1.0, rate=3 * sr, channels=2, fmt="FLAC"))
    assert r2.codes.frames == tokens


def test_concurrent_requests_are_batched_and_independent(stub, serve_stack):
    clips = [wav_bytes(s, freq=f) for s, f in [(0.5, 200), (1.3, 300), (2.0, 400), (0.7, 500)]]

    def codes(data: bytes) -> torch.Tensor:
        c = tokenize(stub, data).codes
        return torch.tensor(list(c.values)).view(c.frames, c.codebooks)
    alone = [codes(c) for c in clips]
    with ThreadPoolExecutor(len(clips)) as pool:
        together = list(pool.map(codes, clips))
    # Batched with others, fp32 rounding changes with the batch shape: equal except at near-ties.
    runner = TokenizerRunner.from_checkpoint(Checkpoint(serve_stack.checkpoint), device="cpu")
    assert_same_codes(runner, [(t, a, read_audio(c)) for t, a, c in zip(together, alone, clips)])


def _too_short(audio) -> bytes:
    # one sample less than the fewest that give one token (40 ms vs 80 ms in the real config)
    sr = audio.sampling_rate
    return wav_bytes((min_samples(sr, audio) - 1) / sr, rate=sr)


@pytest.mark.parametrize("make, words", [
    (lambda a: b"", "empty"),
    (lambda a: wav_bytes(1.0)[:30], "decoded"),            # truncated header
    (lambda a: b"RIFF\x00\x00\x00\x00garbage-not-audio" * 4, "decoded"),
    (_too_short, "too short"),
    (lambda a: wav_bytes(0.5, channels=3), "channels"),
], ids=["empty", "truncated", "garbage", "too_short", "channels"])
def test_bad_audio_is_invalid_argument(stub, audio, make, words):
    data = make(audio)
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
    # one second over the default limit of silence, 4 kHz mono PCM-16 (~4.8 MB)
    data = wav_bytes(DEFAULT_MAX_SECONDS + 1, rate=4000, freq=0.0)
    with pytest.raises(grpc.RpcError) as e:
        tokenize(stub, data)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{DEFAULT_MAX_SECONDS:g}" in e.value.details()


def test_decoded_size_is_checked_before_decoding(stub):
    """FLAC silence of under 1 MB that declares 600 s at 96 kHz stereo (115 million samples):
    refused with the limit's name, and the replica serves the next caller."""
    from tests.tokenizer.flac import silent_flac

    with pytest.raises(grpc.RpcError) as e:
        tokenize(stub, silent_flac(600, 96_000, 2))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit is 28,800,000 samples (limits.max_audio_samples)" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        tokenize(stub, silent_flac(600, 384_000, 2))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limits.max_audio_sample_rate" in e.value.details()
    assert tokenize(stub, wav_bytes(0.5)).codes.frames > 0


def test_raw_pcm16_input(stub, audio):
    sr = audio.sampling_rate
    pcm = (0.3 * np.sin(np.arange(sr) / sr * 2 * math.pi * 220) * 32767).astype("<i2").tobytes()   # 1 s
    req = stages_pb2.TokenizeRequest(audio=conversation_pb2.AudioInput(
        pcm16=conversation_pb2.RawPcm16(data=pcm, sample_rate=sr, channels=1)))
    assert stub.Tokenize(req, metadata=META, timeout=60).codes.frames == split_lengths(sr, audio).bridge_length
