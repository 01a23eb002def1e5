"""CFM estimator: the causal 1-D U-Net of the flow-matching decoder (reference-model.md §9.2).

    v = est(x (B, M, T) noisy mel, mask (B, 1, T), mu (B, M, T) prior, t scalar)

    tau = time_mlp(sinusoid(1000 t))                                   (1, 4*C)
    h   = [x ; mu]                                                     (B, 2M, T)
    down: ResBlock(2M->C), n_blocks x Transformer, skip, CausalConv
    mid:  num_mid_blocks x (ResBlock(C->C), n_blocks x Transformer)
    up:   [h ; skip] -> ResBlock(2C->C), n_blocks x Transformer, CausalConv
    out:  CausalBlock(C->C), Conv1x1(C->M), times mask

Single resolution (channels = [C]); there is no down/up-sampling. Attention inside the
transformer blocks is block-causal over `STATIC_CHUNK` frames combined with the padding mask.
Keys are the reference's `conditional_decoder.*` under `audio_tokenizer.audio_flow_matching_decoder.`.

The activation dtype is the weights' dtype; the time embedding follows the reference: s = 1000*t is
a product in t's dtype (rounded to bf16 in bf16, correction 1), then fp32 frequencies.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from services.common.model_config import FlowConfig

# Block-causal attention chunk of the reference U-Net: 2 * 25 Hz * 2 = 100 frames (2 s at 50 Hz).
STATIC_CHUNK = 100


def time_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t: scalar or (N,) in the model dtype -> (N, dim) float32 [sin | cos] of 1000*t."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    s = 1000 * t.reshape(-1, 1)                                   # rounded to t's dtype (correction 1)
    angle = s * freqs[None, :]                                    # fp32 by promotion
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype, chunk: int = STATIC_CHUNK) -> torch.Tensor:
    """mask (B, 1, T) -> additive bias (B, 1, T, T) in `dtype`: 0 where query i may see key j
    (j < (i // chunk + 1) * chunk and j valid), finfo.min elsewhere (the reference's values)."""
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device)
    block_end = (pos // chunk + 1) * chunk                          # (T,) first key a query cannot see
    allowed = (pos[None, :] < block_end[:, None])[None] & mask.bool()   # (B, T, T)
    return ((1.0 - allowed.to(dtype)) * torch.finfo(dtype).min)[:, None]


class CausalConv1d(nn.Conv1d):
    """Conv1d (stride 1) with kernel-1 zeros on the left only."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__(cin, cout, kernel)
        self.left = kernel - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left, 0)))


class CausalBlock(nn.Module):
    """CausalConv1d(k3) -> LayerNorm over channels -> Mish, input and output masked.

    Keys block.0 (conv) and block.2 (LayerNorm): the reference's Sequential(conv, transpose, LN,
    transpose, Mish); index 1 holds no weights."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.ModuleList([CausalConv1d(cin, cout, 3), nn.Identity(), nn.LayerNorm(cout)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        conv, _, norm = self.block
        h = conv(x * mask)                                          # (B, Cout, T)
        h = norm(h.transpose(1, 2)).transpose(1, 2)
        return F.mish(h) * mask


class CausalResnetBlock(nn.Module):
    """h = block2(block1(x) + Linear(Mish(tau))) + res_conv(x). Keys block1, block2, mlp.1, res_conv."""

    def __init__(self, cin: int, cout: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, cout))
        self.block1 = CausalBlock(cin, cout)
        self.block2 = CausalBlock(cout, cout)
        self.res_conv = nn.Conv1d(cin, cout, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask)
        h = h + self.mlp(tau)[:, :, None]                           # (1, Cout, 1): broadcast over batch, time
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class Attention(nn.Module):
    """diffusers Attention as used by the U-Net: to_q/k/v without bias, to_out.0 with bias."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])        # .1 is a parameterless dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.heads, self.head_dim
        q = self.to_q(x).view(B, T, H, D).transpose(1, 2)           # (B, H, T, D)
        k = self.to_k(x).view(B, T, H, D).transpose(1, 2)
        v = self.to_v(x).view(B, T, H, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/sqrt(D), bias (B, 1, T, T)
        return self.to_out[0](o.transpose(1, 2).reshape(B, T, H * D))


class GeluProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    """Keys net.0.proj (dim -> 4*dim, then exact GELU) and net.2 (4*dim -> dim); net.1 is a dropout."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GeluProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """diffusers BasicTransformerBlock, self-attention only: x + attn(LN1 x); x + ff(LN3 x)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # x: (B, T, C)
        x = self.attn1(self.norm1(x), bias) + x
        return self.ff(self.norm3(x)) + x


