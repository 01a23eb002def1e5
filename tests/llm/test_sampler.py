"""Batched sampler against transformers' own logits processors, row by row (§11.3)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from services.llm import sampler
from services.llm.sampler import CodeHistory, SamplingBatch, SamplingParams, TokenCounts

V = 64
PARAMS = [
    SamplingParams(0.8, 20, 0.85, 1.1),     # spoken first text segment
    SamplingParams(0.3, 20, 0.85, 1.05),    # later text segments
    SamplingParams(0.5, 5, 0.85, 1.3),      # audio frames
    SamplingParams(1.0, 0, 1.0, 1.0),       # everything off
    SamplingParams(0.7, 3, 0.5, 1.2),
    SamplingParams(1.3, 0, 0.9, 1.0),       # top-p only
]


def _scores(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(len(PARAMS), V, generator=g) * 3
    s[:, :4] = s[:, 4:8]                      # ties
    return s.to(dtype)


def _histories(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(n),), generator=g) for n in torch.randint(0, 30, (len(PARAMS),), generator=g)]


def _seen(hist):
    m = torch.zeros(len(hist), V, dtype=torch.bool)
    for i, h in enumerate(hist):
        m[i, h] = True
    return m


def _batch(params, seeds=None, counters=None):
    n = len(params)
    return SamplingBatch.build(params, seeds or [7] * n, counters or [0] * n, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repetition_penalty_matches_hf(dtype):
    scores, hist = _scores(dtype), _histories()
    got = sampler.apply_repetition_penalty(scores, _seen(hist), _batch(PARAMS).penalty)
    for i, p in enumerate(PARAMS):
        want = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(hist[i][None], scores[i:i + 1].clone())
        assert got.dtype == dtype
        assert torch.equal(got[i:i + 1], want), f"row {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_warpers_match_hf(dtype):
    """Temperature, top-k, top-p in HF's order and dtype (bf16 audio logits stay bf16)."""
    scores = _scores(dtype, seed=3)
    got = sampler.warp(scores, _batch(PARAMS))
    for i, p in enumerate(PARAMS):
        want = scores[i:i + 1].clone()
        want = TemperatureLogitsWarper(p.temperature)(None, want)
        if p.top_k:
            want = TopKLogitsWarper(p.top_k)(None, want)
        if p.top_p < 1.0:
            want = TopPLogitsWarper(p.top_p)(None, want)
        assert torch.equal(got[i:i + 1], want), f"row {i}: {p}"


def test_top_p_threshold_rounds_to_bf16():
    """1 - 0.85 is 0.150390625 in bf16: a token whose bf16 cumulative probability is
    0.150390625 is dropped in bf16 (it would be kept against an fp32 threshold of 0.15)."""
    p = torch.tensor([[-1.8984, -0.1631]], dtype=torch.bfloat16)
    out = sampler.apply_top_p(p, torch.tensor([1.0 - 0.85]), torch.tensor([True]))
    want = TopPLogitsWarper(0.85)(None, p.clone())
    assert torch.equal(out, want)
    assert out[0, 0] == float("-inf") and out[0, 1] == p[0, 1]
    cum = p.sort().values.softmax(-1).cumsum(-1)
    assert cum[0, 0].item() == 0.150390625 and not cum[0, 0].float() <= 0.15   # an fp32 cut would keep it


def test_greedy_rows_take_argmax_after_penalty():
    scores, hist = _scores(torch.float32, seed=5), _histories(6)
    params = [p.as_greedy() if i % 2 == 0 else p for i, p in enumerate(PARAMS)]
    ids = sampler.choose(scores, _seen(hist), _batch(params))
    pen = sampler.apply_repetition_penalty(scores, _seen(hist), _batch(params).penalty)
    for i, p in enumerate(params):
        if p.greedy:
            assert ids[i] == pen[i].argmax()


def test_draws_are_batch_invariant_and_deterministic():
    scores = _scores(torch.float32, seed=8)
    seeds, counters = [11, 12, 13, 14, 15, 16], [0, 5, 9, 2, 2, 100]
    batched = sampler.choose(scores, None, _batch(PARAMS, seeds, counters))
    for i in range(len(PARAMS)):
        alone = sampler.choose(scores[i:i + 1], None, _batch(PARAMS[i:i + 1], seeds[i:i + 1], counters[i:i + 1]))
        assert alone.item() == batched[i].item()
    again = sampler.choose(scores, None, _batch(PARAMS, seeds, counters))
    assert torch.equal(again, batched)


