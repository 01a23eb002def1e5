"""Whisper-style audio encoder (reference-model.md §4), keys under `audio_tokenizer.audio_model.`.

  features (B, mel, T_mel) -> GELU(conv1) -> GELU(conv2, stride 2) -> + sinusoid table (fp32 add)
  -> N pre-LN layers, bidirectional attention within each sample's valid frames
  -> final LayerNorm -> zeros beyond encoder_length.                      -> (B, T_enc, d_model)

The reference packs the valid frames and uses flash-attn varlen; here the batch stays padded
and a key mask restricts attention to each sample's frames (one batched SDPA call, no loop
over samples). The rows are computed independently, so the valid frames get the same values.

`TransformerLayer` and `sinusoids` are also what the audio decoder (§8) is made of; it can
import them from here (causal=True there).
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.common.model_config import AudioConfig


def sinusoids(length: int, channels: int, dtype: torch.dtype = torch.float32,
              max_timescale: float = 10000.0) -> torch.Tensor:
    """(length, channels) table [sin(t·inv) | cos(t·inv)], inv_k = exp(-k·ln(max)/(C/2 - 1)).

    Computed with the arithmetic in `dtype`, as the reference's init does under the default
    dtype it is loaded with: fp32 gives the stored tables of the fixtures; bf16 is what a
    bf16-loaded reference holds when the checkpoint lacks the buffer (§12 item 16), and it is
    very different (errors of order 1 at large t)."""
    if channels % 2:
        raise ValueError(f"sinusoid table needs an even width, got {channels}")
    inc = np.log(max_timescale) / (channels // 2 - 1)
    # The reference multiplies int64 aranges by float64/bf16 values under its default dtype;
    # type promotion casts the integers to that dtype first, then each product is rounded.
    inv = torch.exp(torch.arange(channels // 2).to(dtype) * float(-inc))     # (C/2,)
    scaled = torch.arange(length)[:, None].to(dtype) * inv[None, :]          # (L, C/2)
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


def sinusoid_dtype(model_dtype: str | None) -> torch.dtype:
    """Arithmetic dtype of a sinusoid table the checkpoint lacks: the config's torch_dtype,
    the default dtype the reference builds its modules in."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(model_dtype or "bfloat16", torch.float32)


class SelfAttention(nn.Module):
    """Whisper attention: q/v/out with bias, k without (§4)."""

    def __init__(self, d: int, heads: int, causal: bool = False):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model {d} is not divisible by {heads} attention heads")
        self.heads, self.causal = heads, causal
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.out_proj = nn.Linear(d, d, bias=True)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        # x (B, T, d); key_valid (B, T) bool: the sample's own frames
        B, T, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:            # (B, T, d) -> (B, h, T, d/h)
            return t.view(B, T, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        mask = key_valid[:, None, None, :]                      # (B, 1, 1, T)
        if self.causal:
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        # scale 1/sqrt(head_dim) (SDPA default). The reference's kernel works in fp32 inside;
        # SDPA's CPU math kernel also upcasts bf16, and GPU kernels accumulate in fp32.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)     # (B, h, T, d/h)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, d))


class TransformerLayer(nn.Module):
    """Pre-LN layer: x + out(Attn(LN1 x)); x + fc2(GELU(fc1(LN2 x))). LayerNorm eps 1e-5."""

    def __init__(self, d: int, heads: int, ffn: int, causal: bool = False):
        super().__init__()
        self.self_attn = SelfAttention(d, heads, causal)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_valid)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))      # exact (erf) GELU
        if x.dtype in (torch.float16, torch.bfloat16):
            # The reference clamps to ±(max - 1000) when an inf/nan appears; clamping always
            # is the same for finite values (they are within the bound) and needs no sync.
            c = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-c, c)
        return x


class AudioEncoder(nn.Module):
    def __init__(self, audio: AudioConfig, table_dtype: torch.dtype = torch.float32):
        """table_dtype: arithmetic of the positional table when the checkpoint has none
        (see `sinusoids`); a stored table replaces it at load."""
        super().__init__()
        d, k = audio.d_model, audio.kernel_size
        self.stride = audio.stride_size
        self.conv1 = nn.Conv1d(audio.num_mel_bins, d, k, padding=k // 2)
        self.conv2 = nn.Conv1d(d, d, k, stride=audio.stride_size, padding=k // 2)
        self.register_buffer("positional_embedding",
                             sinusoids(audio.max_source_positions, d, table_dtype).float())  # (1500, d)
        self.layers = nn.ModuleList(
            TransformerLayer(d, audio.encoder_attention_heads, audio.encoder_ffn_dim)
            for _ in range(audio.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, features: torch.Tensor, encoder_lengths: torch.Tensor,
                conv_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, mel, T_mel) (any float dtype; cast to the weights'), encoder_lengths (B,).

        conv_lengths (B,): mel frames of each sample. Given, conv1's output beyond them is zeroed,
        so each sample is computed as if alone (batch-invariant). None: the reference's batch
        behaviour, where a shorter sample's last encoder frame sees conv1 applied to the zero
        padding up to the batch's longest sample.
        Returns (B, T_enc, d), zero beyond encoder_lengths."""
        x = features.to(self.conv1.weight.dtype)
        h = F.gelu(self.conv1(x))                                        # (B, d, T_mel)
        if conv_lengths is not None:
            keep = torch.arange(h.shape[-1], device=h.device) < conv_lengths.to(h.device)[:, None]
            h = h * keep[:, None, :].to(h.dtype)
        h = F.gelu(self.conv2(h)).transpose(1, 2)                        # (B, T_enc, d)
        T = h.shape[1]
        if T > self.positional_embedding.shape[0]:
            raise ValueError(f"encoder input of {T} frames exceeds the {self.positional_embedding.shape[0]}-row "
                             "positional table (30 s chunks at most)")
        h = (h.float() + self.positional_embedding[:T]).to(h.dtype)      # add in fp32, cast back
        valid = torch.arange(T, device=h.device) < encoder_lengths.to(h.device)[:, None]   # (B, T)
        for layer in self.layers:
            h = layer(h, valid)
        h = self.layer_norm(h)
        return torch.where(valid[..., None], h, torch.zeros((), dtype=h.dtype, device=h.device))
