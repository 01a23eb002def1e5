"""Low-latency (chunked) decoding against faithful whole-segment decoding, same codes, same noise.

Bound: the mel MAE of chunked vs faithful must stay below 10% of the MAE between two faithful
decodes of the same codes with different noise. The reference draws fresh noise for every segment
(no seed), so the latter is how far the reference itself moves between two runs; a deviation an
order of magnitude below it is small against what a listener already gets from the reference.
Measured here with the fixture-04 weights, default plan (first 6, growth 2, max 50 tokens),
whole-prefix windows; MAE chunked vs faithful / noise re-run (ratio):
    fp32  fixture segment a, 30 tokens:  0.0412 / 1.1615 (0.035)
    fp32  random codes, 150 tokens:      0.0167 / 1.1705 (0.014)
    bf16  same cases:                    0.0435 (0.037), 0.0193 (0.017)
    left_context=8 instead:              0.110 (0.094), 0.248 (0.212): truncated history is what hurts
A wrong frame offset or noise slice would move the mel by about the noise re-run distance.
"""
from __future__ import annotations

import pytest
import torch

from services.decoder.runner import DecoderRunner, chunk_plan, mel_distance, mel_frames
from tests.decoder.conftest import FIX

BOUND = 0.1


@pytest.fixture(scope="module")
def runner(fixtures):
    return DecoderRunner(fixtures.model_config, fixtures.load(FIX, "weights.safetensors"))


def _case(fixtures, name):
    if name == "fixture_a30":
        return fixtures.load(FIX, "inputs.safetensors")["codes_single"]
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randint(0, k, (150,), generator=g)
                        for k in fixtures.model_config.audio.codebook_sizes], 1)


@pytest.mark.parametrize("name", ["fixture_a30", "random_150"])
def test_chunked_close_to_faithful(fixtures, runner, name):
    codes = _case(fixtures, name)
    T = mel_frames(codes.shape[0])
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(80, T, generator=g), torch.randn(80, T, generator=g)
    faithful, rerun = runner.decode([codes, codes], noise=[z1, z2])
    pieces = list(runner.iter_chunked(codes, noise=z1))
    plan = chunk_plan(codes.shape[0])
    assert len(pieces) == len(plan)
    # piece k covers frames [4s-1, 4e-1) (the first from 0): lengths add up to 4L-1
    assert [p.shape[1] for p in pieces] == [mel_frames(e) - (0 if k == 0 else 4 * s - 1)
                                            for k, (s, e) in enumerate(plan)]
    chunked = torch.cat(pieces, dim=1)
    assert torch.equal(chunked, runner.decode_chunked(codes, noise=z1))
    d_chunk, d_noise = mel_distance(chunked, faithful), mel_distance(rerun, faithful)
    print(f"{name}: chunked vs faithful {d_chunk:.4f}, noise re-run {d_noise:.4f}, ratio {d_chunk / d_noise:.3f}")
    assert d_chunk < BOUND * d_noise, f"chunked MAE {d_chunk:.4f} >= {BOUND} x re-run MAE {d_noise:.4f}"


def test_single_chunk_is_faithful(fixtures, runner):
    """A plan with one chunk is faithful decoding itself."""
    codes = _case(fixtures, "fixture_a30")
    (faithful,) = runner.decode([codes], seed=5)
    assert torch.equal(runner.decode_chunked(codes, first_chunk=30, max_chunk=30, seed=5), faithful)


def test_bounded_left_context(fixtures, runner):
    """left_context bounds the window: frame 4s-1 still comes from a window starting before s."""
    codes = _case(fixtures, "fixture_a30")
    mel = runner.decode_chunked(codes, left_context=1, seed=2)
    assert mel.shape == (80, mel_frames(codes.shape[0]))
    with pytest.raises(ValueError, match="left_context"):
        runner.decode_chunked(codes, left_context=0)
