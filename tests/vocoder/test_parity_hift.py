"""Fixture 05_vocoder: the HiFT generator against the reference's golden tensors (fp32)."""
from __future__ import annotations

import pytest
import torch

from services.common.checkpoint import CheckpointError, load_state
from services.vocoder.hift import HiFTGenerator
from services.vocoder.source import SourceDraws, upsample_f0
from tests.parity import MARGIN

FX = "05_vocoder"
DECODE = "05/decode_out(stored source)"


def f0_tol(fixtures, f0_ref: torch.Tensor) -> float:
    """Tolerance on f0 in Hz. tolerances.json's 05/f0 is already the absolute difference seen at
    this f0's scale (hundreds of Hz), so it is not scaled again; the fp32 floor is relative to it."""
    return fixtures.tol("05/f0", "fp32", f0_ref.abs().max().item())


def wave_from_f0(hift: HiFTGenerator, mel: torch.Tensor, f0: torch.Tensor, draws: SourceDraws) -> torch.Tensor:
    """The forward pass from a given f0 (B, T) instead of the predicted one."""
    s, _ = hift.m_source(upsample_f0(f0, hift.hop), draws=draws)
    return hift.decode(mel, s)


def f0_shift_effect(hift: HiFTGenerator, mel: torch.Tensor, f0: torch.Tensor, draws: SourceDraws,
                    f0_diff: float) -> float:
    """How far the waveform moves when every f0 frame moves by ±f0_diff Hz, measured on these
    weights and inputs: max over both signs of max |wave(f0 ± f0_diff) - wave(f0)|.

    The source phase is a cumulative sum of f0, so an f0 off by at most f0_diff per frame moves
    each harmonic's phase by at most what the uniform shift does: this bounds (to first order)
    the waveform change that an f0 rounding difference of that size can cause."""
    if f0_diff == 0:
        return 0.0
    with torch.no_grad():
        base = wave_from_f0(hift, mel, f0, draws)
        return max((wave_from_f0(hift, mel, f0 + sign * f0_diff, draws) - base).abs().max().item()
                   for sign in (1.0, -1.0))


@pytest.fixture(scope="module")
def data(fixtures):
    fixtures.require(FX)
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
    key = max(k for k in tensors if k.startswith("resblocks.") and k.endswith(".weight_v"))
    renamed = key[:-len("_v")]
    tensors[renamed] = tensors.pop(key)
    with pytest.raises(CheckpointError) as e:
        load_state(HiFTGenerator(fixtures.hift_config), tensors, "", source="hift.pt")
    assert f"missing: {key}" in str(e.value)
    assert f"unexpected: {renamed}" in str(e.value)


def test_parity_f0(fixtures, data, hift):
    with torch.no_grad():
        f0 = hift.f0_predictor(data["in"]["mel"])
    exp = data["out"]["f0"]
    assert f0.shape == exp.shape
    diff, tol = (f0 - exp).abs().max().item(), f0_tol(fixtures, exp)
    assert diff <= tol, f"05/f0: max |diff| {diff:.3g} Hz > tolerance {tol:.3g} Hz"


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
    pre = {}
    hook = hift.conv_post.register_forward_hook(lambda mod, args, out: pre.update(x=out))
    try:
        with torch.no_grad():
            mag, phase = hift.spectrum(data["in"]["mel"], data["out"]["source"])
    finally:
        hook.remove()
    # magnitude = exp(x): its rounding scales with its own size (default scale).
    fixtures.assert_close(mag, data["out"]["istft_magnitude_in"], "05/istft_magnitude_in", "fp32")
    # phase = sin(x) is bounded, but x's rounding scales with |x|: use the pre-activation's scale.
    phase_pre = pre["x"][:, hift.n_freq:]
    assert phase_pre.shape == phase.shape
    fixtures.assert_close(phase, data["out"]["istft_phase_in"], "05/istft_phase_in", "fp32",
                          scale=phase_pre.abs().max().item())


def test_parity_decode_out_stored_source(fixtures, data, hift):
    with torch.no_grad():
        wave = hift.decode(data["in"]["mel"], data["out"]["source"])
    fixtures.assert_close(wave, data["out"]["decode_out"], DECODE, "fp32")


def test_parity_forward_speech_recorded_draws(fixtures, data, hift):
    """End to end with the recorded draws. The phase is a cumsum of f0 over N samples, so an f0
    that differs by rounding (other CPU kernels: ~1e-6 relative) moves the waveform by far more
    than the decode tolerance. Checked in three parts: from the reference's f0 the waveform
    matches at the decode tolerance; our f0 matches the reference's; and our end-to-end
    waveform differs by at most the decode tolerance plus MARGIN times the measured effect of
    shifting f0 by our actual f0 difference (nothing more when f0 is exact)."""
    mel, exp, f0_ref, draws = data["in"]["mel"], data["out"]["forward_speech"], data["out"]["f0"], _draws(data)
    with torch.no_grad():
        wave = hift(mel, draws=draws)
        f0 = hift.f0_predictor(mel)
        from_ref_f0 = wave_from_f0(hift, mel, f0_ref, draws)
    fixtures.assert_close(from_ref_f0, exp, DECODE, "fp32")
    f0_diff = (f0 - f0_ref).abs().max().item()
    assert f0_diff <= f0_tol(fixtures, f0_ref), f"f0 differs by {f0_diff:.3g} Hz"
    shift = f0_shift_effect(hift, mel, f0_ref, draws, f0_diff)
    tol = fixtures.tol(DECODE, "fp32", exp.abs().max().item()) + MARGIN * shift
    diff = (wave - exp).abs().max().item()
    assert wave.shape == exp.shape
    assert diff <= tol, f"forward_speech: max |diff| {diff:.3g} > {tol:.3g} (f0 diff {f0_diff:.3g} Hz moves it {shift:.3g})"
