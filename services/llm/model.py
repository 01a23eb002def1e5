"""The audio LLM: a Qwen2.5-shaped decoder with audio embeddings and an audio head
(reference-model.md §6, §7; corrections 3 and 15).

    ids ─embed_tokens─┐
    codes ─Σ_k audio_embed_layers[k]─ replaces every audio_pad row ─► layers × N ─► norm ─► hidden
                                                                       hidden ─lm_head─► text logits
                                                                       hidden[-1] ─audio_head─► 8 codes

State dict keys are the checkpoint's `model.*`, `lm_head.*`, `audio_head.*` (the unused
audio-head linear biases are not declared; the loader skips them).

Numerics follow the reference as run on torch 2.11 (the golden fixtures):
- RMSNorm (services.common.layers): variance in fp32, the normalised value cast to the weight
  dtype, then × weight.
- RoPE: rotate-half, fp32 cos/sin of *1-based* positions, q/k upcast, rotated, cast back.
- Attention: SDPA's math kernel, which upcasts to fp32 and scales q and k each by
  sqrt(1/sqrt(head_dim)) (correction 3); on CUDA the same fp32 math is done without fp32
  copies of the cache (within 1 bf16 ulp of it). `attn_impl="sdpa"` uses the fused kernels
  in the model dtype instead (faster on a GPU; differs by bf16 rounding of the probabilities).

The KV cache is a paged, preallocated `KVCache`; `forward` writes the new keys/values
into each row's slot (its blocks) and attends causally to that slot. No host synchronisation happens
in `forward`, so a decode step (T = 1) can be compiled or captured in a CUDA graph.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from services.common.checkpoint import PREFIX, Checkpoint, LoadReport, load_state
from services.common.layers import RMSNorm
from services.common.model_config import ModelConfig, check_llm_supported
from services.llm.audio_head import AudioHead
from services.llm.kv_cache import KVCache, Where


# ---------------------------------------------------------------------- RoPE
def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin (B, 1, T, head_dim) for integer positions (B, T), rotate-half layout.

    Same expressions as the reference table (inv_freq = 1/base^(2j/d), freqs = pos·inv_freq),
    evaluated per position instead of from a precomputed table, so no length limit."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq            # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)                     # (B, T, d)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, d) in any dtype -> rotated in fp32 -> back to x.dtype."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rot = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + rot * sin).to(x.dtype)


# ---------------------------------------------------------------------- attention
def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., m, k) @ (..., k, n) of bf16/fp16 tensors with an fp32 result (CUDA): the products
    are exact in fp32 and the GEMM accumulates in fp32, so no fp32 copy of K or V is needed."""
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
    return out.view(*a.shape[:-2], a.shape[-2], b.shape[-1])


