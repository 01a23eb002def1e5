"""Fixture 01: resampling, chunking, Whisper log-mel and the length arithmetic."""
from __future__ import annotations

import pytest
import torch

from services.tokenizer.log_mel import (LogMel, split_lengths, plan_splits, resampled_length, slaney_filterbank,
                                       split_bounds, to_mono_16k)

FX = "01_frontend"
FILTERBANK = "mel_filters_slaney_"        # key prefix; the fixture names it by its shape


@pytest.fixture(scope="module")
def front(fixtures):
    fixtures.require(FX)
    return fixtures.load(FX, "frontend.safetensors"), fixtures.json(FX, "frontend.json")


def stored_cases(front) -> list[str]:
    """The cases whose source samples the fixture stores (the others are built from them)."""
    t, meta = front
    return [c for c in meta["cases"] if f"{c}.wave_in_int16" in t]


def tiled_cases(front) -> list[str]:
    """Long cases (README: long35): the speech samples tiled and cut, not stored."""
    t, meta = front
    return [c for c in meta["cases"] if f"{c}.wave_in_int16" not in t]


def source_wave(tensors, case):
    return tensors[f"{case}.wave_in_int16"].float() / 32768.0         # torchaudio load(normalize=True)


def tiled_wave(tensors, meta, case):
    # the source-rate speech int16 samples tiled (np.tile) and cut to the case's length (fixture README)
    sp = tensors["speech.wave_in_int16"]
    n = meta["cases"][case]["source_num_samples"]
    return sp.repeat(1, -(-n // sp.shape[1]))[:, :n].float() / 32768.0


def test_parity_slaney_filterbank(fixtures, front):
    a = fixtures.model_config.audio
    (key,) = [k for k in front[0] if k.startswith(FILTERBANK)]
    expected = front[0][key]
    fb = slaney_filterbank(a.n_fft, a.num_mel_bins, a.sampling_rate)
    assert fb.shape == expected.shape == (a.num_mel_bins, a.n_fft // 2 + 1)
    # Built in float64 and rounded to float32 like the reference: at most the final rounding may
    # differ (float64 libm ulps across CPUs). A float32 build is off by many ulps (~2e-7).
    ulp = torch.nextafter(expected.abs(), torch.tensor(float("inf"))) - expected.abs()
    diff = (fb - expected).abs()
    assert (diff <= ulp).all(), f"filterbank differs by {diff.max():.3g} (> 1 float32 ulp at {(diff > ulp).sum()} entries)"


def test_parity_wave_16k(fixtures, front):
    t, meta = front
    a = fixtures.model_config.audio
    for case in stored_cases(front):
        mono = to_mono_16k(source_wave(t, case), meta["cases"][case]["source_sample_rate"], a)
        assert mono.shape[0] == meta["cases"][case]["resampled_num_samples_16k"], case
        fixtures.assert_close(mono[None], t[f"{case}.wave_16k"], f"01/{case}.wave_16k", "frontend")


def test_parity_mel_single(fixtures, front):
    t, meta = front
    a = fixtures.model_config.audio
    for case in stored_cases(front):
        mono = to_mono_16k(source_wave(t, case), meta["cases"][case]["source_sample_rate"], a)
        feats, lengths = LogMel(a)([mono])
        expected = t[f"{case}.mel.0"]
        assert lengths.tolist() == [expected.shape[1]], case
        fixtures.assert_close(feats[0], expected, f"01/{case}.mel.0", "frontend")


def test_parity_mel_batched(fixtures, front):
    """All stored cases in one batch: each row equals its fixture, zero-padded beyond its frames."""
    t, meta = front
    a = fixtures.model_config.audio
    cases = stored_cases(front)
    monos = [to_mono_16k(source_wave(t, c), meta["cases"][c]["source_sample_rate"], a) for c in cases]
    feats, lengths = LogMel(a)(monos)
    assert feats.shape == (len(cases), a.num_mel_bins, max(t[f"{c}.mel.0"].shape[1] for c in cases))
    for i, c in enumerate(cases):
        n = t[f"{c}.mel.0"].shape[1]
        assert lengths[i].item() == n
        fixtures.assert_close(feats[i, :, :n], t[f"{c}.mel.0"], f"01/{c}.mel.0", "frontend")
        assert not feats[i, :, n:].any()


def test_parity_long_chunks(fixtures, front):
    """The long (tiled) cases: their chunk plan and each chunk's log-mel."""
    t, meta = front
    a = fixtures.model_config.audio
    assert tiled_cases(front), "the fixture has a multi-chunk case"
    for name in tiled_cases(front):
        case = meta["cases"][name]
        mono = to_mono_16k(tiled_wave(t, meta, name), case["source_sample_rate"], a)
        assert mono.shape[0] == case["resampled_num_samples_16k"]
        plan = plan_splits(mono.shape[0], a)
        assert [(n.mel_frames, n.encoder_length, n.bridge_length) for _, _, n in plan] == \
            [(c["mel_frames"], c["encoder_length"], c["bridge_length"]) for c in case["chunks"]], name
        feats, lengths = LogMel(a)([mono[s:e] for s, e, _ in plan])
        for i in range(len(plan)):
            n = lengths[i].item()
            fixtures.assert_close(feats[i, :, :n], t[f"{name}.mel.{i}"], f"01/{name}.mel.{i}", "frontend")


def test_parity_case_lengths(fixtures, front):
    """frontend.json: 16 kHz length, per-chunk lengths, and the audio span length."""
    a = fixtures.model_config.audio
    for name, c in front[1]["cases"].items():
        n16 = resampled_length(c["source_num_samples"], c["source_sample_rate"], a.sampling_rate)
        assert n16 == c["resampled_num_samples_16k"], name
        plan = plan_splits(n16, a)
        assert [{"mel_frames": n.mel_frames, "encoder_length": n.encoder_length, "bridge_length": n.bridge_length}
                for _, _, n in plan] == c["chunks"], name
        total = sum(n.bridge_length for _, _, n in plan)
        assert total == c["total_bridge_length"], name
        assert total + 2 == c["input_ids_audio_span_len"], name      # start + pads + end


def test_parity_length_table(fixtures, front):
    a = fixtures.model_config.audio
    for row in front[1]["length_table"]:
        n = row["num_samples_16k"]
        if "chunks_samples" in row:
            assert [e - s for s, e in split_bounds(n, a)] == row["chunks_samples"], row
            continue
        got = split_lengths(n, a)
        assert (got.mel_frames, got.encoder_length, got.bridge_length) == \
            (row["valid_mel_frames"], row["encoder_length"], row["bridge_length"]), row
        assert bool(plan_splits(n, a)) == row["kept"], row


def test_resampled_length_matches_torchaudio(fixtures):
    a = fixtures.model_config.audio
    # (source rate, samples) pairs chosen to exercise the ceil of ratios other than 1
    for sr, n in ((48000, 2877), (44100, 12345), (22050, 999), (8000, 481), (24000, 12000)):
        out = to_mono_16k(torch.zeros(1, n), sr, a)
        assert out.shape[0] == resampled_length(n, sr, a.sampling_rate), (sr, n)


def test_chunk_too_short_for_log_mel_is_refused(fixtures):
    a = fixtures.model_config.audio
    with pytest.raises(ValueError, match="samples"):
        LogMel(a)([torch.zeros(a.n_fft - 1)])
