"""What the LLM-stage benchmarks share: model configurations at real or CPU-sized dimensions,
random weights, and the reference-style decode loop that the ratios are taken against.

The serving engine is timed by services/llm/bench_engine.py (`baichuan-audio bench llm`);
the reference-style loop here has the reference's structure over the same weights: per-layer
K/V grown with torch.cat every step, SDPA math attention, the whole audio head re-run for each
codebook (`AudioHead.forward_full`), logits copied to the host and sampled there.

Only torch and the model code are imported (the GPU machine has no ray/redis/soundfile)."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from services.common.model_config import ModelConfig
from services.llm.model import ATTENTION, AudioLLM, apply_rope, rope_cos_sin

# ---------------------------------------------------------------------------- configs
# Real dimensions: Qwen2.5-7B backbone (reference-model.md §2.2, §6) and the 3-layer audio
# head over the 8 codebooks (§7). "cpu" keeps the same structure at a size 2 cores can run.
PRESETS: dict[str, dict] = {
    "qwen7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   head_dim=128, intermediate_size=18944, vocab_size=152064,
                   codebook_sizes=(8192, 4096, 2048, 1024, 1024, 1024, 1024, 1024),
                   audio_head_transformer_layers=3),
    "cpu": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=64, intermediate_size=704, vocab_size=8192,
                codebook_sizes=(1024, 512, 256, 128, 128, 128, 128, 128),
                audio_head_transformer_layers=3),
}

_AUDIO_TOKENS = ("audio_start", "audio_end", "audio_pad", "audio_delim", "audiotext_start",
                 "audiotext_end", "audiotext_pad", "audiogen_start", "audiogen_end")


def synthetic_config(hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                     num_key_value_heads: int, head_dim: int, intermediate_size: int, vocab_size: int,
                     codebook_sizes=(8192, 4096, 2048, 1024, 1024, 1024, 1024, 1024),
                     audio_head_transformer_layers: int = 3, rope_theta: float = 1e6,
                     audio_token_ids: dict | None = None) -> ModelConfig:
    """A complete config.json dict with the given LLM/head dimensions (the other stages get
    small placeholder values) -> ModelConfig. Audio special ids: `audio_token_ids`
    ({"audio_start_token_id": ..., ...}) or the last ids of the vocab."""
    if vocab_size < 64:
        raise ValueError(f"vocab_size {vocab_size} is too small to hold the audio special tokens")
    audio = dict(audio_token_ids or {f"{n}_token_id": vocab_size - 32 + i for i, n in enumerate(_AUDIO_TOKENS)})
    audio.update(audio_head_transformer_layers=audio_head_transformer_layers, avg_pooler=4, d_model=64,
                 encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                 decoder_attention_heads=2, decoder_ffn_dim=64, decoder_kernel_size=3, num_mel_bins=128,
                 n_fft=400, hop_length=160, sampling_rate=16000, max_audio_seconds=30,
                 vq_config={"enable": True, "codebook_sizes": list(codebook_sizes)})
    flow = dict(prenet_in_dim=64, prenet_out_dim=80, prenet_d_model=32, prenet_attention_heads=2,
                prenet_ffn_dim=64, prenet_nlayers=1, in_channels=80, channels=[32], attention_head_dim=16,
                n_blocks=1, num_mid_blocks=1, num_heads=2)
    d = dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
             num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
             head_dim=head_dim, intermediate_size=intermediate_size, vocab_size=vocab_size,
             rms_norm_eps=1e-6, rope_theta=rope_theta, audio_config=audio, flow_matching_config=flow,
             vocoder_config={"num_mel_bins": 80, "channels": [32]})
    return ModelConfig.from_dict(d)


# ---------------------------------------------------------------------------- sampling
TEXT = dict(temperature=0.8, top_k=20, top_p=0.85)     # §11.3, first text segment
AUDIO = dict(temperature=0.5, top_k=5, top_p=0.85)     # §11.3, audio frames


def host_sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The HF processors (temperature, top-k, top-p over the sorted vocabulary) and
    multinomial, on the host. logits: a CPU tensor (B, V) -> Long[B] on the CPU."""
    x = logits.float() / temperature
    kth = x.topk(top_k, dim=-1).values[:, -1:]
    x = x.masked_fill(x < kth, float("-inf"))
    asc, idx = x.sort(dim=-1)
    drop = asc.softmax(-1).cumsum(-1) <= 1.0 - top_p
    drop[:, -1] = False
    x = x.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return torch.multinomial(x.softmax(-1), 1)[:, 0]


