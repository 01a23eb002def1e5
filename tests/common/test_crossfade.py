"""The reference segment join (§11.4): a 240-sample crossfade block inserted between segments."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common.crossfade import StreamJoiner, crossfade_samples, join_segments


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


def test_join_skips_the_block_next_to_a_short_segment():
    a, short, c = torch.ones(300), torch.full((240,), 2.0), torch.full((241,), 3.0)
    out = join_segments([a, short, c], 240)
    assert torch.equal(out, torch.cat([a, short, c]))                            # 240 is not > 240
    out = join_segments([a, c], 240)
    assert out.shape == (300 + 240 + 241,)


def test_join_keeps_leading_dims():
    a, b = torch.randn(1, 500), torch.randn(1, 600)
    assert join_segments([a, b], 240).shape == (1, 1340)


@pytest.mark.parametrize("lengths", [(1000, 500, 2000), (241, 100, 900, 240, 241, 3000), (5000,), (10, 20)])
def test_stream_equals_batch_join(lengths):
    gen = torch.Generator().manual_seed(len(lengths))
    segs = [torch.randn(n, generator=gen) for n in lengths]
    joiner = StreamJoiner(240)
    pieces = []
    for s in segs:
        out = joiner.push(s)
        # Everything of this segment is final at once: the emitted chunk ends with it.
        assert torch.equal(out[-s.shape[0]:], s)
        pieces.append(out)
    pieces.append(joiner.finish())
    assert torch.equal(torch.cat(pieces), join_segments(segs, 240))


def test_stream_joiner_resets_after_finish():
    j = StreamJoiner(240)
    j.push(torch.ones(500))
    j.finish()
    assert torch.equal(j.push(torch.ones(500)), torch.ones(500))                 # no block from the old stream