def _attention_math_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """attention_math for half-precision CUDA tensors, without fp32 copies of the cache.

    Scores: bf16 GEMM with fp32 output, scaled once by 1/sqrt(d) (the reference scales q and
    k by sqrt of it first: the two differ by fp32 rounding, ~1e-7 relative). P·V: P in fp32 is
    split into bf16 hi + lo parts, each multiplied with fp32 output and summed (P kept to
    ~2^-17 relative, far below the bf16 rounding of the result)."""
    B, H, T, d = q.shape
    kvh, L = k.shape[1], k.shape[2]
    g = H // kvh
    k, v = k.to(q.dtype), v.to(q.dtype)
    att = _bmm_f32(q.reshape(B, kvh, g * T, d), k.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    att = att.view(B, kvh, g, T, L).masked_fill(~mask[:, None, None], float("-inf"))
    p = att.softmax(dim=-1).view(B, kvh, g * T, L)    # fp32
    hi = p.to(q.dtype)
    lo = (p - hi.float()).to(q.dtype)
    y = _bmm_f32(hi, v) + _bmm_f32(lo, v)             # (B, KVH, g·T, d) fp32
    return y.view(B, H, T, d).to(q.dtype)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference attention numerics (correction 3).

    q (B, H, T, d); k, v (B, KVH, L, d); mask Bool[B, T, L], True = may attend.
    Each KV head serves H/KVH consecutive query heads (the reference's repeat_kv); the
    group is folded into the rows of one matmul instead of repeating K and V.
    Half-precision CUDA inputs take `_attention_math_cuda` (same fp32 math, no fp32 copies)."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return _attention_math_cuda(q, k, v, mask)
    B, H, T, d = q.shape
    kvh, L = k.shape[1], k.shape[2]
    g = H // kvh
    s = math.sqrt(1.0 / math.sqrt(d))                 # SDPA math scales q and k by sqrt(scale)
    # one fp32 copy each, scaled in place (the same two roundings as upcast-then-multiply)
    q32 = q.to(torch.float32, copy=True).mul_(s).reshape(B, kvh, g * T, d)   # (B, KVH, g·T, d)
    k32 = k.to(torch.float32, copy=True).mul_(s)
    att = q32 @ k32.transpose(-1, -2)                 # (B, KVH, g·T, L) fp32
    att = att.view(B, kvh, g, T, L).masked_fill(~mask[:, None, None], float("-inf"))
    att = att.softmax(dim=-1).view(B, kvh, g * T, L)
    y = att @ v.float()                               # (B, KVH, g·T, d)
    return y.view(B, H, T, d).to(q.dtype)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fused attention in the model dtype (any SDPA backend that takes a mask)."""
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None],
                                          enable_gqa=True)


ATTENTION: dict[str, Callable[..., torch.Tensor]] = {"math": attention_math, "sdpa": attention_sdpa}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.llm
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        if self.n_heads % self.n_kv:
            raise ValueError(f"config.json: num_attention_heads {self.n_heads} is not a multiple of "
                             f"num_key_value_heads {self.n_kv}")
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        self.W_pack = nn.Linear(c.hidden_size, q_dim + 2 * kv_dim, bias=True)   # [q | k | v]
        self.o_proj = nn.Linear(q_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                layer: int, slots: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None,
                mask: torch.Tensor, kv_len: int, attend: Callable[..., torch.Tensor], at: Where) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.W_pack(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)    # (B, H, T, d)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)       # (B, KVH, T, d)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        # q and k heads rotated in one pass: half the kernels of two calls, the same numbers
        q, k = apply_rope(torch.cat((q, k), dim=1), cos, sin).split((self.n_heads, self.n_kv), dim=1)
        cache.write(layer, slots, index, k, v, valid, at=at)
        # fused SDPA takes the gathered blocks as strided views; the math path keeps the
        # reference's layout (its matmuls are then the same calls as the reference's)
        k_all, v_all = cache.read(layer, slots, kv_len, contiguous=attend is not attention_sdpa, at=at)   # (B, KVH, L, d)
        y = attend(q, k_all, v_all, mask)                                # (B, H, T, d)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, f = cfg.llm.hidden_size, cfg.llm.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.llm.hidden_size, cfg.llm.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.llm.hidden_size, cfg.llm.rms_norm_eps)

    def forward(self, x: torch.Tensor, *attn_args) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), *attn_args)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The reference `OmniModel` (prefix `model.`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.llm
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        # table k has K_k + 1 rows: the last one is the end-of-audio code (§6.2)
        self.audio_embed_layers = nn.ModuleList(nn.Embedding(K + 1, c.hidden_size)
                                                for K in cfg.audio.codebook_sizes)


class AudioLLM(nn.Module):
    """Backbone + lm_head + audio head. Build in fp32, load, then `.to(dtype)`."""

    def __init__(self, cfg: ModelConfig, attn_impl: str = "math"):
        super().__init__()
        check_llm_supported(cfg.raw)
        if attn_impl not in ATTENTION:
            raise ValueError(f"attn_impl must be one of {sorted(ATTENTION)}, not {attn_impl!r}")
        self.cfg = cfg
        self.attn_impl = attn_impl
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.llm.hidden_size, cfg.llm.vocab_size, bias=False)
        self.audio_head = AudioHead(cfg)

    # ------------------------------------------------------------------ loading
    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> LoadReport:
        """Strict load from full checkpoint keys (model.*, lm_head.*, audio_head.*); other
        stages' keys in `tensors` are ignored."""
        mine = (PREFIX["llm"], PREFIX["lm_head"], PREFIX["audio_head"])
        return load_state(self, {k: t for k, t in tensors.items() if k.startswith(mine)}, "",
                          source=source)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str = "cpu", attn_impl: str = "math") -> "AudioLLM":
        m = cls(ckpt.config, attn_impl=attn_impl)
        m.load_tensors(ckpt.tensors([PREFIX["llm"], PREFIX["lm_head"], PREFIX["audio_head"]]),
                       source=str(ckpt.path))
        return m.to(device=device, dtype=dtype).eval()

    def new_cache(self, num_slots: int, max_len: int, **kw) -> KVCache:
        """A cache in this model's dtype and device (kw: block_size, num_blocks; see KVCache)."""
        w = self.lm_head.weight
        return KVCache.for_config(self.cfg, num_slots, max_len, dtype=w.dtype, device=w.device, **kw)

    # ------------------------------------------------------------------ embeddings
    def audio_embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Σ_k audio_embed_layers[k](codes[..., k]), summed in the model dtype in order
        k = 0..7 like the reference's `+=` (§6.2). codes Long[..., 8] -> [..., H]."""
        tables = self.model.audio_embed_layers
        if codes.shape[-1] != len(tables):
            raise ValueError(f"audio codes have {codes.shape[-1]} codebooks per frame, "
                             f"the model has {len(tables)}")
        e = tables[0](codes[..., 0])
        for k in range(1, len(tables)):
            e = e + tables[k](codes[..., k])
        return e

    def embed(self, input_ids: torch.Tensor, audio_codes: torch.Tensor | None = None,
              check: bool = True) -> torch.Tensor:
        """Input rows (B, T, H): text embeddings, with every audio_pad row REPLACED by the
        audio embedding of the next code frame, frames consumed in flattened batch-major
        order (§6.2). audio_codes Long[N, 8] or None.

        check=True counts the pads against N (one host sync); a decode step that knows its
        counts passes check=False."""
        x = self.model.embed_tokens(input_ids)                          # (B, T, H)
        pad_id = self.cfg.audio_tokens.audio_pad
        is_pad = input_ids == pad_id
        n = 0 if audio_codes is None else audio_codes.shape[0]
        if check:
            n_pad = int(is_pad.sum())
            if n_pad != n:
                raise ValueError(f"input has {n_pad} audio_pad tokens (id {pad_id}) but {n} audio "
                                 f"code frames were given; they must be equal")
        if n == 0:
            return x
        a = self.audio_embed(audio_codes)                               # (N, H)
        flat = is_pad.flatten()
        row = (flat.cumsum(0) - 1).clamp(0, n - 1)                      # frame index of each pad
        rep = a[row].view_as(x)
        return torch.where(is_pad[..., None], rep, x)

    def embed_decode(self, input_ids: torch.Tensor, row_codes: torch.Tensor) -> torch.Tensor:
        """One token per row (B, 1) -> (B, 1, H); a row whose token is audio_pad is embedded
        from its own frame row_codes[b] (B, 8); other rows' codes are ignored. The same values
        as `embed` with the pads' frames in row order, without its data-dependent gather, so a
        decode step has static shapes."""
        text = self.model.embed_tokens(input_ids)                       # (B, 1, H)
        is_pad = (input_ids == self.cfg.audio_tokens.audio_pad)[..., None]
        return torch.where(is_pad, self.audio_embed(row_codes)[:, None], text)

    # ------------------------------------------------------------------ backbone
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor, cache_pos: torch.Tensor, n_new: torch.Tensor | None = None,
                kv_len: int | None = None) -> torch.Tensor:
        """Run new tokens of B sequences through the decoder.

        embeds (B, T, H); positions Long[B, T]: RoPE positions, 1-based like the reference
        (`attention_mask.cumsum`): the first real token of a sequence has position 1.
        slots Long[B]: each row's cache slot; cache_pos Long[B]: cache index of the row's
        first new token (= tokens already in the slot). n_new Long[B] or None: valid tokens
        per row of a right-padded chunk (the pads leave the slot untouched; their outputs are
        garbage). kv_len: a static bound ≥ max(cache_pos + T) on the attended cache prefix
        (default max_len; smaller is faster). Without n_new every cache_pos + T must be
        ≤ max_len.
        Returns hidden states after the final norm, (B, T, H)."""
        B, T, _ = embeds.shape
        L = cache.max_len if kv_len is None else kv_len
        dev = embeds.device
        t = torch.arange(T, device=dev)
        index = cache_pos[:, None] + t                                  # (B, T) cache index per new token
        valid = None
        if n_new is not None:
            valid = t[None, :] < n_new[:, None]                         # (B, T)
            index = index % cache.max_len                               # pads past the end wrap onto old data, rewritten unchanged
        # causal over the slot: token at cache index i sees cache indices 0..i
        mask = torch.arange(L, device=dev)[None, None, :] <= (cache_pos[:, None] + t)[:, :, None]   # (B, T, L)
        cos, sin = rope_cos_sin(positions, self.cfg.llm.head_dim, self.cfg.llm.rope_theta)
        attend = ATTENTION[self.attn_impl]
        at = cache.locate(slots, index, L)                              # block lookups once, not per layer
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i, slots, index, valid, mask, L, attend, at)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head in the model dtype; callers upcast text logits to fp32 (correction 15)."""
        return self.lm_head(hidden)

    @staticmethod
    def last_hidden(hidden: torch.Tensor, n_new: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) -> (B, H): each row's last valid position (the audio head's input)."""
        if n_new is None:
            return hidden[:, -1]
        idx = (n_new - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]

    # ------------------------------------------------------------------ audio head
    def audio_frame(self, x: torch.Tensor, choose: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One 80 ms frame of codes (B, 8) from last hidden states x (B, H): the audio head's
        incremental path with the shared audio embedding tables."""
        return self.audio_head.frame(x, self.model.audio_embed_layers, choose)
