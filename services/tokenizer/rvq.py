"""VQ bridge (50 Hz -> 12.5 Hz) and the 8-stage residual VQ (reference-model.md §5).

Keys are those under `audio_tokenizer.audio_bridge_model.`:
  gate_proj.weight, up_proj.weight, down_proj.weight, layer_norm.{weight,bias},
  proj_decoder.{weight,bias}, vq_list.{i}.codebook.embed.
(`vq_list.{i}.codebook.embed_avg/cluster_size` are EMA training state; the loader skips them.)

Two modules share the codebooks (services/common/codebooks.py):
  * `VQBridge`    (here, tokenizer stage): encoder output -> codes.
  * `CodeDecoder` (decoder stage):          codes -> proj_decoder output.

Rounding rules (§5.2, §12 item 4), which decide codes at near-ties and so must match:
  * distances in fp32 against the codebook as stored (bf16 in a bf16 model, upcast), with the
    reference's formula sqrt(clamp(|x|^2 + |c|^2 - 2 x.c, 0)) and first-index tie-break;
  * the quantised vector is the stored-dtype codebook row;
  * the residual is re-rounded to the bridge dtype after every stage.
Note: on CUDA the distance matmul must run in true fp32 (leave TF32 matmul off, the default),
as the reference's autocast(fp32) region does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.common.codebooks import check_codes, codebooks, make_vq_list, rvq_recover
from services.common.layers import length_mask
from services.common.model_config import AudioConfig


def nearest_code(x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """x (..., D) fp32, embed (K, D) any dtype -> index (...,) of the nearest row.

    Same arithmetic as the reference's `cdist`: (|x|^2 + |c|^2) + (x.c)*-2, clamp, sqrt.
    The sqrt is kept because it can merge nearly equal squared distances into a tie,
    which the first-index rule then resolves."""
    e = embed.float()                                   # (K, D)
    x2 = x.pow(2).sum(-1, keepdim=True)                 # (..., 1)
    e2 = e.pow(2).sum(-1)                               # (K,)
    xe = torch.matmul(x, e.t()) * -2                    # (..., K)
    dist = (x2 + e2 + xe).clamp(min=0).sqrt()           # (..., K)
    return dist.argmin(-1)                              # first index on ties


def rvq_quantize(r: torch.Tensor, valid: torch.Tensor, books: list[torch.Tensor],
                 stage_inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Residual VQ of r (B, T, D) over the codebooks, all rows at once.

    valid (B, T) bool: rows beyond a sample's bridge_length quantise to 0 (their residual
    passes through unchanged) and get code -1, as in the reference.
    stage_inputs: if a list is given, the residual entering each stage is appended to it.
    Returns codes (B, T, n_books) int64."""
    residual = r                                        # (B, T, D), bridge dtype
    codes = []
    for embed in books:
        if stage_inputs is not None:
            stage_inputs.append(residual)
        x = residual.float()                            # (B, T, D)
        idx = nearest_code(x, embed)                    # (B, T)
        q = embed[idx]                                  # (B, T, D) stored dtype
        q = torch.where(valid[..., None], q, torch.zeros((), dtype=q.dtype, device=q.device))
        residual = (x - q.float()).to(r.dtype)          # re-round after every stage
        codes.append(torch.where(valid, idx, -1))
    return torch.stack(codes, -1)                       # (B, T, n_books)


class VQBridge(nn.Module):
    """Encoder output (B, T, d_model), zeros beyond encoder_length -> codes (B, ceil(T/4), n_books)."""

    def __init__(self, audio: AudioConfig):
        super().__init__()
        d, p, dim = audio.d_model, audio.avg_pooler, audio.bridge_dim
        self.pool = p
        self.gate_proj = nn.Conv1d(d, dim, p, p, bias=False)
        self.up_proj = nn.Conv1d(d, dim, p, p, bias=False)
        self.down_proj = nn.Linear(dim, dim, bias=False)
        self.layer_norm = nn.LayerNorm(dim)
        # decode path; declared so the tokenizer loads its prefix strictly
        self.proj_decoder = nn.Linear(dim, d)
        self.vq_list = make_vq_list(audio)

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> r (B, ceil(T/p), p·d): LN(down(SiLU(gate)·up) + 4 frames concatenated)."""
        B, T, d = x.shape
        x = F.pad(x, (0, 0, 0, (-T) % self.pool))                  # (B, T4·p, d) zero frames
        xt = x.transpose(1, 2)                                      # (B, d, T4·p)
        g = self.gate_proj(xt).transpose(1, 2)                      # (B, T4, p·d)
        u = self.up_proj(xt).transpose(1, 2)                        # (B, T4, p·d)
        x4 = x.reshape(B, -1, self.pool * d)                        # (B, T4, p·d) frames in time order
        return self.layer_norm(self.down_proj(F.silu(g) * u) + x4)

    def quantize(self, r: torch.Tensor, bridge_lengths: torch.Tensor,
                 stage_inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """r (B, T4, D), bridge_lengths (B,) -> codes (B, T4, n_books), -1 beyond the length."""
        valid = length_mask(bridge_lengths.to(r.device), r.shape[1])
        return rvq_quantize(r, valid, codebooks(self.vq_list), stage_inputs)

    def forward(self, x: torch.Tensor, bridge_lengths: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.downsample(x), bridge_lengths)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, n_books) -> (N, d_model); the same maths as CodeDecoder."""
        check_codes(codes, self.vq_list)
        return self.proj_decoder(rvq_recover(codes, codebooks(self.vq_list), self.proj_decoder.weight.dtype))
