"""Flow-matching Pre-Net: 50 Hz decoder hidden states -> mel prior mu (reference-model.md §9.1).

    h (B, T, d_audio) --in_mlp: Linear(d_audio, 4*d) -> SiLU -> Linear(4*d, d)-->
        N causal RMSNorm layers --> RMSNorm --> out_proj (no bias) = mu (B, T, n_mels)

Keys are the reference's `prenet.*` under `audio_tokenizer.audio_flow_matching_decoder.`.
The reference registers a sinusoid buffer but never adds it (no positional encoding); it is not
declared here and the loader skips `prenet.positional_embedding`. The in_mlp width is
4 * prenet_d_model, not prenet_ffn_dim (correction 2).
"""
from __future__ import annotations

import torch
from torch import nn

from services.common.layers import RMSNorm, WhisperLayer, length_mask
from services.common.model_config import FlowConfig


class Prenet(nn.Module):
    def __init__(self, flow: FlowConfig):
        super().__init__()
        if flow.prenet_target_mel_length_scale_ratio != 1.0:
            # At ratio 1 the reference's nearest interpolation is the identity; other ratios resample
            # the padded batch to its longest output, which this per-segment implementation does not do.
            raise ValueError("flow_matching_config.prenet_target_mel_length_scale_ratio is "
                             f"{flow.prenet_target_mel_length_scale_ratio}; only 1.0 is supported")
        d = flow.prenet_d_model
        self.in_mlp = nn.Sequential(nn.Linear(flow.prenet_in_dim, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.transformer_layers = nn.ModuleList(
            WhisperLayer(d, flow.prenet_attention_heads, flow.prenet_ffn_dim, causal=True, rms=True,
                         fp32_attention=True)
            for _ in range(flow.prenet_nlayers))
        self.final_norm = RMSNorm(d)
        self.out_proj = nn.Linear(d, flow.prenet_out_dim, bias=False)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # h: (B, T, d_audio) right-padded; lengths: (B,) frames. Returns mu (B, T, n_mels).
        x = self.in_mlp(h.to(self.out_proj.weight.dtype))                 # (B, T, d)
        for layer in self.transformer_layers:
            x = layer(x)                                                  # causal: padding never leaks left
        # The reference zeroes padded rows before the final norm, so mu is exactly 0 there.
        x = torch.where(length_mask(lengths, x.shape[1])[..., None], x, 0.0)
        return self.out_proj(self.final_norm(x))
