"""Fixture 05_vocoder: the HiFT generator against the reference's golden tensors (fp32)."""
from __future__ import annotations

import pytest
import torch

from services.common.checkpoint import CheckpointError, load_state
from services.vocoder.hift import HiFTGenerator
from services.vocoder.source import SourceDraws, upsample_f0

FX = "05_vocoder"


@pytest.fixture(scope="module")
def data(fixtures):
    if not fixtures.has(FX):
        pytest.skip(f"fixture {FX} not in the fixture root")
    return {
        "weights": fixtures.load(FX, "weights.safetensors"),
        "in": fixtures.load(FX, "inputs.safetensors"),
        "out": fixtures.load(FX, "outputs_fp32.safetensors"),
    }


def _model(fixtures, data, fold: bool) -> HiFTGenerator:
    m = HiFTGenerator(fixtures.hift_config).eval()
    load_state(m, data["weights"], "", source=f"fixture {FX}")
    return m.fold_weight_norm() if fold else m


@pytest.fixture(scope="module", params=[False, True], ids=["weight_norm_per_call", "folded"])
def hift(request, fixtures, data) -> HiFTGenerator:
    return _model(fixtures, data, request.param)


def _draws(data, prefix: str = "") -> SourceDraws:
    return SourceDraws(data["in"][prefix + "uniform_phase_draw"], data["in"][prefix + "sine_noise_std_normal"])


def test_parity_state_dict_keys_are_the_reference_keys(fixtures, data):
    m = HiFTGenerator(fixtures.hift_config)
    sd = m.state_dict()
    assert set(sd) == set(data["weights"])
    for k, t in data["weights"].items():
        assert tuple(sd[k].shape) == tuple(t.shape), k
    # ConvTranspose1d weight norm is over its input channels: g is (in, 1, 1).
    assert tuple(sd["ups.0.weight_g"].shape) == (fixtures.hift_config.base_channels, 1, 1)


def test_parity_strict_loading_names_a_renamed_key(fixtures, data):
    tensors = dict(data["weights"])
    tensors["resblocks.4.convs1.2.weight"] = tensors.pop("resblocks.4.convs1.2.weight_v")
    with pytest.raises(CheckpointError) as e:
        load_state(HiFTGenerator(fixtures.hift_config), tensors, "", source="hift.pt")
    assert "missing: resblocks.4.convs1.2.weight_v" in str(e.value)
    assert "unexpected: resblocks.4.convs1.2.weight" in str(e.value)


def test_parity_f0(fixtures, data, hift):
    with torch.no_grad():
        f0 = hift.f0_predictor(data["in"]["mel"])
    fixtures.assert_close(f0, data["out"]["f0"], "05/f0", "fp32")


def test_parity_f0_upsampled(fixtures, data):
    up = upsample_f0(data["out"]["f0"], fixtures.hift_config.hop_samples)
    fixtures.assert_close(up.unsqueeze(-1), data["out"]["f0_upsampled"], "05/f0_upsampled", "fp32")


def test_parity_source_with_recorded_draws(fixtures, data, hift):
    with torch.no_grad():
        s, uv = hift.m_source(data["out"]["f0_upsampled"][..., 0], draws=_draws(data))
    fixtures.assert_close(uv.unsqueeze(-1), data["out"]["uv"], "05/uv", "fp32")
    fixtures.assert_close(s, data["out"]["source"], "05/source", "fp32")


def test_parity_source_unvoiced_branch(fixtures, data, hift):
    f0 = upsample_f0(data["in"]["handmade_f0"], fixtures.hift_config.hop_samples)
    with torch.no_grad():
        s, uv = hift.m_source(f0, draws=_draws(data, "handmade."))
    expected_uv = data["out"]["handmade.uv"]
    assert 0 < expected_uv.sum() < expected_uv.numel(), "handmade f0 must mix voiced and unvoiced frames"
    fixtures.assert_close(uv.unsqueeze(-1), expected_uv, "05/handmade.uv", "fp32")
    fixtures.assert_close(s, data["out"]["handmade.source"], "05/handmade.source", "fp32")


def test_parity_source_stft(fixtures, data, hift):
    re, im = hift.stft(data["out"]["source"].squeeze(1))
    fixtures.assert_close(re, data["out"]["source_stft_real"], "05/source_stft_real", "fp32")
    fixtures.assert_close(im, data["out"]["source_stft_imag"], "05/source_stft_imag", "fp32")


def test_parity_istft_inputs(fixtures, data, hift):
    with torch.no_grad():
        mag, phase = hift.spectrum(data["in"]["mel"], data["out"]["source"])
    # Magnitudes reach ~5.5: a few fp32 ulps of it is above the 1e-5 floor.
    tol = max(fixtures.tol("05/istft_magnitude_in", "fp32"), 1e-5 * data["out"]["istft_magnitude_in"].abs().max().item())
    diff = (mag - data["out"]["istft_magnitude_in"]).abs().max().item()
    assert mag.shape == data["out"]["istft_magnitude_in"].shape and diff <= tol, f"magnitude: {diff:.3g} > {tol:.3g}"
    fixtures.assert_close(phase, data["out"]["istft_phase_in"], "05/istft_phase_in", "fp32")


def test_parity_decode_out_stored_source(fixtures, data, hift):
    with torch.no_grad():
        wave = hift.decode(data["in"]["mel"], data["out"]["source"])
    fixtures.assert_close(wave, data["out"]["decode_out"], "05/decode_out(stored source)", "fp32")


def test_parity_forward_speech_recorded_draws(fixtures, data, hift):
    """End to end with the recorded draws. The phase is a cumsum of f0 over N samples, so an f0
    that differs by rounding (other CPU kernels: up to 5.5e-4 Hz) moves the waveform by ~2x that;
    the tolerance allows for the f0 difference measured here, and nothing more when f0 is exact."""
    with torch.no_grad():
        wave = hift(data["in"]["mel"], draws=_draws(data))
        f0_diff = (hift.f0_predictor(data["in"]["mel"]) - data["out"]["f0"]).abs().max().item()
    tol = fixtures.tol("05/decode_out(stored source)", "fp32") + 4.0 * f0_diff
    diff = (wave - data["out"]["forward_speech"]).abs().max().item()
    assert wave.shape == data["out"]["forward_speech"].shape
    assert diff <= tol, f"forward_speech: max |diff| {diff:.3g} > {tol:.3g} (f0 diff {f0_diff:.3g})"