# ---------------------------------------------------------------------------- reference-style step
class ReferenceStyle:
    """The reference's decode structure over the same weights: legacy per-layer (k, v)
    tensors grown with torch.cat, repeat_kv, SDPA math with an additive mask, all-position
    lm_head, the head re-run in full for each codebook, sampling on the host."""

    def __init__(self, model: AudioLLM, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.m, self.past = model, past

    def backbone(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        m, c = self.m, self.m.cfg.llm
        B, T, _ = embeds.shape
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)
        x = embeds
        S = self.past[0][0].shape[2] + T
        mask = torch.zeros(B, 1, T, S, dtype=x.dtype, device=x.device)   # all-ones attention mask, 4-D additive
        new_past = []
        for i, layer in enumerate(m.model.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = a.W_pack(h).split(a.split, dim=-1)
            q = q.view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
            k = k.view(B, T, a.n_kv, a.head_dim).transpose(1, 2)
            v = v.view(B, T, a.n_kv, a.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k = torch.cat([self.past[i][0], k], dim=2)
            v = torch.cat([self.past[i][1], v], dim=2)
            new_past.append((k, v))
            rep = a.n_heads // a.n_kv
            kr = k[:, :, None].expand(B, a.n_kv, rep, S, a.head_dim).reshape(B, a.n_heads, S, a.head_dim)
            vr = v[:, :, None].expand(B, a.n_kv, rep, S, a.head_dim).reshape(B, a.n_heads, S, a.head_dim)
            with _math_sdpa():
                y = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
            x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.past = new_past
        return m.model.norm(x)

    def embed(self, ids: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """embed_tokens, then the reference's mask arithmetic to replace the pad rows."""
        m = self.m
        x = m.model.embed_tokens(ids)
        if codes is None:
            return x
        pad = (ids == m.cfg.audio_tokens.audio_pad)
        a = m.audio_embed(codes)
        row = torch.where(pad, pad.view(-1).long().cumsum(0).view(ids.shape) - 1, ids)
        mm = F.embedding(row * pad, a) * pad.to(a.dtype)[..., None]
        return mm + (1 - pad.to(x.dtype))[..., None] * x

    def text_step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.backbone(self.embed(ids, None), positions)
        logits = self.m.logits(h)[:, -1].float()
        return host_sample(logits.cpu(), **TEXT).to(ids.device)

    def audio_step(self, ids: torch.Tensor, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.backbone(self.embed(ids, codes), positions)
        x = h[:, -1]
        self.m.logits(h)                                                  # the reference computes them too
        head, tables = self.m.audio_head, self.m.model.audio_embed_layers
        t = torch.zeros(x.shape[0], head.depth, dtype=torch.long, device=x.device)
        for k in range(head.depth):
            logits = head.forward_full(x, t, tables)[k]
            if k > 0:
                logits = logits[:, :-1]
            t[:, k] = host_sample(logits.cpu(), **AUDIO).to(x.device)
        return t


@contextlib.contextmanager
def _math_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        yield


# ---------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[int], object], warmup: int, steps: int, device: torch.device) -> float:
    """Mean seconds per call of fn(i), i = the step's index (after the warmup calls)."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        fn(i)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, attn_impl: str, seed: int) -> AudioLLM:
    """Random weights, created directly in the target dtype and device."""
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AudioLLM(cfg, attn_impl=attn_impl)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def reference_steps(model: AudioLLM, B: int, context_len: int, steps: int, warmup: int) -> dict:
    """Mean seconds per text step and per audio frame of the reference-style loop for B
    sequences with context_len tokens cached: {"ref_text_s", "ref_audio_s"}."""
    cfg, dev = model.cfg, model.lm_head.weight.device
    c = cfg.llm
    pad = cfg.audio_tokens.audio_pad
    g = torch.Generator(device=dev).manual_seed(1)
    shape = (B, c.num_key_value_heads, context_len, c.head_dim)
    w = model.lm_head.weight
    past = [(torch.randn(shape, generator=g, device=dev).to(w.dtype),
             torch.randn(shape, generator=g, device=dev).to(w.dtype)) for _ in range(c.num_hidden_layers)]
    ref = ReferenceStyle(model, past)
    state = {"ids": torch.randint(0, c.vocab_size - 64, (B, 1), device=dev, generator=g),
             "codes": torch.zeros(B, len(cfg.audio.codebook_sizes), dtype=torch.long, device=dev)}

    def rtext(i: int) -> None:
        L = ref.past[0][0].shape[2]
        pos = torch.full((B, 1), L + 1, dtype=torch.long, device=dev)
        state["ids"] = ref.text_step(state["ids"], pos)[:, None]

    def raudio(i: int) -> None:
        L = ref.past[0][0].shape[2]
        pos = torch.full((B, 1), L + 1, dtype=torch.long, device=dev)
        state["codes"] = ref.audio_step(torch.full((B, 1), pad, device=dev), state["codes"], pos)

    with torch.inference_mode():
        return {"ref_text_s": _time(rtext, warmup, steps, dev), "ref_audio_s": _time(raudio, warmup, steps, dev)}


@torch.no_grad()
def check_head(model: AudioLLM, batch_sizes=(1, 16), seed: int = 0, print_fn: Callable[[str], None] = print) -> None:
    """On this device and dtype: the fast frame against the full re-run (teacher-forced
    logits and free-running greedy codes), and the cumsum rounding the fast path assumes."""
    head, tables, cfg = model.audio_head, model.model.audio_embed_layers, model.cfg
    w = model.lm_head.weight
    e = torch.randn(64, head.depth - 1, cfg.llm.hidden_size, device=w.device).to(w.dtype)
    same = torch.equal(torch.cumsum(e, 1), torch.cumsum(e.float(), 1).to(w.dtype))
    print_fn(f"# check: {w.device.type} cumsum in {w.dtype} rounds like an fp32-accumulated cumsum: {same}")
    g = torch.Generator(device=w.device).manual_seed(seed)
    c = cfg.llm
    q = torch.randn(8, c.num_attention_heads, 3, c.head_dim, device=w.device, generator=g).to(w.dtype)
    kv = torch.randn(2, 8, c.num_key_value_heads, 1100, c.head_dim, device=w.device, generator=g).to(w.dtype)
    mask = torch.arange(1100, device=w.device)[None, None, :] <= (
        torch.randint(10, 1097, (8, 1, 1), device=w.device, generator=g) + torch.arange(3, device=w.device)[:, None])
    rep = c.num_attention_heads // c.num_key_value_heads
    kf, vf = (t.float().repeat_interleave(rep, 1) for t in kv)
    exact = ((q.float() @ kf.transpose(-1, -2)) / math.sqrt(c.head_dim)).masked_fill(~mask[:, None], float("-inf"))
    exact = (exact.softmax(-1) @ vf).to(w.dtype)
    for name in ("math", "sdpa"):
        d = (ATTENTION[name](q, kv[0], kv[1], mask).float() - exact.float()).abs().max().item()
        print_fn(f"# check: attention '{name}' vs fp32 attention rounded once: max|diff| {d:.3g}")
    for B in batch_sizes:
        x = torch.randn(B, cfg.llm.hidden_size, device=w.device, generator=g).to(w.dtype)
        codes = torch.stack([torch.randint(0, K, (B,), device=w.device, generator=g)
                             for K in cfg.audio.codebook_sizes], 1)
        seen: dict[int, torch.Tensor] = {}

        def record(k: int, logits: torch.Tensor) -> torch.Tensor:
            seen[k] = logits
            return codes[:, k]

        head.frame(x, tables, record)
        t = torch.zeros_like(codes)
        worst = rel = 0.0
        for k in range(head.depth):
            lg = head.forward_full(x, t, tables)[k]
            lg = lg if k == 0 else lg[:, :-1]
            t[:, k] = codes[:, k]
            d = (lg.float() - seen[k].float()).abs().max().item()
            worst, rel = max(worst, d), max(rel, d / max(lg.float().abs().max().item(), 1e-30))
        fast = head.frame(x, tables, lambda k, lg: lg.argmax(-1))
        t = torch.zeros_like(fast)
        for k in range(head.depth):
            lg = head.forward_full(x, t, tables)[k]
            t[:, k] = (lg if k == 0 else lg[:, :-1]).argmax(-1)
        print_fn(f"# check B={B}: fast vs full head, teacher-forced logits max|diff| {worst:.3g} "
                 f"({rel:.2g} of max|logit|); greedy codes equal {(fast == t).float().mean().item():.3f}")
