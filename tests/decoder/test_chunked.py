"""Low-latency (chunked) decoding against faithful whole-segment decoding, same codes, same noise.

Bound: the mel MAE of chunked vs faithful must stay below 10% of the MAE between two faithful
decodes of the same codes with different noise. The reference draws fresh noise for every segment
(no seed), so the latter is how far the reference itself moves between two runs; a deviation an
order of magnitude below it is small against what a listener already gets from the reference.
Measured with the public fixture-04 weights, whole-prefix windows; plan first 6, growth 2, max 50
tokens (for the fixture segment: first = its length // 5, which is 6 there); MAE chunked vs
faithful / noise re-run (ratio):
    fp32  fixture segment a, 30 tokens:  0.0412 / 1.1615 (0.035)
    fp32  random codes, 150 tokens:      0.0167 / 1.1705 (0.014)
    bf16  same cases:                    0.0435 (0.037), 0.0193 (0.017)
    left_context=8 instead:              0.110 (0.094), 0.248 (0.212): truncated history is what hurts
A wrong frame offset or noise slice would move the mel by about the noise re-run distance.
"""
from __future__ import annotations

import pytest
import torch

from services.common.chunking import chunk_plan
from services.decoder.runner import DecoderRunner, mel_distance, mel_frames
from tests.decoder.conftest import FIX

BOUND = 0.1
RANDOM_TOKENS = 150          # this test's own long segment (random codes), under the runner's cap


@pytest.fixture(scope="module")
def runner(fixtures):
    fixtures.require(FIX)
    return DecoderRunner(fixtures.model_config, fixtures.load(FIX, "weights.safetensors"))


def _case(fixtures, name):
    if name == "fixture_a":
        return fixtures.load(FIX, "inputs.safetensors")["codes_single"]
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randint(0, k, (RANDOM_TOKENS,), generator=g)
                        for k in fixtures.model_config.audio.codebook_sizes], 1)


def _plan_args(name: str, tokens: int) -> dict:
    """The chunk plan of a case. The fixture segment's first chunk is a fifth of its length, so
    the plan has at least 3 chunks (first + 2 x first < length) for any segment of 4+ tokens."""
    if name == "fixture_a":
        return dict(first_chunk=max(1, tokens // 5), growth=2.0, max_chunk=tokens)
    return dict(first_chunk=6, growth=2.0, max_chunk=50)       # the runner's default plan


@pytest.mark.parametrize("name", ["fixture_a", "random"])
def test_chunked_close_to_faithful(fixtures, runner, name):
    codes = _case(fixtures, name)
    L, st = codes.shape[0], runner.stride
    assert L <= runner.max_frames
    T, M = mel_frames(L, st), fixtures.model_config.flow.in_channels
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(M, T, generator=g), torch.randn(M, T, generator=g)
    faithful, rerun = runner.decode([codes, codes], noise=[z1, z2])
    args = _plan_args(name, L)
    pieces = list(runner.iter_chunked(codes, noise=z1, **args))
    plan = chunk_plan(L, **args)
    assert len(plan) >= min(3, L - 1), f"plan {plan} does not chunk the segment"
    assert len(pieces) == len(plan)
    # piece k covers frames [4s-1, 4e-1) (the first from 0): lengths add up to 4L-1
    assert [p.shape[1] for p in pieces] == [mel_frames(e, st) - (0 if k == 0 else st * s - 1)
                                            for k, (s, e) in enumerate(plan)]
    chunked = torch.cat(pieces, dim=1)
    assert torch.equal(chunked, runner.decode_chunked(codes, noise=z1, **args))      # same ops, same data
    d_chunk, d_noise = mel_distance(chunked, faithful), mel_distance(rerun, faithful)
    print(f"{name}: chunked vs faithful {d_chunk:.4f}, noise re-run {d_noise:.4f}, ratio {d_chunk / d_noise:.3f}")
    assert d_chunk < BOUND * d_noise, f"chunked MAE {d_chunk:.4f} >= {BOUND} x re-run MAE {d_noise:.4f}"


def test_single_chunk_is_faithful(fixtures, runner):
    """A plan with one chunk is faithful decoding itself (the same ops on the same data: exact)."""
    codes = _case(fixtures, "fixture_a")
    L = codes.shape[0]
    (faithful,) = runner.decode([codes], seed=5)
    assert torch.equal(runner.decode_chunked(codes, first_chunk=L, max_chunk=L, seed=5), faithful)


def test_bounded_left_context(fixtures, runner):
    """left_context bounds the window: frame 4s-1 still comes from a window starting before s."""
    codes = _case(fixtures, "fixture_a")
    L = codes.shape[0]
    mel = runner.decode_chunked(codes, left_context=1, seed=2, **_plan_args("fixture_a", L))
    assert mel.shape == (fixtures.model_config.flow.in_channels, mel_frames(L, runner.stride))
    with pytest.raises(ValueError, match="left_context"):
        runner.decode_chunked(codes, left_context=0)
