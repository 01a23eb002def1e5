"""Whisper-style audio encoder (reference-model.md §4), keys under `audio_tokenizer.audio_model.`.

  features (B, mel, T_mel) -> GELU(conv1) -> GELU(conv2, stride 2) -> + sinusoid table (fp32 add)
  -> N pre-LN layers, bidirectional attention within each sample's valid frames
  -> final LayerNorm -> zeros beyond encoder_length.                      -> (B, T_enc, d_model)

The reference packs the valid frames and uses flash-attn varlen; here the batch stays padded
and a key mask restricts attention to each sample's frames (one batched SDPA call, no loop
over samples). The rows are computed independently, so the valid frames get the same values.

The layers and the table are `services.common.layers` (shared with the audio decoder and the
Pre-Net); attention runs in the activation dtype here (`WhisperAttention`'s fp32=False).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.common.layers import WhisperLayer, length_mask, sinusoids
from services.common.model_config import AudioConfig

def sinusoid_dtype(model_dtype: str | None) -> torch.dtype:
    """Arithmetic dtype of a sinusoid table the checkpoint lacks: the config's torch_dtype,
    the default dtype the reference builds its modules in."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(model_dtype or "bfloat16", torch.float32)


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
        # attention in fp32, as the reference's varlen kernel works: bit-exact bf16 encoder output
        self.layers = nn.ModuleList(
            WhisperLayer(d, audio.encoder_attention_heads, audio.encoder_ffn_dim, fp32_attention=True)
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
            keep = length_mask(conv_lengths.to(h.device), h.shape[-1])
            h = h * keep[:, None, :].to(h.dtype)
        h = F.gelu(self.conv2(h)).transpose(1, 2)                        # (B, T_enc, d)
        T = h.shape[1]
        if T > self.positional_embedding.shape[0]:
            raise ValueError(f"encoder input of {T} frames exceeds the {self.positional_embedding.shape[0]}-row "
                             "positional table (30 s splits at most)")
        h = (h.float() + self.positional_embedding[:T]).to(h.dtype)      # add in fp32, cast back
        valid = length_mask(encoder_lengths.to(h.device), T)             # (B, T)
        for layer in self.layers:
            h = layer(h, valid)
        h = self.layer_norm(h)
        return torch.where(valid[..., None], h, torch.zeros((), dtype=h.dtype, device=h.device))
