"""Model layers that more than one stage is made of (plain PyTorch; reference-model.md §4-§9).

- `RMSNorm`: the LLM (§6), the audio head (§7) and the Pre-Net (§9.1).
- `sinusoids`: the Whisper positional table of the encoder (§4) and the audio decoder (§8),
  and the values of the checkpoints' stored `positional_embedding` buffers.
- `length_mask`: right-padded batches -> valid-frame masks.
- `WhisperAttention` / `WhisperLayer`: the Whisper-style pre-norm layer of the encoder
  (bidirectional within each sample), the audio decoder (causal) and the Pre-Net (causal,
  RMSNorm). State-dict keys are the reference's `OmniWhisperTransformerLayer` keys.

Each docstring states the numerics; they are those of the golden fixtures, bit for bit in fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """w ⊙ cast_w( x · rsqrt(mean(x²) + eps) ): variance and normalisation in fp32, the normalised
    value rounded to the weight dtype, then scaled in the weight dtype (the reference's RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(self.weight.dtype)


def sinusoids(length: int, channels: int, dtype: torch.dtype = torch.float32,
              max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper table (length, channels) = [sin(t·inv) | cos(t·inv)], inv_k = exp(-k·ln(max)/(C/2 - 1)).

    `dtype` is the arithmetic dtype, as the reference's init runs under the default dtype it is
    loaded with: fp32 gives the stored tables of the fixtures and real checkpoints bit for bit;
    bf16 is what a bf16-loaded reference holds when the checkpoint lacks the buffer (§12 item 16),
    and it is very different (errors of order 1 at large t; max |diff| 2.0 over 1500 rows)."""
    if channels % 2:
        raise ValueError(f"sinusoid table needs an even width, got {channels}")
    inc = math.log(max_timescale) / (channels // 2 - 1)
    # The reference multiplies int64 aranges by float values under its default dtype; type
    # promotion casts the integers to that dtype first, then each product is rounded.
    inv = torch.exp(torch.arange(channels // 2).to(dtype) * -inc)            # (C/2,)
    scaled = torch.arange(length)[:, None].to(dtype) * inv[None, :]          # (L, C/2)
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """lengths (B,) -> Bool (B, max_len), True on each row's first `lengths[b]` frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class WhisperAttention(nn.Module):
    """Whisper self-attention: q/v/out projections with bias, k without; scale 1/sqrt(head_dim).

    causal: query i sees keys j <= i. `forward(x, key_valid)` with key_valid Bool (B, T) also
    masks the keys outside each sample (the reference packs the samples for flash-attn varlen;
    here the batch stays padded). Without key_valid a causal layer relies on right padding: a
    sample's valid positions never see its padding, and the caller discards the padded rows.

    fp32: the attention arithmetic in half precision (no effect on fp32 activations):
    - False (encoder, §4): SDPA on q, k, v in the activation dtype (the backend's own
      half-precision kernel); fixture 02's bf16 encoder_out within 0.03125.
    - True (audio decoder §8, Pre-Net §9.1): q, k, v upcast to fp32, scores, softmax and P·V in
      fp32, the output cast back to the activation dtype: the reference's varlen kernel. Fixture
      04's bf16 margins need it (False moves them, e.g. the Pre-Net's mu from exact to 0.03125).
    Measured on torch 2.11 CPU: True would also make the encoder's bf16 encoder_out bit-exact
    (0.03125 -> 0) at no fp32 cost; the encoder keeps False so that this refactor changes no
    numbers (switching it costs fp32 copies of q/k/v on the GPU).
    """

    def __init__(self, dim: int, heads: int, causal: bool = False, fp32: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads, self.causal, self.fp32 = heads, causal, fp32
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, T, C); key_valid Bool (B, T) or None
        B, T, C = x.shape
        H = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:            # (B, T, C) -> (B, H, T, C/H)
            return t.view(B, T, H, C // H).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        mask = None
        if key_valid is not None:
            mask = key_valid[:, None, None, :]                  # (B, 1, 1, T)
            if self.causal:
                mask = mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if self.fp32:
            q, k, v = q.float(), k.float(), v.float()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=self.causal and mask is None)   # (B, H, T, C/H)
        return self.out_proj(o.to(x.dtype).transpose(1, 2).reshape(B, T, C))


class WhisperLayer(nn.Module):
    """Pre-norm layer: x + out(Attn(N1 x)); x + fc2(GELU(fc1(N2 x))), exact (erf) GELU.

    N is LayerNorm (eps 1e-5; encoder, audio decoder) or, with rms=True, RMSNorm (eps 1e-6,
    weight only; Pre-Net). causal / fp32_attention: see `WhisperAttention`. In half precision
    the output is clamped to ±(max - 1000) like the reference's inf guard."""

    def __init__(self, dim: int, heads: int, ffn: int, causal: bool = False, rms: bool = False,
                 fp32_attention: bool = False):
        super().__init__()
        norm = (lambda: RMSNorm(dim)) if rms else (lambda: nn.LayerNorm(dim))
        self.self_attn = WhisperAttention(dim, heads, causal, fp32_attention)
        self.self_attn_layer_norm = norm()
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = norm()

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, T, C) -> (B, T, C)
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_valid)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype in (torch.float16, torch.bfloat16):
            # The reference clamps when an inf/nan appears; clamping always is the same for finite
            # values (they are within the bound) and needs no host sync on `isinf().any()`.
            big = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-big, big)
        return x
