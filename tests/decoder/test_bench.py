"""The benchmark's configs build, its random state dict loads strictly, and it reports an RTF."""
from __future__ import annotations

import pytest

from services.decoder.bench import SIZES, bench_decoder, decoder_config
from services.decoder.runner import mel_frames


def test_bench_runs_on_cpu(capsys):
    c = decoder_config("mid")
    frames = 4                                              # code frames per segment: this test's choice
    rows = bench_decoder(c, batch_sizes=(1, 2), frames=frames, device="cpu", repeats=1, warmup=0)
    assert [r["batch"] for r in rows] == [1, 2]
    seconds = mel_frames(frames, c.audio.avg_pooler) * c.flow.hop_length / c.flow.sampling_rate
    assert all(r["rtf"] > 0 and r["audio_s"] == pytest.approx(r["batch"] * seconds) for r in rows)
    assert "RTF" in capsys.readouterr().out


def test_real_config_has_the_reference_dimensions():
    """The literals are Baichuan-Audio's published decoder-stage dimensions (reference-model.md §2.2),
    the spec this config must reproduce; no fixture root is involved."""
    c = decoder_config("real")
    assert (c.audio.d_model, c.audio.decoder_layers, c.audio.decoder_attention_heads, c.audio.decoder_ffn_dim) \
        == (1280, 8, 20, 5120)
    f = c.flow
    assert (f.prenet_d_model, f.prenet_attention_heads, f.prenet_nlayers, f.channels, f.n_blocks,
            f.num_mid_blocks, f.num_heads, f.attention_head_dim) == (512, 8, 12, (256,), 4, 12, 8, 64)
    assert set(SIZES) == {"real", "mid"}
