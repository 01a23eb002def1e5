"""The 8 RVQ codebooks of the VQ bridge and decoding codes with them (reference-model.md §5.3).

Shared by the tokenizer stage, which quantises into the codebooks (services/tokenizer/rvq.py),
and the decoder stage, which turns codes back into embeddings (`CodeDecoder`, loaded with
partial=True from the bridge prefix, so it declares only the codebooks and proj_decoder)."""
from __future__ import annotations

import torch
from torch import nn

from services.common.model_config import AudioConfig


class Codebook(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        # (K, D); random until loaded (N(0,1) like the fixtures' init, so an unloaded
        # module still gives distinct codes in benchmarks)
        self.embed = nn.Parameter(torch.randn(size, dim))


class VQLayer(nn.Module):
    """One RVQ stage; exists only so the keys read `vq_list.{i}.codebook.embed`."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.codebook = Codebook(size, dim)


def make_vq_list(audio: AudioConfig) -> nn.ModuleList:
    return nn.ModuleList(VQLayer(k, audio.bridge_dim) for k in audio.codebook_sizes)


def codebooks(vq_list: nn.ModuleList) -> list[torch.Tensor]:
    return [layer.codebook.embed for layer in vq_list]


def rvq_recover(codes: torch.Tensor, books: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """codes (N, n_books) -> Σ_{i=n-1..0} fp32(E_i[code_i]) cast to dtype: (N, D)."""
    total = torch.zeros(codes.shape[0], books[0].shape[1], dtype=torch.float32, device=codes.device)
    for i in reversed(range(len(books))):              # last codebook first, as the reference
        total = total + books[i][codes[:, i]].float()
    return total.to(dtype)


class CodeDecoder(nn.Module):
    """codes (N, n_books) -> proj_decoder(Σ codebook rows) (N, d_model) (§5.3).

    The decoder stage loads it from the bridge prefix with partial=True."""

    def __init__(self, audio: AudioConfig):
        super().__init__()
        self.vq_list = make_vq_list(audio)
        self.proj_decoder = nn.Linear(audio.bridge_dim, audio.d_model)

    def recover(self, codes: torch.Tensor) -> torch.Tensor:
        # (N, n_books) -> (N, bridge_dim) in the module dtype
        check_codes(codes, self.vq_list)
        return rvq_recover(codes, codebooks(self.vq_list), self.proj_decoder.weight.dtype)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        # (N, n_books) -> (N, d_model)
        return self.proj_decoder(self.recover(codes))


def check_codes(codes: torch.Tensor, vq_list: nn.ModuleList) -> None:
    if codes.dim() != 2 or codes.shape[1] != len(vq_list):
        raise ValueError(f"codes must be (N, {len(vq_list)}) (one column per codebook), got {tuple(codes.shape)}")
