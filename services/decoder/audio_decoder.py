"""Audio decoder: RVQ embeddings (12.5 Hz) -> 50 Hz hidden states (reference-model.md §8).

    emb (B, L, d) --dconv1: ConvTranspose1d(k, stride=avg_pooler) + GroupNorm(1, d)--> (B, 4L-1, d)
        + sinusoid table (added in fp32) --> N causal pre-LN layers --> LayerNorm
        = hidden_states_before_dconv2 (B, T, d), T = 4L-1, zero beyond each length

State-dict keys are the reference's under `audio_tokenizer.audio_decoder.`; the legacy
dconv2 / post_net branch is not declared here (the checkpoint loader skips those keys).

Batching: segments are right-padded. The reference's GroupNorm takes its statistics over the
padded batch, which couples segments (correction 5); here each segment is normalised over its
own valid frames, so a segment decodes the same alone or in any batch.

The layers, the table and the masks are `services.common.layers`: the encoder's Whisper layer,
causal here, with attention in fp32 (`WhisperAttention`'s fp32=True, the numerics of fixture 04).
"""
from __future__ import annotations

import torch
from torch import nn

from services.common.layers import WhisperLayer, length_mask, sinusoids
from services.common.model_config import ModelConfig


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
        self.dconv1_stride = a.avg_pooler                                 # mel frames per code frame
        # Stored in real checkpoints (fp32, correction 8); computed here when absent.
        self.register_buffer("positional_embedding", sinusoids(a.decoder_max_positions, a.d_model))
        self.layers = nn.ModuleList(
            WhisperLayer(a.d_model, a.decoder_attention_heads, a.decoder_ffn_dim, causal=True,
                         fp32_attention=True)
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
                             f"positional table (segments are limited to "
                             f"{(self.max_frames + 1) // self.dconv1_stride} tokens)")
        # Table added in fp32, then back to the activation dtype (§8 step 2).
        x = (x.float() + self.positional_embedding[:T].float()).to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        x = self.layer_norm(x)
        return torch.where(length_mask(out_len, T)[..., None], x, 0.0), out_len
