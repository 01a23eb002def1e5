"""The benchmark runs end to end (tiny config; the real one is timed on a GPU)."""
from __future__ import annotations

from services.common.model_config import HiFTConfig
from services.vocoder.bench import bench_vocoder, random_hift


def test_bench_reports_rtf_per_batch_size(capsys):
    cfg = HiFTConfig(base_channels=16, f0_cond_channels=16)
    res = bench_vocoder(cfg, batch_sizes=(1, 2), seconds=0.1, iters=1, warmup=0)
    assert set(res) == {1, 2}
    assert all(r["rtf"] > 0 and r["throughput"] > 0 for r in res.values())
    assert "batch   2" in capsys.readouterr().out


def test_random_weights_give_finite_audio():
    import torch
    cfg = HiFTConfig(base_channels=16, f0_cond_channels=16)
    m = random_hift(cfg)
    with torch.no_grad():
        wave = m(torch.randn(1, cfg.in_channels, 5) - 5.0, generator=torch.Generator().manual_seed(0))
    assert wave.shape == (1, 5 * cfg.hop_samples) and torch.isfinite(wave).all()
    assert wave.abs().max() <= cfg.audio_limit
