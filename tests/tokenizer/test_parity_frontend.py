"""Fixture 01: resampling, chunking, Whisper log-mel and the length arithmetic."""
from __future__ import annotations

import pytest
import torch

from services.tokenizer.log_mel import (LogMel, chunk_lengths, plan_chunks, resampled_length, slaney_filterbank,
                                       split_bounds, to_mono_16k)

CASES = ("speech", "tone", "tone2", "stereo")
FX = "01_frontend"


@pytest.fixture(scope="module")
def front(fixtures):
    return fixtures.load(FX, "frontend.safetensors"), fixtures.json(FX, "frontend.json")


def source_wave(tensors, case):
    return tensors[f"{case}.wave_in_int16"].float() / 32768.0         # torchaudio load(normalize=True)


def long35_wave(tensors, meta):
    # the 48 kHz speech int16 samples tiled and cut to 35 s (fixture README)
    sp = tensors["speech.wave_in_int16"]
    n = meta["cases"]["long35"]["source_num_samples"]
    return sp.repeat(1, -(-n // sp.shape[1]))[:, :n].float() / 32768.0


def test_parity_slaney_filterbank(fixtures, front):
    a = fixtures.model_config.audio
    fb = slaney_filterbank(a.n_fft, a.num_mel_bins, a.sampling_rate)
    expected = front[0]["mel_filters_slaney_128x201"]
    assert fb.shape == expected.shape
    assert torch.equal(fb, expected), f"filterbank differs by {(fb - expected).abs().max():.3g}"


@pytest.mark.parametrize("case", CASES)
def test_parity_wave_16k(fixtures, front, case):
    t, meta = front
    a = fixtures.model_config.audio
    mono = to_mono_16k(source_wave(t, case), meta["cases"][case]["source_sample_rate"], a)
    assert mono.shape[0] == meta["cases"][case]["resampled_num_samples_16k"]
    fixtures.assert_close(mono[None], t[f"{case}.wave_16k"], f"01/{case}.wave_16k", "frontend")


@pytest.mark.parametrize("case", CASES)
def test_parity_mel_single(fixtures, front, case):
    t, meta = front
    a = fixtures.model_config.audio
    mono = to_mono_16k(source_wave(t, case), meta["cases"][case]["source_sample_rate"], a)
    feats, lengths = LogMel(a)([mono])
    expected = t[f"{case}.mel.0"]
    assert lengths.tolist() == [expected.shape[1]]
    fixtures.assert_close(feats[0], expected, f"01/{case}.mel.0", "frontend")


def test_parity_mel_batched(fixtures, front):
    """All cases in one batch: each row equals its fixture, zero-padded beyond its frames."""
    t, meta = front
    a = fixtures.model_config.audio
    monos = [to_mono_16k(source_wave(t, c), meta["cases"][c]["source_sample_rate"], a) for c in CASES]
    feats, lengths = LogMel(a)(monos)
    assert feats.shape == (len(CASES), a.num_mel_bins, max(t[f"{c}.mel.0"].shape[1] for c in CASES))
    for i, c in enumerate(CASES):
        n = t[f"{c}.mel.0"].shape[1]
        assert lengths[i].item() == n
        fixtures.assert_close(feats[i, :, :n], t[f"{c}.mel.0"], f"01/{c}.mel.0", "frontend")
        assert not feats[i, :, n:].any()


def test_parity_long35_chunks(fixtures, front):
    t, meta = front
    a = fixtures.model_config.audio
    case = meta["cases"]["long35"]
    mono = to_mono_16k(long35_wave(t, meta), case["source_sample_rate"], a)
    assert mono.shape[0] == case["resampled_num_samples_16k"]
    plan = plan_chunks(mono.shape[0], a)
    assert [(n.mel_frames, n.encoder_length, n.bridge_length) for _, _, n in plan] == \
        [(c["mel_frames"], c["encoder_length"], c["bridge_length"]) for c in case["chunks"]]
    feats, lengths = LogMel(a)([mono[s:e] for s, e, _ in plan])
    for i in range(len(plan)):
        n = lengths[i].item()
        fixtures.assert_close(feats[i, :, :n], t[f"long35.mel.{i}"], f"01/long35.mel.{i}", "frontend")


@pytest.mark.parametrize("case", CASES + ("long35",))
def test_parity_case_lengths(fixtures, front, case):
    """frontend.json: 16 kHz length, per-chunk lengths, and the audio span length."""
    a = fixtures.model_config.audio
    c = front[1]["cases"][case]
    n16 = resampled_length(c["source_num_samples"], c["source_sample_rate"], a.sampling_rate)
    assert n16 == c["resampled_num_samples_16k"]
    plan = plan_chunks(n16, a)
    assert [{"mel_frames": n.mel_frames, "encoder_length": n.encoder_length, "bridge_length": n.bridge_length}
            for _, _, n in plan] == c["chunks"]
    total = sum(n.bridge_length for _, _, n in plan)
    assert total == c["total_bridge_length"]
    assert total + 2 == c["input_ids_audio_span_len"]      # start + pads + end


def test_parity_length_table(fixtures, front):
    a = fixtures.model_config.audio
    for row in front[1]["length_table"]:
        n = row["num_samples_16k"]
        if "chunks_samples" in row:
            assert [e - s for s, e in split_bounds(n, a)] == row["chunks_samples"], row
            continue
        got = chunk_lengths(n, a)
        assert (got.mel_frames, got.encoder_length, got.bridge_length) == \
            (row["valid_mel_frames"], row["encoder_length"], row["bridge_length"]), row
        assert bool(plan_chunks(n, a)) == row["kept"], row


def test_resampled_length_matches_torchaudio(fixtures):
    a = fixtures.model_config.audio
    for sr, n in ((48000, 2877), (44100, 12345), (22050, 999), (8000, 481), (24000, 12000)):
        out = to_mono_16k(torch.zeros(1, n), sr, a)
        assert out.shape[0] == resampled_length(n, sr, a.sampling_rate), (sr, n)


def test_chunk_too_short_for_log_mel_is_refused(fixtures):
    a = fixtures.model_config.audio
    with pytest.raises(ValueError, match="samples"):
        LogMel(a)([torch.zeros(a.n_fft - 1)])
