"""Decoder-stage benchmark: real-time factor of codes -> mel with random weights (no checkpoint).

    python -m services.decoder.bench --size mid                      # CPU, fp32
    python -m services.decoder.bench --size real --device cuda       # GPU, bf16

RTF = compute time / audio time of the decoded segments (audio time = (4L-1) frames x hop / sr per
segment), so RTF < 1 is faster than real time. A batch of B segments of L tokens counts B x the audio.
Timed: the whole `DecoderRunner.decode` (RVQ sum + proj_decoder, audio decoder, Pre-Net, 20
estimator calls), after warm-up, with the device synchronised.

At small batches on a GPU the eager decode is launch-bound: one 4 s segment launches about 30k
kernels for 41 ms of GPU work but takes 209 ms (H200, bf16, batch_cfg); torch.compile of the
estimator with CUDA graphs took it to 54 ms.
"""
from __future__ import annotations

import argparse
import time

import torch

from services.common.checkpoint import PREFIX
from services.common.model_config import ModelConfig
from services.decoder.audio_decoder import AudioDecoder
from services.decoder.runner import DecoderRunner, FlowDecoder, mel_frames
from services.common.codebooks import CodeDecoder

# Decoder-stage dimensions (reference-model.md §8, §9). "real" is Baichuan-Audio's; "mid" keeps the
# structure at a size a CPU runs in seconds.
SIZES = {
    "real": dict(d_model=1280, decoder_layers=8, decoder_heads=20, decoder_ffn=5120,
                 codebook_sizes=[8192, 4096, 2048, 1024, 1024, 1024, 1024, 1024],
                 prenet_d=512, prenet_heads=8, prenet_ffn=2048, prenet_layers=12,
                 channels=256, n_blocks=4, mid_blocks=12, heads=8, head_dim=64),
    "mid": dict(d_model=256, decoder_layers=2, decoder_heads=4, decoder_ffn=1024,
                codebook_sizes=[1024, 512, 256, 128, 128, 128, 128, 128],
                prenet_d=128, prenet_heads=2, prenet_ffn=512, prenet_layers=2,
                channels=64, n_blocks=2, mid_blocks=2, heads=2, head_dim=32),
}


def decoder_config(size: str = "mid") -> ModelConfig:
    """A ModelConfig with the decoder stage's dimensions of SIZES[size] (other stages minimal)."""
    s = SIZES[size]
    ids = dict(zip(["audio_start", "audio_end", "audio_pad", "audio_delim", "audiotext_start",
                    "audiotext_end", "audiotext_pad", "audiogen_start", "audiogen_end"],
                   [151657, 151658, 151659, 151674, 151675, 151676, 151677, 151678, 151679]))
    return ModelConfig.from_dict({
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 1,
        "vocab_size": 152064,
        "audio_config": {
            "d_model": s["d_model"], "encoder_layers": 1, "encoder_attention_heads": s["decoder_heads"],
            "encoder_ffn_dim": s["decoder_ffn"], "decoder_layers": s["decoder_layers"],
            "decoder_attention_heads": s["decoder_heads"], "decoder_ffn_dim": s["decoder_ffn"],
            "decoder_kernel_size": 3, "avg_pooler": 4, "num_mel_bins": 128, "n_fft": 400,
            "hop_length": 160, "sampling_rate": 16000, "max_audio_seconds": 30,
            "audio_head_transformer_layers": 3, "vq_config": {"codebook_sizes": s["codebook_sizes"]},
            **{f"{k}_token_id": v for k, v in ids.items()},
        },
        "flow_matching_config": {
            "prenet_in_dim": s["d_model"], "prenet_out_dim": 80, "prenet_d_model": s["prenet_d"],
            "prenet_attention_heads": s["prenet_heads"], "prenet_ffn_dim": s["prenet_ffn"],
            "prenet_nlayers": s["prenet_layers"], "in_channels": 80, "channels": [s["channels"]],
            "attention_head_dim": s["head_dim"], "n_blocks": s["n_blocks"],
            "num_mid_blocks": s["mid_blocks"], "num_heads": s["heads"],
            "cfm_params": {"inference_cfg_rate": 0.7},
        },
        "vocoder_config": {"num_mel_bins": 80, "channels": [256] * 5},
    })


def random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The decoder stage's state dict (reference keys) with PyTorch's default random init."""
    torch.manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for module, prefix in ((CodeDecoder(config.audio), PREFIX["bridge"]),
                           (AudioDecoder(config), PREFIX["audio_decoder"]),
                           (FlowDecoder(config), PREFIX["flow"])):
        out.update({prefix + k: v for k, v in module.state_dict().items()})
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_decoder(config: ModelConfig, batch_sizes=(1, 16), frames: int = 50, device=None, dtype=None,
                  repeats: int = 3, warmup: int = 1, batch_cfg: bool | None = None,
                  cuda_graphs: bool | None = None) -> list[dict]:
    """Time decode() of B random segments of `frames` code frames each, for each B; prints and
    returns one row per batch size: batch, frames, compute_s (mean of `repeats`), audio_s, rtf."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = DecoderRunner(config, random_tensors(config), device=device, dtype=dtype,
                        max_batch=max(batch_sizes), batch_cfg=batch_cfg, cuda_graphs=cuda_graphs)
    f = config.flow
    hop_s = f.hop_length / f.sampling_rate
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"decoder bench: {device} {run.dtype} d_model {config.audio.d_model}, {frames} code frames "
          f"({mel_frames(frames, run.stride) * hop_s:.2f} s) per segment, batch_cfg={run.batch_cfg}, "
          f"cuda_graphs={run.graphs.enabled}")
    for B in batch_sizes:
        segs = [torch.stack([torch.randint(0, k, (frames,), generator=g) for k in config.audio.codebook_sizes], 1)
                for _ in range(B)]
        for _ in range(warmup):
            run.decode(segs, seed=0)
        _sync(device)
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            run.decode(segs, seed=r)
            _sync(device)
            times.append(time.perf_counter() - t0)
        compute = sum(times) / len(times)
        audio = B * mel_frames(frames, run.stride) * hop_s
        row = dict(batch=B, frames=frames, compute_s=compute, audio_s=audio, rtf=compute / audio)
        rows.append(row)
        print(f"  batch {B:3d}: {compute * 1000:9.1f} ms for {audio:7.2f} s of audio  RTF {compute / audio:.4f}")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="mid")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--frames", type=int, default=50, help="code frames per segment (12.5 per second)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-cfg", choices=["on", "off"], default=None,
                   help="cond + uncond CFG branches as one call (default: on for CUDA, as served)")
    a = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[a.dtype]
    cuda = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    rows = {}
    for graphs in ((True, False) if cuda else (False,)):   # on CUDA: the graphed solve and the eager one
        rows[graphs] = bench_decoder(decoder_config(a.size), a.batch_sizes, a.frames, a.device, dtype, a.repeats,
                                     batch_cfg=None if a.batch_cfg is None else a.batch_cfg == "on",
                                     cuda_graphs=graphs)
    if cuda:
        for g, e in zip(rows[True], rows[False]):
            print(f"  batch {g['batch']:3d}: CUDA graphs {e['compute_s'] / g['compute_s']:.1f}x faster than eager")


if __name__ == "__main__":
    main()
