"""The audio head: a causal depth transformer over the 8 codebooks of one 80 ms frame
(reference-model.md §7, §12 item 7).

Input sequence of one frame, depth D = number of codebooks (8), width E = LLM hidden:
    position 0:     x, the LLM's last hidden state (after the final norm)
    position j ≥ 1: Σ_{i<j} audio_embed_layers[i](t[:, i])   (a cumsum of the *shared* LLM tables)
Per layer (post-norm second residual, position-specific FFN without biases):
    a = MHA(RMSNorm₁(H)), causal;  R = RMSNorm₂(H + a);  F[:, l] = W2_l · GELU(W1_l · R[:, l]);  H ← R + F
with W1_l = linear1.weight[:, l·E:(l+1)·E] and W2_l = linear2.weight[:, l·2E:(l+1)·2E].
Then logits_k = heads[k](headnorm(H)[:, k]); codebooks 1..7 never emit their EOS class.

Two ways to run a frame:
- `forward_full(x, t, tables)`: the reference call, all D positions at once (the reference
  re-runs it for every codebook: D² position-passes per frame).
- `frame(x, tables, choose)`: positions 0..D-1 one at a time with a KV cache over the depth
  positions; position l computes only its own FFN slice. D position-passes per frame.
Both give the same logits (the causal mask makes later positions irrelevant).

Numerics follow the reference's `nn.MultiheadAttention` general path (q scaled by
sqrt(1/head_dim) in the model dtype, scores, softmax and P·V in the model dtype) and
its `torch.cumsum` of the code embeddings (same call, so the same rounding per device).
Logits stay in the model dtype (correction 15).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from services.common.layers import RMSNorm
from services.common.model_config import ModelConfig

# The reference builds the head's attention with heads of 128 and its norms with the
# RMSNorm default eps; neither comes from config.json.
HEAD_DIM = 128
NORM_EPS = 1e-6


class DepthAttention(nn.Module):
    """Packed-projection multi-head self-attention with the keys of nn.MultiheadAttention."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))   # [q | k | v]
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def qkv(self, x: torch.Tensor, fused_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, E) -> q, k, v (B, heads, S, hd); q already scaled like the reference.

        fused_bias=False rounds x·W before adding the bias (see AudioHead.batched_reference_rounding)."""
        B, S, _ = x.shape
        if fused_bias:
            proj = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        else:
            proj = F.linear(x, self.in_proj_weight) + self.in_proj_bias
        q, k, v = proj.chunk(3, dim=-1)
        q, k, v = (t.view(B, S, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        return q * math.sqrt(1.0 / self.head_dim), k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, h, Sq, hd); k, v (B, h, Sk, hd); mask Bool[Sq, Sk] True = masked, or None."""
        att = q @ k.transpose(-1, -2)                       # (B, h, Sq, Sk) in the model dtype
        if mask is not None:
            att = att.masked_fill(mask, float("-inf"))
        y = att.softmax(dim=-1) @ v                         # (B, h, Sq, hd)
        B, h, Sq, hd = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, Sq, h * hd))

    def forward(self, x: torch.Tensor, fused_bias: bool = True) -> torch.Tensor:
        """Causal self-attention over all positions of x (B, S, E)."""
        S = x.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
        return self.attend(*self.qkv(x, fused_bias), causal)


