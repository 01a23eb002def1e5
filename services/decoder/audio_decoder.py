"""Audio decoder: RVQ embeddings (12.5 Hz) -> 50 Hz hidden states (reference-model.md §8).

    emb (B, L, d) --dconv1: ConvTranspose1d(k, stride=avg_pooler) + GroupNorm(1, d)--> (B, 4L-1, d)
        + sinusoid table (added in fp32) --> N causal pre-LN layers --> LayerNorm
        = hidden_states_before_dconv2 (B, T, d), T = 4L-1, zero beyond each length

State-dict keys are the reference's under `audio_tokenizer.audio_decoder.`; the legacy
dconv2 / post_net branch is not declared here (the checkpoint loader skips those keys).

Batching: segments are right-padded. The reference's GroupNorm takes its statistics over the
padded batch, which couples segments (correction 5); here each segment is normalised over its
own valid frames, so a segment decodes the same alone or in any batch.

The layer classes (attention, transformer layer, RMSNorm) are shared with the Pre-Net (§9.1),
which uses the same Whisper-style layer with RMSNorm.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from services.common.model_config import ModelConfig


def sinusoids(length: int, channels: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Whisper positional table (length, channels): sines in the first half, cosines in the second.

    `dtype` is the arithmetic dtype. The reference builds the table at init under the model's
    default dtype, so a checkpoint that does not store it gets a bf16-arithmetic table when loaded
    in bf16 (positions above 256 are rounded, max |diff| 2.0 vs fp32; §12 item 16)."""
    half = channels // 2
    inc = math.log(10000) / (half - 1)
    inv = torch.exp(torch.arange(half).to(dtype) * (-inc))            # (half,)
    angle = torch.arange(length).to(dtype)[:, None] * inv[None, :]    # (length, half)
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class RMSNorm(nn.Module):
    """Reference RMSNorm: variance in fp32, normalised value rounded to the weight dtype, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


class SelfAttention(nn.Module):
    """Whisper attention: q/v/out with bias, k without. Causal within each padded row."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.heads
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)   # (B, H, T, D)
        k = self.k_proj(x).view(B, T, H, C // H).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, C // H).transpose(1, 2)
        # Scores, softmax and P.V in fp32, output back in the activation dtype: the numerics of the
        # fixtures' varlen kernel. Causal alone is exact for valid rows of a right-padded batch
        # (row i < L only sees keys j <= i < L); padded rows are discarded by the caller.
        o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        o = o.to(x.dtype).transpose(1, 2).reshape(B, T, C)
        return self.out_proj(o)


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + attn(norm1(x)); x + fc2(gelu(fc1(norm2(x)))). norm: LayerNorm or RMSNorm."""

    def __init__(self, dim: int, heads: int, ffn: int, rms: bool = False):
        super().__init__()
        norm = (lambda: RMSNorm(dim)) if rms else (lambda: nn.LayerNorm(dim))
        self.self_attn = SelfAttention(dim, heads)
        self.self_attn_layer_norm = norm()
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype in (torch.float16, torch.bfloat16):
            # The reference clamps +-inf to +-(max - 1000) in half precision; an unconditional clamp
            # is the same (identity on finite values) without a host sync on `isinf().any()`.
            big = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-big, big)
        return x


class CausalUpsample(nn.Module):
    """dconv1: ConvTranspose1d(k, stride s, no padding) + GroupNorm(1, C) with per-segment statistics.

    Keys: conv.weight (C, C, k), conv.bias, norm.weight, norm.bias."""

    def __init__(self, dim: int, kernel: int, stride: int, eps: float = 1e-5):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv = nn.ConvTranspose1d(dim, dim, kernel, stride)
        self.norm = nn.GroupNorm(1, dim, eps=eps)

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        trim = max(0, self.kernel - self.stride)
        return (lengths - 1) * self.stride + self.kernel - trim

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, L, C), zero beyond lengths; lengths: (B,) token counts
        out_len = self.out_lengths(lengths)                               # (B,) = 4L-1 for k=3, s=4
        y = self.conv(x.transpose(1, 2))                                  # (B, C, (Lmax-1)*s + k)
        y = y[:, :, : y.shape[-1] - max(0, self.kernel - self.stride)]    # right trim (0 when k <= s)
        B, C, T = y.shape
        m = length_mask(out_len, T)[:, None, :]                           # (B, 1, T)
        # GroupNorm(1 group) over (C x valid frames) of each segment, in fp32 (correction 5).
        yf = y.float()
        n = (out_len.float() * C)[:, None, None]                          # (B, 1, 1) elements
        mean = (yf * m).sum(dim=(1, 2), keepdim=True) / n
        var = (((yf - mean) * m) ** 2).sum(dim=(1, 2), keepdim=True) / n
        yf = (yf - mean) * torch.rsqrt(var + self.norm.eps)
        yf = yf * self.norm.weight.float()[None, :, None] + self.norm.bias.float()[None, :, None]
        y = torch.where(m, yf, 0.0).to(x.dtype)
        return y.transpose(1, 2), out_len                                 # (B, T, C), (B,)


class AudioDecoder(nn.Module):
    """Token embeddings -> hidden_states_before_dconv2. Built from `ModelConfig.audio`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        a = config.audio
        self.dconv1 = CausalUpsample(a.d_model, a.decoder_kernel_size, a.avg_pooler)
        # Stored in real checkpoints (fp32, correction 8); computed here when absent.
        self.register_buffer("positional_embedding", sinusoids(a.decoder_max_positions, a.d_model))
        self.layers = nn.ModuleList(
            TransformerLayer(a.d_model, a.decoder_attention_heads, a.decoder_ffn_dim)
            for _ in range(a.decoder_layers))
        self.layer_norm = nn.LayerNorm(a.d_model)

    @property
    def max_frames(self) -> int:
        """Output frames the positional table covers (4L-1 must not exceed it)."""
        return self.positional_embedding.shape[0]

    def forward(self, emb: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # emb: (B, Lmax, d) right-padded (values beyond lengths are ignored); lengths: (B,) >= 1
        mask_in = length_mask(lengths, emb.shape[1])[..., None]
        x = torch.where(mask_in, emb.to(self.layer_norm.weight.dtype), 0.0)
        x, out_len = self.dconv1(x, lengths)                              # (B, T, d)
        T = x.shape[1]
        if T > self.max_frames:
            raise ValueError(f"audio decoder: {T} output frames exceed the {self.max_frames}-row "
                             f"positional table (segments are limited to {(self.max_frames + 1) // 4} tokens)")
        # Table added in fp32, then back to the activation dtype (§8 step 2).
        x = (x.float() + self.positional_embedding[:T].float()).to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        x = self.layer_norm(x)
        return torch.where(length_mask(out_len, T)[..., None], x, 0.0), out_len