class TimestepMLP(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _stage(flow: FlowConfig, cin: int, C: int, time_dim: int) -> list[nn.Module]:
    blocks = nn.ModuleList(TransformerBlock(C, flow.num_heads, flow.attention_head_dim)
                           for _ in range(flow.n_blocks))
    return [CausalResnetBlock(cin, C, time_dim), blocks]


class Estimator(nn.Module):
    def __init__(self, flow: FlowConfig):
        super().__init__()
        if len(flow.channels) != 1:
            raise ValueError(f"flow_matching_config.channels is {list(flow.channels)}; the causal U-Net "
                             "here is single-resolution (one channel count, as in the released config)")
        C = flow.channels[0]
        M = flow.in_channels
        cin = 2 * M + flow.spk_emb_dim
        if flow.spk_emb_dim:
            raise ValueError("flow_matching_config.spk_emb_dim must be 0 (no speaker embedding at inference)")
        self.n_mels = M
        self.time_dim = 2 * M                                       # sinusoid width = in_channels of the U-Net
        time_dim = 4 * C
        self.time_mlp = TimestepMLP(cin, time_dim)
        self.down_blocks = nn.ModuleList([nn.ModuleList(_stage(flow, cin, C, time_dim) + [CausalConv1d(C, C, 3)])])
        self.mid_blocks = nn.ModuleList(nn.ModuleList(_stage(flow, C, C, time_dim))
                                        for _ in range(flow.num_mid_blocks))
        self.up_blocks = nn.ModuleList([nn.ModuleList(_stage(flow, 2 * C, C, time_dim) + [CausalConv1d(C, C, 3)])])
        self.final_block = CausalBlock(C, C)
        self.final_proj = nn.Conv1d(C, M, 1)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t: scalar in the model dtype -> tau (1, 4*C)."""
        return self.time_mlp(time_sinusoid(t, self.time_dim).to(self.final_proj.weight.dtype))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        # x, mu: (B, M, T); mask: (B, 1, T) bool or 0/1 float; t: scalar (model dtype).
        # bias: attention_bias(mask, dtype), precomputable once per solve.
        dtype = self.final_proj.weight.dtype
        tau = self.time_embedding(t)                                # (1, 4C)
        mask = mask.to(dtype)
        if bias is None:
            bias = attention_bias(mask, dtype)
        h = torch.cat([x, mu], dim=1)                               # (B, 2M, T): noisy state first

        def transformers(h: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
            h = h.transpose(1, 2)                                   # (B, T, C)
            for blk in blocks:
                h = blk(h, bias)
            return h.transpose(1, 2)

        resnet, blocks, conv = self.down_blocks[0]
        h = transformers(resnet(h, mask, tau), blocks)
        skip = h
        h = conv(h * mask)
        for resnet, blocks in self.mid_blocks:
            h = transformers(resnet(h, mask, tau), blocks)
        resnet, blocks, conv = self.up_blocks[0]
        h = torch.cat([h, skip], dim=1)                             # (B, 2C, T)
        h = transformers(resnet(h, mask, tau), blocks)
        h = conv(h * mask)
        h = self.final_block(h, mask)
        return self.final_proj(h * mask) * mask                     # (B, M, T)
