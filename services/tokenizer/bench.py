"""Tokenizer throughput on random weights and random audio (no checkpoint needed).

  python -m services.tokenizer.bench --config mid  --batch-sizes 1,16 --seconds 10          # CPU
  python -m services.tokenizer.bench --config real --batch-sizes 1,16 --seconds 30 --device cuda

Prints the real-time factor RTF = processing time / audio time per batch size (lower is
faster; the whole batch's audio counts). Imports only torch and model code.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from services.common.model_config import ModelConfig
from services.common.tiny_checkpoint import legacy_vocoder_config, reference_cfm_params
from services.tokenizer.log_mel import encoder_length
from services.tokenizer.runner import TokenizerRunner, default_device_dtype

# reference-model.md §2.2 (Baichuan-Audio-Instruct; the audio token ids of §2.3).
_REAL: dict = {
    "architectures": ["OmniForCausalLM"], "model_type": "omni", "torch_dtype": "bfloat16",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 152064,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 8192,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "audio_config": {
        "audio_head_transformer_layers": 3, "avg_pooler": 4, "d_model": 1280,
        "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
        "decoder_layers": 8, "decoder_attention_heads": 20, "decoder_ffn_dim": 5120,
        "decoder_kernel_size": 3, "decoder_stride_size": 2, "kernel_size": 3, "stride_size": 2,
        "hop_length": 160, "n_fft": 400, "num_mel_bins": 128, "sampling_rate": 16000,
        "max_audio_seconds": 30, "split_overlap": 0.0, "enable": True,
        "vq_config": {"enable": True, "codebook_sizes": [8192, 4096, 2048, 1024, 1024, 1024, 1024, 1024]},
        "audio_start_token_id": 151657, "audio_end_token_id": 151658, "audio_pad_token_id": 151659,
        "audio_delim_token_id": 151674, "audiotext_start_token_id": 151675,
        "audiotext_end_token_id": 151676, "audiotext_pad_token_id": 151677,
        "audiogen_start_token_id": 151678, "audiogen_end_token_id": 151679,
    },
    "flow_matching_config": {
        "enable": True, "use_hires_mel": True, "sampling_rate": 24000, "hop_length": 480,
        "max_audio_seconds": 30, "split_overlap": 0.1, "use_hidden_states_before_dconv2": True,
        "prenet_in_dim": 1280, "prenet_out_dim": 80, "prenet_d_model": 512,
        "prenet_attention_heads": 8, "prenet_ffn_dim": 2048, "prenet_nlayers": 12,
        "prenet_activation_function": "gelu", "prenet_max_source_positions": 5000,
        "prenet_target_mel_length_scale_ratio": 1.0, "in_channels": 80, "spk_emb_dim": 0,
        "diffusion_steps": 10, "channels": [256], "dropout": 0.0, "attention_head_dim": 64,
        "n_blocks": 4, "num_mid_blocks": 12, "num_heads": 8, "act_fn": "gelu",
        "cfm_params": reference_cfm_params(),
    },
    "vocoder_config": legacy_vocoder_config(256),
    "visual_config": {"enable": False}, "video_config": {"enable": False},
}


def real_config() -> dict:
    """The real model's config.json dict (§2.2 values), for GPU runs at full size."""
    return copy.deepcopy(_REAL)


def mid_config() -> dict:
    """A mid-size variant for CPU benchmarks: real front end, codebook sizes and layout; a
    narrower, shallower encoder (d 512, 6 layers, 8 heads, FFN 2048; bridge dim 2048)."""
    d = real_config()
    d["audio_config"].update(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048)
    return d


