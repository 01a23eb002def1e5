"""Batched vocoding across lengths, the runner's validation and loading (fixture 05 weights)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from services.common.checkpoint import Checkpoint, load_state
from services.vocoder.hift import HiFTGenerator
from services.vocoder.runner import VocodeInputError, VocoderRunner
from services.vocoder.source import SourceDraws, draw_source

FX = "05_vocoder"
FRAMES = (20, 7, 13)  # mel lengths of one padded batch


@pytest.fixture(scope="module")
def weights(fixtures):
    if not fixtures.has(FX):
        pytest.skip(f"fixture {FX} not in the fixture root")
    return fixtures.load(FX, "weights.safetensors")


@pytest.fixture(scope="module")
def hift(fixtures, weights) -> HiFTGenerator:
    m = HiFTGenerator(fixtures.hift_config).eval()
    load_state(m, weights, "", source=FX)
    return m.fold_weight_norm()


@pytest.fixture(scope="module")
def mels(fixtures) -> list[torch.Tensor]:
    """Slices of the fixture mel (speech-like values) of the lengths in FRAMES."""
    mel = fixtures.load(FX, "inputs.safetensors")["mel"][0]                 # (80, 20)
    out = []
    for i, t in enumerate(FRAMES):
        out.append(torch.roll(mel, shifts=3 * i, dims=1)[:, :t].contiguous())
    return out


@pytest.fixture(scope="module")
def runner(fixtures, weights) -> VocoderRunner:
    return VocoderRunner(fixtures.hift_config, weights, source=FX, max_batch=2)


def _pad(xs: list[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    t = max(x.shape[-1] for x in xs)
    return torch.stack([torch.nn.functional.pad(x, (0, t - x.shape[-1]), value=value) for x in xs])


def test_padded_batch_decode_equals_each_alone(fixtures, hift, mels):
    hop = fixtures.hift_config.hop_samples
    gen = torch.Generator().manual_seed(5)
    sources = [torch.tanh(torch.randn(1, m.shape[1] * hop, generator=gen)) * 0.1 for m in mels]
    lengths = torch.tensor([m.shape[1] for m in mels])
    with torch.no_grad():
        alone = [hift.decode(m[None], s[None])[0] for m, s in zip(mels, sources)]
        batch = hift.decode(_pad(mels, -3.0), _pad(sources, 0.5), lengths)         # padding need not be 0
        unmasked = hift.decode(_pad(mels), _pad(sources))
    for b, (a, t) in enumerate(zip(alone, lengths.tolist())):
        fixtures.assert_close(batch[b, :t * hop], a, "05/batched_decode", "fp32")
        assert torch.all(batch[b, t * hop:] == 0)                                # padding stays silent
    # Without the masks the padding does leak into the shorter items: the test above can fail.
    leak = max((unmasked[b, :t * hop] - a).abs().max().item() for b, (a, t) in enumerate(zip(alone, lengths.tolist())))
    assert leak > 1e-3


def _f0_aware_tol(fixtures, f0_diff: float) -> float:
    """fp32 rounding of f0 differs between batch shapes (other conv blockings: ~1e-6 relative, like
    the reference on other CPU kernels), and the source phase accumulates it over every sample:
    over these short mels the waveform moves by about twice the f0 difference in Hz."""
    return fixtures.tol("05/decode_out(stored source)", "fp32") + 4.0 * f0_diff


def test_padded_batch_forward_equals_each_alone(fixtures, hift, mels):
    hop, h = fixtures.hift_config.hop_samples, fixtures.hift_config.nb_harmonics
    gen = torch.Generator().manual_seed(6)
    draws = [draw_source(1, h, m.shape[1] * hop, generator=gen) for m in mels]
    lengths = torch.tensor([m.shape[1] for m in mels])
    mask = (torch.arange(max(FRAMES))[None] < lengths[:, None])[:, None].float()
    with torch.no_grad():
        alone = [hift(m[None], draws=d)[0] for m, d in zip(mels, draws)]
        f0_alone = [hift.f0_predictor(m[None])[0] for m in mels]
        batch_draws = SourceDraws(torch.cat([d.phase for d in draws]), _pad([d.noise[0] for d in draws]))
        batch = hift(_pad(mels), lengths, draws=batch_draws)
        f0_batch = hift.f0_predictor(_pad(mels), mask)
        f0_unmasked = hift.f0_predictor(_pad(mels))
    # f0 of a few hundred Hz: fp32 rounding is ~1e-6 relative, so allow 1e-5 of its size.
    f0_tol = max(fixtures.tol("05/f0", "fp32"), 1e-5 * max(f.abs().max().item() for f in f0_alone))
    f0_diff = max((f0_batch[b, :t] - f0_alone[b]).abs().max().item() for b, t in enumerate(lengths.tolist()))
    assert f0_diff <= f0_tol, f"batched f0 differs by {f0_diff:.3g} Hz > {f0_tol:.3g}"
    for b, t in enumerate(lengths.tolist()):
        diff = (batch[b, :t * hop] - alone[b]).abs().max().item()
        assert diff <= _f0_aware_tol(fixtures, f0_diff), f"item {b}: {diff:.3g} (f0 diff {f0_diff:.3g})"
    # Without the mask the padding reaches the last valid f0 frames (by hundreds of Hz here).
    assert (f0_unmasked[1, :FRAMES[1]] - f0_alone[1]).abs().max().item() > 100 * f0_tol


def test_runner_vocode_batches_and_crops(fixtures, hift, runner, mels):
    hop, h = fixtures.hift_config.hop_samples, fixtures.hift_config.nb_harmonics
    waves = runner.vocode(mels, seed=11)                                    # max_batch=2: two batches
    assert [w.shape for w in waves] == [torch.Size([t * hop]) for t in FRAMES]
    assert all(w.dtype == torch.float32 for w in waves)
    # Each item's draws come from the seeded generator in input order with its own length.
    gen = torch.Generator().manual_seed(11)
    draws = [draw_source(1, h, t * hop, generator=gen) for t in FRAMES]
    with torch.no_grad():
        batch_f0 = hift.f0_predictor(_pad(mels[:1] + mels[2:]),
                                     (torch.arange(20)[None] < torch.tensor([20, 13])[:, None])[:, None].float())
        f0_diff = max((batch_f0[0] - hift.f0_predictor(mels[0][None])[0]).abs().max().item(),
                      (batch_f0[1, :13] - hift.f0_predictor(mels[2][None])[0]).abs().max().item())
        for w, m, d in zip(waves, mels, draws):
            diff = (w - hift(m[None], draws=d)[0]).abs().max().item()
            assert diff <= _f0_aware_tol(fixtures, f0_diff), f"{diff:.3g} (f0 diff {f0_diff:.3g})"
    one = runner.vocode(mels[1:2], seed=11)[0]
    assert torch.equal(runner.vocode(mels[1:2], seed=11)[0], one)              # a seed reproduces
    assert not torch.equal(runner.vocode(mels[1:2], seed=12)[0], one)
    assert runner.vocode([]) == []


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(64, 10), "has shape (64, 10)"),
    (torch.zeros(80), "has shape (80,)"),
    (torch.zeros(80, 0), "0 frames"),
    (torch.full((80, 5), float("nan")), "NaN or infinite"),
    (torch.tensor([[float("inf")] * 5] * 80), "NaN or infinite"),
    (torch.zeros(80, 5, dtype=torch.int64), "dtype"),
    (torch.zeros(80, 10_000), "frames"),
])
def test_runner_rejects_bad_mels(runner, mels, bad, message):
    with pytest.raises(VocodeInputError) as e:
        runner.vocode([mels[0], bad])
    assert message in str(e.value) and "mel 1" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_runner_from_checkpoint_dir(fixtures, weights, mels, tmp_path):
    # A minimal checkpoint directory: config, one (unrelated) shard, hift.pt and its config.
    (tmp_path / "config.json").write_text((fixtures.root / "model_config.json").read_text())
    save_file({"lm_head.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    torch.save(dict(weights), tmp_path / "hift.pt")
    (tmp_path / "hift_config.json").write_text(json.dumps(fixtures.hift_config.to_dict()))
    r = VocoderRunner.from_checkpoint(Checkpoint(tmp_path))
    assert r.config == fixtures.hift_config
    ref = VocoderRunner(fixtures.hift_config, weights)
    assert torch.equal(r.vocode(mels[:1], seed=3)[0], ref.vocode(mels[:1], seed=3)[0])


def test_runner_loads_the_project_tiny_checkpoint(tiny_checkpoint):
    r = VocoderRunner.from_checkpoint(tiny_checkpoint)
    (wave,) = r.vocode([torch.randn(r.config.in_channels, 6) - 5.0], seed=0)
    assert wave.shape == (6 * r.hop,) and torch.isfinite(wave).all()
