"""Paged KV cache of the audio LLM (reference-model.md §6.1).

Keys and values live in fixed-size blocks of `block_size` tokens, one buffer per K and V shaped
(layers, blocks, block_size, kv_heads, head_dim). A slot (one sequence, or an idle session's
cached history) owns a list of blocks; `table[slot, j]` is the block that holds its cache
indices j·block_size .. (j+1)·block_size - 1. Token i of a slot (0-based, counted from the
sequence's first token) is therefore at [:, table[slot, i // bs], i % bs]. Keys are stored after
RoPE and before the GQA repeat, exactly like the reference's legacy tuples, so `slot(s, n)`
equals the reference `past_key_values[layer][0][row, :, -n:]` of an unpadded row.

Block 0 is the null block: every table entry that no block backs points there (padding rows
and positions past a slot's length read and write it; a sequence never attends to them).

Two ways to fill the table:
- static (`num_blocks=None`): every slot owns max_len tokens from the start, like a slotted cache;
- paged: the engine hands blocks out as sequences grow and takes them back when a slot is
  freed (services/llm/kv_slots.BlockPool), so the memory is sized by the tokens actually held,
  not by slots × max_len.

The shapes never change, so a decode step that reads and writes it can be captured in a CUDA
graph (the table is a device tensor the graph reads at replay). Nothing here synchronises with
the host except `set_blocks`, the host's table write.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from services.common.model_config import LLMConfig, ModelConfig

NULL_BLOCK = 0


@dataclass(frozen=True)
class Where:
    """A forward's cache locations (KVCache.locate): the block and offset of each new token
    (B, T), and the blocks its rows read, row-major (B·n)."""

    block: torch.Tensor
    offset: torch.Tensor
    blocks: torch.Tensor


class KVCache(nn.Module):
    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, *, block_size: int = 16,
                 num_blocks: Optional[int] = None):
        super().__init__()
        if block_size < 1 or max_len < 1 or num_slots < 1:
            raise ValueError(f"KV cache needs block_size, max_len and num_slots >= 1 "
                             f"(got {block_size}, {max_len}, {num_slots})")
        self.max_len, self.block_size = max_len, block_size
        self.blocks_per_slot = -(-max_len // block_size)
        self.paged = num_blocks is not None
        total = 1 + (num_blocks if self.paged else num_slots * self.blocks_per_slot)
        shape = (num_layers, total, block_size, num_kv_heads, head_dim)
        # Not part of any state dict: a cache is runtime state, not a weight.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        table = torch.full((num_slots, self.blocks_per_slot), NULL_BLOCK, dtype=torch.int64)
        if not self.paged:                          # slot s owns blocks 1 + s·bps ..
            table = 1 + torch.arange(num_slots * self.blocks_per_slot).view(num_slots, -1)
        self.register_buffer("table", table.to(device), persistent=False)

    @classmethod
    def for_config(cls, cfg: ModelConfig | LLMConfig, num_slots: int, max_len: int,
                   dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                   **kw) -> "KVCache":
        llm = cfg.llm if isinstance(cfg, ModelConfig) else cfg
        return cls(llm.num_hidden_layers, num_slots, max_len, llm.num_key_value_heads,
                   llm.head_dim, dtype, device, **kw)

    @staticmethod
    def block_bytes(cfg: ModelConfig | LLMConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block (K and V, every layer)."""
        llm = cfg.llm if isinstance(cfg, ModelConfig) else cfg
        return (2 * llm.num_hidden_layers * block_size * llm.num_key_value_heads * llm.head_dim
                * torch.empty((), dtype=dtype).element_size())

    # ------------------------------------------------------------------ shape facts
    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_slots(self) -> int:
        return self.table.shape[0]

    @property
    def num_blocks(self) -> int:
        """Blocks that can hold tokens (the null block excluded)."""
        return self.k.shape[1] - 1

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    # ------------------------------------------------------------------ the table
    def set_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        """The host's block list of a slot -> its table row (the rest: the null block)."""
        if not self.paged:
            raise RuntimeError("set_blocks on a static KV cache (every slot owns its blocks)")
        row = list(blocks) + [NULL_BLOCK] * (self.blocks_per_slot - len(blocks))
        self.table[slot].copy_(torch.tensor(row, dtype=torch.int64), non_blocking=True)

    def locate(self, slots: torch.Tensor, index: torch.Tensor, kv_len: int) -> "Where":
        """Where a forward's rows write (cache indices index (B, T) of slots (B)) and which
        blocks they read (the first kv_len positions): the same for every layer, so a forward
        looks it up once instead of once per layer."""
        return Where(*self._written(slots, index), self._read(slots, kv_len))

    def _written(self, slots: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.table[slots[:, None], index // self.block_size], index % self.block_size

    def _read(self, slots: torch.Tensor, kv_len: int) -> torch.Tensor:
        return self.table.index_select(0, slots)[:, :-(-kv_len // self.block_size)].reshape(-1)

    # ------------------------------------------------------------------ access
    def write(self, layer: int, slots: torch.Tensor, index: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None,
              at: Optional["Where"] = None) -> None:
        """Store new keys/values of one layer.

        slots Long[B]; index Long[B, T]: cache index of each new token (distinct per row,
        < max_len); k, v (B, kv_heads, T, head_dim); valid Bool[B, T] or None: where False
        the old contents are written back (right-padded chunks leave the slot untouched).
        at: `locate(slots, index, ...)` already done (slots and index are then not read)."""
        blk, off = self._written(slots, index) if at is None else (at.block, at.offset)   # (B, T) each
        k_new = k.transpose(1, 2).to(self.k.dtype)           # (B, T, kv_heads, head_dim)
        v_new = v.transpose(1, 2).to(self.v.dtype)
        if valid is not None:
            m = valid[:, :, None, None]
            k_new = torch.where(m, k_new, self.k[layer, blk, off])
            v_new = torch.where(m, v_new, self.v[layer, blk, off])
        self.k[layer, blk, off] = k_new
        self.v[layer, blk, off] = v_new

    def read(self, layer: int, slots: torch.Tensor, kv_len: int, contiguous: bool = True,
             at: Optional["Where"] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first kv_len cache positions of each slot: two
        (B, kv_heads, kv_len, head_dim) tensors, gathered block by block (a copy).
        contiguous=False returns them as strided views of the gather (one copy less; fused
        attention kernels take any strides); True lays them out as the reference's tensors.
        at: `locate(slots, ..., kv_len)` already done."""
        blocks = self._read(slots, kv_len) if at is None else at.blocks
        B = slots.shape[0]
        out = []
        for buf in (self.k, self.v):
            x = buf[layer].index_select(0, blocks)                              # (B·n, bs, kvh, d)
            x = x.view(B, -1, *x.shape[2:])[:, :kv_len].transpose(1, 2)
            out.append(x.contiguous() if contiguous else x)
        return out[0], out[1]

    def slot(self, slot: int, length: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A slot's first `length` (default max_len) positions, every layer: two
        (layers, kv_heads, length, head_dim) copies (for checks and dumps)."""
        n = self.max_len if length is None else length
        s = torch.tensor([slot], device=self.table.device)
        ks, vs = zip(*(self.read(i, s, n) for i in range(self.num_layers)))
        return torch.cat(ks), torch.cat(vs)

    def clear(self, slots: torch.Tensor | None = None) -> None:
        """Zero some slots' blocks (or everything). Not needed for correctness: a sequence
        never attends past its own last written index; this only keeps dumps readable."""
        if slots is None:
            self.k.zero_()
            self.v.zero_()
            return
        blocks = self.table.index_select(0, slots.to(self.table.device)).reshape(-1)
        blocks = blocks[blocks != NULL_BLOCK]
        self.k[:, blocks] = 0
        self.v[:, blocks] = 0

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst (prefix reuse); dst must
        own the blocks (paged: the caller allocates them first)."""
        n = -(-length // self.block_size)
        a, b = self.table[src, :n], self.table[dst, :n]
        self.k[:, b] = self.k[:, a]
        self.v[:, b] = self.v[:, a]
