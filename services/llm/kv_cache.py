"""Slotted KV cache of the audio LLM (reference-model.md §6.1).

One preallocated buffer per K and V, shaped (layers, slots, kv_heads, max_len, head_dim).
Every live sequence owns a slot index; its token at cache index i (0-based, counted from
the sequence's first token) lives at [:, slot, :, i]. Keys are stored after RoPE and before
the GQA repeat, exactly like the reference's legacy tuples, so a slot's [:n] equals the
reference `past_key_values[layer][0][row, :, -n:]` of an unpadded row.

The shapes never change, so a decode step that reads and writes it can be captured in a
CUDA graph. Nothing here synchronises with the host.
"""
from __future__ import annotations

import torch
from torch import nn

from services.common.model_config import LLMConfig, ModelConfig


class KVCache(nn.Module):
    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        # Not part of any state dict: a cache is runtime state, not a weight.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @classmethod
    def for_config(cls, cfg: ModelConfig | LLMConfig, num_slots: int, max_len: int,
                   dtype: torch.dtype = torch.bfloat16,
                   device: torch.device | str | None = None) -> "KVCache":
        llm = cfg.llm if isinstance(cfg, ModelConfig) else cfg
        return cls(llm.num_hidden_layers, num_slots, max_len, llm.num_key_value_heads,
                   llm.head_dim, dtype, device)

    # ------------------------------------------------------------------ shape facts
    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    # ------------------------------------------------------------------ access
    def write(self, layer: int, slots: torch.Tensor, index: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Store new keys/values of one layer.

        slots Long[B]; index Long[B, T]: cache index of each new token (distinct per row,
        < max_len); k, v (B, kv_heads, T, head_dim); valid Bool[B, T] or None: where False
        the old contents are written back (right-padded chunks leave the slot untouched)."""
        s = slots[:, None]                                   # (B, 1) broadcasts against index (B, T)
        k_new = k.transpose(1, 2).to(self.k.dtype)           # (B, T, kv_heads, head_dim)
        v_new = v.transpose(1, 2).to(self.v.dtype)
        if valid is not None:
            m = valid[:, :, None, None]
            k_new = torch.where(m, k_new, self.k[layer, s, :, index])
            v_new = torch.where(m, v_new, self.v[layer, s, :, index])
        # advanced indices split by a slice: the indexed view is (B, T, kv_heads, head_dim)
        self.k[layer, s, :, index] = k_new
        self.v[layer, s, :, index] = v_new

    def read(self, layer: int, slots: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first kv_len cache positions of each slot:
        two (B, kv_heads, kv_len, head_dim) tensors (a gather, so a copy). index_select over the
        sliced view copies only kv_len positions, with a plain gather kernel (the advanced-indexing
        kernel moved the same bytes several times slower on an H100)."""
        return (self.k[layer, :, :, :kv_len].index_select(0, slots),
                self.v[layer, :, :, :kv_len].index_select(0, slots))

    def clear(self, slots: torch.Tensor | None = None) -> None:
        """Zero some slots (or all). Not needed for correctness: a sequence never attends
        past its own last written index; this only keeps dumps readable."""
        if slots is None:
            self.k.zero_()
            self.v.zero_()
        else:
            self.k[:, slots] = 0
            self.v[:, slots] = 0

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst (prefix reuse)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
