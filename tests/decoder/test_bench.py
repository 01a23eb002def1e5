"""The benchmark's configs build, its random state dict loads strictly, and it reports an RTF."""
from __future__ import annotations

from services.decoder.bench import SIZES, bench_decoder, decoder_config


def test_bench_runs_on_cpu(capsys):
    rows = bench_decoder(decoder_config("mid"), batch_sizes=(1, 2), frames=4, device="cpu", repeats=1, warmup=0)
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["rtf"] > 0 and r["audio_s"] == r["batch"] * 15 * 0.02 for r in rows)
    assert "RTF" in capsys.readouterr().out


def test_real_config_has_the_reference_dimensions():
    c = decoder_config("real")
    assert (c.audio.d_model, c.audio.decoder_layers, c.audio.decoder_attention_heads, c.audio.decoder_ffn_dim) \
        == (1280, 8, 20, 5120)
    f = c.flow
    assert (f.prenet_d_model, f.prenet_attention_heads, f.prenet_nlayers, f.channels, f.n_blocks,
            f.num_mid_blocks, f.num_heads, f.attention_head_dim) == (512, 8, 12, (256,), 4, 12, 8, 64)
    assert set(SIZES) == {"real", "mid"}
