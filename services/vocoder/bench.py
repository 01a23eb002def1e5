"""Vocoder speed with random weights: real-time factor per batch size.

    python -m services.vocoder.bench --device cuda --batch-sizes 1 16 --seconds 10

RTF = wall time of one batched call / seconds of audio per item (< 1 is faster than real time);
throughput = seconds of audio produced per second of wall time, over the whole batch.
The default config is the real vocoder's (base_channels 512).
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from services.common.model_config import HiFTConfig
from services.vocoder.hift import HiFTGenerator, Snake


@torch.no_grad()
def random_hift(config: HiFTConfig, seed: int = 0) -> HiFTGenerator:
    """A generator with weights drawn like the parity fixture's (so activations stay in range)."""
    g = torch.Generator().manual_seed(seed)
    model = HiFTGenerator(config)
    for name, p in model.named_parameters():
        if name.endswith("weight_g"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif isinstance(model.get_submodule(name.rsplit(".", 1)[0]), Snake):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    model.f0_predictor.classifier.weight.mul_(512.0)            # speech-like f0 in Hz
    model.conv_post.weight_g.mul_(0.25)
    return model.eval().fold_weight_norm()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_vocoder(config: HiFTConfig = HiFTConfig(), batch_sizes=(1, 16), seconds: float = 5.0,
                  device: str | torch.device = "cpu", warmup: int = 1, iters: int = 3) -> dict[int, dict[str, float]]:
    """Time `model(mel)` on random mels of `seconds` each; prints and returns {batch: stats}."""
    device = torch.device(device)
    model = random_hift(config).to(device)
    frames = max(1, round(seconds * config.sampling_rate / config.hop_samples))
    audio_s = frames * config.hop_samples / config.sampling_rate
    gen = torch.Generator(device=device).manual_seed(0)
    results = {}
    print(f"HiFT base_channels={config.base_channels} on {device}, {audio_s:.2f} s of audio per item, "
          f"torch threads {torch.get_num_threads()}")
    with torch.inference_mode():
        for b in batch_sizes:
            mel = torch.randn(b, config.in_channels, frames, device=device, generator=gen) - 5.0
            for _ in range(warmup):
                model(mel, generator=gen)
            _sync(device)
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                model(mel, generator=gen)
                _sync(device)
                times.append(time.perf_counter() - t0)
            t = min(times)
            results[b] = {"seconds": t, "rtf": t / audio_s, "throughput": b * audio_s / t}
            print(f"  batch {b:3d}: {t * 1e3:9.1f} ms per call, RTF {t / audio_s:.4f}, "
                  f"{b * audio_s / t:8.1f} s of audio per second")
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--base-channels", type=int, default=HiFTConfig.base_channels,
                    help="smaller for a quick CPU run; the real vocoder has 512")
    args = ap.parse_args(argv)
    cfg = HiFTConfig(base_channels=args.base_channels, f0_cond_channels=args.base_channels)
    bench_vocoder(cfg, tuple(args.batch_sizes), args.seconds, args.device, iters=args.iters)


if __name__ == "__main__":
    main()