def test_draw_distribution_and_filters():
    """Over many counters the draws follow the warped distribution; filtered ids never come."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -30.0]]).repeat(4000, 1)
    p = SamplingParams(1.0, 3, 1.0, 1.0)             # top-3: ids 0..2 only
    batch = SamplingBatch.build([p] * 4000, [3] * 4000, list(range(4000)), "cpu")
    ids = sampler.choose(logits, None, batch)
    assert set(ids.tolist()) <= {0, 1, 2}
    freq = torch.bincount(ids, minlength=6).float() / 4000
    want = logits[0, :3].softmax(-1)
    assert torch.allclose(freq[:3], want, atol=0.03), (freq, want)


def test_uniforms_in_open_interval_and_spread():
    keys = torch.tensor([sampler.draw_key(1, 0), sampler.draw_key(1, 1), sampler.draw_key(2**40 + 5, 123456789)])
    u = sampler.uniforms(keys, 10000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[1], u[2])
    assert abs(torch.corrcoef(u[:2])[0, 1].item()) < 0.05          # consecutive draws look independent


def test_vectorised_draw_keys_equal_the_scalar_hash():
    seeds = [0, 1, 3, 2**40 + 5, 2**63 - 1, 2**64 - 1, -7, 123456789123]
    counters = [0, 1, 10, 2**32 + 3, 2**63, 5, 99, 2**64 - 2]
    keys = sampler.draw_keys(seeds, counters, 3)
    assert keys.dtype == np.int64 and keys.shape == (len(seeds), 3)
    assert keys.tolist() == [[sampler.draw_key(s, c + j) for j in range(3)] for s, c in zip(seeds, counters)]


def test_frame_draws_use_one_key_per_codebook():
    b = SamplingBatch.build(PARAMS[:2], [3, 4], [10, 20], "cpu", draws=8)
    assert b.keys.shape == (2, 8)
    assert b.offset(5).keys[0, 5].item() == sampler.draw_key(3, 15)
    with pytest.raises(IndexError):
        b.offset(8)


def test_exponentials_of_a_frame_equal_each_codebooks_own():
    """The runner makes every codebook's race variates in one call, with the widest codebook's
    columns; each codebook's slice must be exactly what its own draw would have made."""
    b = SamplingBatch.build(PARAMS[:3], [3, 4, 5], [10, 20, 30], "cpu", draws=4)
    sizes = [257, 64, 33, 2]
    e = sampler.exponentials(b.keys, max(sizes))                          # (B, draws, n)
    for k, n in enumerate(sizes):
        assert torch.equal(e[:, k, :n], sampler.exponentials(b.keys[:, k], n))
    probs = torch.rand(3, sizes[1]).softmax(-1)
    assert torch.equal(sampler.draw(probs, b.keys[:, 1], e[:, 1]), sampler.draw(probs, b.keys[:, 1]))


def test_token_counts_follow_overwrites():
    c = TokenCounts(2, V)
    c.reset(1, [5, 5, 7])
    c.add(torch.tensor([1, 1]), torch.tensor([9, 5]))
    assert c.counts[1, 5] == 3 and c.counts[1, 9] == 1
    c.replace(1, 9, 11)                               # a host write 9 -> 11
    seen = c.seen(torch.tensor([1, 0]))
    assert seen[0, 11] and not seen[0, 9] and seen[0, 5] and seen[0, 7]
    assert not seen[1].any()


def test_code_history_is_per_codebook_and_clears():
    h = CodeHistory(3, [8, 4, 4])
    h.add(torch.tensor([2, 0]), torch.tensor([[8, 3, 1], [1, 1, 1]]))
    assert h.seen(torch.tensor([2]), 0, 9)[0, 8] and h.seen(torch.tensor([2]), 1, 4)[0, 3]
    assert not h.seen(torch.tensor([2]), 1, 4)[0, 1]
    h.clear(torch.tensor([2]))
    assert not h.mask[2].any() and h.mask[0].any()


def test_params_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