def bench_tokenizer(config: ModelConfig, batch_sizes=(1, 16), seconds: float = 10.0, device=None,
                    dtype=None, sample_rate: int | None = None, warmup: int = 1, iters: int = 3,
                    seed: int = 0) -> list[dict]:
    """Time TokenizerRunner.tokenize on `batch_size` random clips of `seconds` each.

    sample_rate: of the generated audio (default the model's, so no resampling is timed).
    Returns one dict per batch size and prints a line for each."""
    device, dtype = default_device_dtype(device, dtype)
    torch.manual_seed(seed)
    runner = TokenizerRunner(config, None, device=device, dtype=dtype)
    sr = sample_rate or config.audio.sampling_rate
    n = int(seconds * sr)
    results = []

    for bs in batch_sizes:
        items = [(0.1 * torch.randn(1, n), sr) for _ in range(bs)]
        for _ in range(warmup):
            runner.tokenize(items)
        _sync(device)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            codes = runner.tokenize(items)
            _sync(device)
            times.append(time.perf_counter() - t0)
        best = min(times)
        rtf = best / (bs * seconds)
        r = {"batch_size": bs, "seconds_each": seconds, "tokens_each": int(codes[0].shape[0]),
             "best_s": round(best, 4), "median_s": round(sorted(times)[len(times) // 2], 4),
             "rtf": rtf, "device": str(device), "dtype": str(dtype).replace("torch.", "")}
        if device.type == "cuda":
            r["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        results.append(r)
        print(f"batch {bs:3d} x {seconds:g} s @ {sr} Hz on {device} {r['dtype']}: "
              f"best {best * 1000:.1f} ms, RTF {rtf:.5f} ({1 / rtf:.0f}x real time)", flush=True)
    return results


def stage_breakdown(config: ModelConfig, batch_size: int = 16, seconds: float = 30.0, device=None,
                    dtype=None, iters: int = 5) -> dict:
    """Milliseconds per stage (log-mel, encoder, bridge, RVQ) for batch_size splits of `seconds`."""
    device, dtype = default_device_dtype(device, dtype)
    r = TokenizerRunner(config, None, device=device, dtype=dtype)
    splits = [0.1 * torch.randn(int(seconds * config.audio.sampling_rate), device=device)
              for _ in range(batch_size)]

    def timed(f):
        f()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            y = f()
        _sync(device)
        return (time.perf_counter() - t0) / iters * 1000, y

    with torch.inference_mode():
        t_mel, (feats, mel_len) = timed(lambda: r.log_mel(splits))
        enc_len = encoder_length(mel_len, config.audio)
        t_enc, h = timed(lambda: r.encoder(feats, enc_len, mel_len))
        t_br, x = timed(lambda: r.bridge.downsample(h))
        t_vq, _ = timed(lambda: r.bridge.quantize(x, enc_len // config.audio.avg_pooler))
    out = {"log_mel_ms": t_mel, "encoder_ms": t_enc, "bridge_ms": t_br, "rvq_ms": t_vq}
    print(f"batch {batch_size} x {seconds:g} s on {device}: " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()))
    return out


def check_device(config: ModelConfig, device, seed: int = 0) -> list[dict]:
    """Codes on `device` (fp32 and bf16) against CPU fp32 with the same random weights, and the
    device bf16 batch against one request at a time: fractions of equal codes per request."""
    from services.common.checkpoint import PREFIX

    torch.manual_seed(seed)
    cpu = TokenizerRunner(config, None, device="cpu", dtype=torch.float32)
    sd = {PREFIX["encoder"] + k: v for k, v in cpu.encoder.state_dict().items()}
    sd |= {PREFIX["bridge"] + k: v for k, v in cpu.bridge.state_dict().items()}
    d32 = TokenizerRunner(config, sd, device=device, dtype=torch.float32)
    d16 = TokenizerRunner(config, sd, device=device, dtype=torch.bfloat16)
    items = [(0.1 * torch.randn(1, int(s * sr)), sr) for s, sr in ((3.0, 16000), (7.3, 48000), (1.1, 24000), (31.0, 16000))]
    ref, f32, b16 = cpu.tokenize(items), d32.tokenize(items), d16.tokenize(items)
    solo = [d16.tokenize([it])[0] for it in items]
    same = lambda a, b: round((a == b).float().mean().item(), 4)     # noqa: E731
    res = [{"tokens": int(a.shape[0]), "cpu32_vs_dev32": same(a, b), "cpu32_vs_dev16": same(a, c),
            "dev16_batch_vs_solo": same(c, s)} for a, b, c, s in zip(ref, f32, b16, solo)]
    for r in res:
        print(r, flush=True)
    return res


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mid", help="'mid', 'real' or a config.json path")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--sample-rate", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--breakdown", action="store_true", help="also time each stage")
    p.add_argument("--check", action="store_true", help="compare device codes with CPU fp32 (random weights)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.config == "mid":
        cfg = ModelConfig.from_dict(mid_config())
    elif args.config == "real":
        cfg = ModelConfig.from_dict(real_config())
    else:
        cfg = ModelConfig.from_file(args.config)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    res = bench_tokenizer(cfg, tuple(int(b) for b in args.batch_sizes.split(",")), args.seconds,
                          args.device, dtype, args.sample_rate, iters=args.iters)
    out = {"rtf": res}
    if args.breakdown:
        out["breakdown"] = stage_breakdown(cfg, max(int(b) for b in args.batch_sizes.split(",")), args.seconds,
                                           args.device, dtype, args.iters)
    if args.check:
        out["check"] = check_device(cfg, args.device or "cuda")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
