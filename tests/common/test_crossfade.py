"""The reference segment join (§11.4): a 240-sample crossfade block inserted between segments."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common.crossfade import crossfade_samples, join_segments


def test_overlap_is_ten_ms():
    assert crossfade_samples(24000) == 240
    assert crossfade_samples(16000) == 160


def test_join_inserts_the_block_written_out():
    a = torch.linspace(-0.5, 0.5, 1000)
    b = torch.full((500,), 0.25)
    out = join_segments([a, b], 240)
    assert out.shape == (1000 + 240 + 500,)
    ramp = np.linspace(0.0, 1.0, 240)
    x = a[-240:].numpy() * ramp[::-1] + b[:240].numpy() * ramp                     # written from §11.4
    np.testing.assert_array_equal(out[:1000].numpy(), a.numpy())                  # A unchanged
    np.testing.assert_allclose(out[1000:1240].numpy(), x, rtol=0, atol=1e-7)     # X inserted
    np.testing.assert_array_equal(out[1240:].numpy(), b.numpy())                  # B unchanged
    assert out[1000].item() == a[-240].item() and out[1239].item() == b[239].item()


def reference_join(waves: list[torch.Tensor], overlap: int) -> torch.Tensor:
    """The demos' join of (1, N) float32 waves as reference-model.md §11.4 states it: each wave
    after the block X = prev[:, -o:]·linspace(1, 0, o) + wave[:, :o]·linspace(0, 1, o), when both
    are longer than o, in torch's default dtype and this order of operations."""
    out = []
    for k, w in enumerate(waves):
        if k and waves[k - 1].shape[1] > overlap and w.shape[1] > overlap:
            out.append(waves[k - 1][:, -overlap:] * torch.linspace(1.0, 0.0, overlap)[None, :]
                       + w[:, :overlap] * torch.linspace(0.0, 1.0, overlap)[None, :])
        out.append(w)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("lengths", [(1000, 500, 2000), (241, 100, 900, 240, 241, 3000), (4800, 4800)])
def test_one_join_is_the_reference_join_bit_for_bit(lengths):
    """The join (its `crossfade_block` is the reply merger's) equals the reference's float32 join
    exactly; tests/orchestrator/test_merge.py holds the merger's output to this join."""
    gen = torch.Generator().manual_seed(sum(lengths))
    waves = [torch.rand(1, n, generator=gen) * 1.8 - 0.9 for n in lengths]
    expected = reference_join(waves, 240)
    assert torch.equal(join_segments(waves, 240), expected)


def test_join_skips_the_block_next_to_a_short_segment():
    a, short, c = torch.ones(300), torch.full((240,), 2.0), torch.full((241,), 3.0)
    out = join_segments([a, short, c], 240)
    assert torch.equal(out, torch.cat([a, short, c]))                            # 240 is not > 240
    out = join_segments([a, c], 240)
    assert out.shape == (300 + 240 + 241,)


def test_join_keeps_leading_dims():
    a, b = torch.randn(1, 500), torch.randn(1, 600)
    assert join_segments([a, b], 240).shape == (1, 1340)