class DepthLayer(nn.Module):
    """The reference `CasualDepthTransformerLayer`."""

    def __init__(self, dim: int, depth: int):
        super().__init__()
        self.dim, self.depth = dim, depth
        self.self_attention = DepthAttention(dim, dim // HEAD_DIM)
        self.layernorm1 = RMSNorm(dim, NORM_EPS)
        self.layernorm2 = RMSNorm(dim, NORM_EPS)
        # position-specific FFN; the checkpoint's linear1/linear2 biases are unused (§7.3)
        self.linear1 = nn.Linear(depth * dim, 2 * dim, bias=False)      # (2E, D·E)
        self.linear2 = nn.Linear(2 * dim * depth, dim, bias=False)      # (E, D·2E)

    def ffn(self, r: torch.Tensor) -> torch.Tensor:
        """All positions, r (B, D, E): position l uses its own column block of each weight."""
        E, D = self.dim, self.depth
        h = torch.einsum("bld,tld->blt", r, self.linear1.weight.view(2 * E, D, E))   # (B, D, 2E)
        return torch.einsum("blt,dlt->bld", F.gelu(h), self.linear2.weight.view(E, D, 2 * E))

    def ffn_at(self, r: torch.Tensor, l: int) -> torch.Tensor:
        """One position, r (B, E): the column blocks are strided views, no copy."""
        E = self.dim
        h = F.linear(r, self.linear1.weight[:, l * E:(l + 1) * E])           # (B, 2E)
        return F.linear(F.gelu(h), self.linear2.weight[:, l * 2 * E:(l + 1) * 2 * E])

    def forward(self, h: torch.Tensor, fused_bias: bool = True) -> torch.Tensor:
        """Full depth sequence h (B, D, E)."""
        r = self.layernorm2(h + self.self_attention(self.layernorm1(h), fused_bias))
        return r + self.ffn(r)

    def step(self, h: torch.Tensor, l: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
             fused_bias: bool = True) -> torch.Tensor:
        """Position l only: h (B, E); k_cache, v_cache (B, heads, D, hd) hold positions < l
        and receive position l."""
        attn = self.self_attention
        q, k, v = attn.qkv(self.layernorm1(h)[:, None], fused_bias)        # (B, heads, 1, hd)
        k_cache[:, :, l:l + 1] = k
        v_cache[:, :, l:l + 1] = v
        a = attn.attend(q, k_cache[:, :, :l + 1], v_cache[:, :, :l + 1], None)[:, 0]   # causal by construction
        r = self.layernorm2(h + a)
        return r + self.ffn_at(r, l)


class AudioHead(nn.Module):
    """The reference `OmniAudioHead` (prefix `audio_head.`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.llm.hidden_size
        if E % HEAD_DIM:
            raise ValueError(f"config.json: hidden_size {E} must be a multiple of {HEAD_DIM}: the "
                             f"audio head's attention uses heads of {HEAD_DIM}")
        self.sizes = tuple(cfg.audio.codebook_sizes)
        self.depth = len(self.sizes)
        self.transformer_layers = nn.ModuleList(DepthLayer(E, self.depth)
                                                for _ in range(cfg.audio.audio_head_transformer_layers))
        self.headnorm = RMSNorm(E, NORM_EPS)
        self.heads = nn.ModuleList(nn.Linear(E, K + 1) for K in self.sizes)   # last class = end of audio
        # The reference's in-projection rounding depends on memory layout: F.linear fuses the
        # bias into the product for a contiguous input and rounds x·W first otherwise. Its
        # nn.MultiheadAttention transposes a batch-first input, which is contiguous only when
        # B = 1 or when the input came out of the previous layer's einsum (seq-major). So the
        # demos (B = 1) round fused everywhere, and a batch of B > 1 rounds layer 0 unfused.
        # Default: fused everywhere, i.e. the reference at batch size 1, for every batch size
        # (a sequence's codes do not depend on its batch mates). True: the reference's B > 1
        # rounding (bit-exact against a batched reference run; 1 bf16 ulp apart otherwise).
        self.batched_reference_rounding = False

    def _fused(self, layer: int, batch: int) -> bool:
        return not (self.batched_reference_rounding and layer == 0 and batch > 1)

    def forward_full(self, x: torch.Tensor, t: torch.Tensor, audio_embed_layers: nn.ModuleList) -> list[torch.Tensor]:
        """The reference call. x (B, E); t Long[B, D] partial codes (only t[:, :D-1] is read).
        Returns D logits tensors (B, K_k + 1), all classes, in the model dtype."""
        emb = torch.stack([audio_embed_layers[i](t[:, i]) for i in range(self.depth - 1)], dim=1)
        h = torch.cat([x[:, None], torch.cumsum(emb, dim=1)], dim=1)        # (B, D, E)
        for i, layer in enumerate(self.transformer_layers):
            h = layer(h, self._fused(i, h.shape[0]))
        g = self.headnorm(h)
        return [head(g[:, k]) for k, head in enumerate(self.heads)]

    def frame(self, x: torch.Tensor, audio_embed_layers: nn.ModuleList,
              choose: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One frame, incrementally. x (B, E) -> codes Long[B, D].

        choose(k, logits) gets codebook k's logits in the model dtype — (B, K_0 + 1) for
        k = 0, (B, K_k) for k ≥ 1 (EOS class dropped) — and returns the codes Long[B].
        The loop over positions is static (D iterations), nothing waits on the host."""
        B, E = x.shape
        # keys/values of the depth positions, per layer: (layers, B, heads, D, hd)
        kv_shape = (len(self.transformer_layers), B, E // HEAD_DIM, self.depth, HEAD_DIM)
        k_cache = x.new_empty(kv_shape)
        v_cache = x.new_empty(kv_shape)
        codes = torch.zeros(B, self.depth, dtype=torch.long, device=x.device)
        # embeddings of the codes chosen so far, laid out like forward_full's stack; the
        # input of position l+1 is taken from the same torch.cumsum call over this buffer,
        # because how cumsum rounds partial sums differs by device (fp32 accumulation on
        # CPU, not on CUDA) and a scan's prefix never reads the rows after it
        emb = x.new_zeros(B, self.depth - 1, E)
        h = x
        for l in range(self.depth):
            for i, layer in enumerate(self.transformer_layers):
                h = layer.step(h, l, k_cache[i], v_cache[i], self._fused(i, B))
            logits = self.heads[l](self.headnorm(h))
            if l > 0:
                logits = logits[:, :-1]
            c = choose(l, logits)
            codes[:, l] = c
            if l + 1 < self.depth:
                emb[:, l] = audio_embed_layers[l](c)
                h = torch.cumsum(emb, dim=1)[:, l]
        return codes
