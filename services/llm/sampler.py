"""Batched, on-device logits processing and sampling (reference-model.md §11.3).

One call handles a batch of sequences, each with its own parameters, in the order the
reference's HF processors apply them (transformers 4.45):

    repetition penalty -> temperature -> top-k -> top-p -> softmax -> draw   (do_sample)
    repetition penalty -> argmax                                             (greedy)

Numerics follow the reference exactly:
- text logits are upcast to fp32 before processing; audio-head logits stay in their dtype
  (bf16 on GPU), so every step below runs in that dtype, as HF does (correction 15);
- penalties and temperatures are applied as `x * p` / `x / p` with p in fp32, which rounds
  like HF's tensor-by-Python-scalar ops (checked bit-exact over all bf16 values);
- the top-p threshold `1 - top_p` is cast to the logits dtype, as HF's comparison with a
  Python float does (0.15 becomes 0.150390625 in bf16).

Draws are counter-based: a sequence's seed and the index of the draw are hashed on the host
into a 64-bit key, the device mixes the key with each vocabulary index into uniforms, and an
exponential race picks the token. A sequence therefore draws the same tokens alone or in any
batch, with no per-row generator objects and no host synchronisation.

Histories (what the repetition penalty looks at) live on the device too:
- `TokenCounts`: per slot, a count of every id in the whole text sequence (prompt, pads and
  all); counts, not flags, because the protocol overwrites tokens (§11.2 host writes).
- `CodeHistory`: per slot and codebook, which codes this audio segment has produced;
  cleared at each segment start (the reference's history is the segment only).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    """One phase's sampling parameters (a row of §11.3's table).

    greedy=True is `do_sample=False`: only the repetition penalty applies, then argmax."""

    temperature: float = 1.0
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1.0: off
    repetition_penalty: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use greedy=True instead")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")

    def as_greedy(self) -> "SamplingParams":
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.repetition_penalty, True)


_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def draw_key(seed: int, counter: int) -> int:
    """The 64-bit key of a sequence's `counter`-th draw, as a signed int64 (host side)."""
    k = _splitmix64((seed & _M64) ^ _splitmix64(counter))
    return k - (1 << 64) if k >= 1 << 63 else k


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    """_splitmix64 on uint64 arrays (numpy wraps products mod 2^64, as the masks do)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def draw_keys(seeds: Sequence[int], counters: Sequence[int], draws: int) -> np.ndarray:
    """draw_key(seeds[i], counters[i] + j) for j < draws, as an int64 array [B, draws]: one
    vectorised pass instead of B·draws Python-level hashes (the host's share of a step at a
    batch of hundreds)."""
    s = np.array([x & _M64 for x in seeds], dtype=np.uint64)[:, None]
    c = np.array([x & _M64 for x in counters], dtype=np.uint64)[:, None] + np.arange(draws, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _splitmix64_np(s ^ _splitmix64_np(c)).view(np.int64)


@dataclass
class SamplingBatch:
    """Per-row parameters of one batched call, as device tensors (built once per step).

    keys [B, D]: the keys of D consecutive draws of each row (D = 1 for a text token, the
    number of codebooks for an audio frame), hashed on the host so the device only mixes
    in the vocabulary index; `col` picks the draw of this call (see `offset`)."""

    penalty: torch.Tensor      # [B] f32
    temperature: torch.Tensor  # [B] f32
    top_k: torch.Tensor        # [B] i64, 0 = off
    top_p_cut: torch.Tensor    # [B] f32, 1 - top_p (cast to the logits dtype at use)
    top_p_on: torch.Tensor     # [B] bool
    greedy: torch.Tensor       # [B] bool
    keys: torch.Tensor         # [B, D] i64
    col: int = 0
    # host-side facts, so that skipping work needs no device read
    all_greedy: bool = False
    any_temperature: bool = True
    any_top_k: bool = True
    any_top_p: bool = True

    @staticmethod
    def host_tables(params: Sequence[SamplingParams], seeds: Sequence[int], counters: Sequence[int],
                    draws: int = 1) -> tuple[list[list[float]], np.ndarray]:
        """The rows of the two tables a batch is made of: float [penalty, temperature, 1 - top_p]
        and integer (int64 [B, 3 + draws]) [top_k, top_p on, greedy, key 0 .. key draws-1]."""
        # 1 - top_p in double, then float: what HF compares with
        f = [[p.repetition_penalty, p.temperature, 1.0 - p.top_p] for p in params]
        flags = np.array([[p.top_k, p.top_p < 1.0, p.greedy] for p in params], dtype=np.int64).reshape(-1, 3)
        return f, np.concatenate([flags, draw_keys(seeds, counters, draws)], axis=1)

    @classmethod
    def from_tables(cls, f: torch.Tensor, i: torch.Tensor, params: Sequence[SamplingParams] | None = None
                    ) -> "SamplingBatch":
        """A batch over device tables f [B, 3] f32 and i [B, 3 + D] i64 (views: no copy).

        params: the rows' parameters, to skip the warpers no row needs; None runs every step for
        every row (the same numbers: each step is the identity for a row that does not use it),
        which a captured CUDA graph needs, since it replays one fixed sequence of kernels."""
        full = params is None
        return cls(penalty=f[:, 0], temperature=f[:, 1], top_k=i[:, 0], top_p_cut=f[:, 2],
                   top_p_on=i[:, 1].bool(), greedy=i[:, 2].bool(), keys=i[:, 3:],
                   all_greedy=not full and all(p.greedy for p in params),
                   any_temperature=full or any(p.temperature != 1.0 and not p.greedy for p in params),
                   any_top_k=full or any(p.top_k > 0 and not p.greedy for p in params),
                   any_top_p=full or any(p.top_p < 1.0 and not p.greedy for p in params))

    @classmethod
    def build(cls, params: Sequence[SamplingParams], seeds: Sequence[int], counters: Sequence[int],
              device: torch.device | str, draws: int = 1) -> "SamplingBatch":
        """Row i draws with keys of (seeds[i], counters[i] + j), j < draws."""
        # two host->device copies per batch (one float, one integer table), split on the device
        f, i = cls.host_tables(params, seeds, counters, draws)
        return cls.from_tables(torch.tensor(f, dtype=torch.float32).to(device),
                               torch.from_numpy(i).to(device), params)

    def offset(self, k: int) -> "SamplingBatch":
        """The same rows, drawing with their k-th key (codebook k of one frame)."""
        if not 0 <= k < self.keys.shape[1]:
            raise IndexError(f"draw {k} of a batch built with {self.keys.shape[1]} draws per row")
        return replace(self, col=k)


# ---------------------------------------------------------------------------- processors

def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF RepetitionPenaltyLogitsProcessor with a presence mask instead of an id list.

    scores [B, V] (any float dtype), seen [B, V] bool, penalty [B] f32 -> [B, V] same dtype.
    For seen ids: s*p if s < 0 else s/p, computed in fp32 and rounded once (= HF's op)."""
    p = penalty[:, None]
    s32 = scores.float()
    pen = torch.where(s32 < 0, s32 * p, s32 / p).to(scores.dtype)
    return torch.where(seen, pen, scores)


def apply_temperature(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return (scores.float() / temperature[:, None]).to(scores.dtype)


def apply_top_k(scores: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep scores >= the k-th largest of their row (ties kept, as HF); k = 0: row untouched."""
    V = scores.shape[-1]
    k = top_k.clamp(max=V)
    desc = scores.sort(dim=-1, descending=True).values                 # [B, V]
    kth = desc.gather(1, (k - 1).clamp(min=0)[:, None])                  # [B, 1]
    remove = (scores < kth) & (k > 0)[:, None]
    return scores.masked_fill(remove, float("-inf"))


def apply_top_p(scores: torch.Tensor, cut: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """HF TopPLogitsWarper: drop tokens whose ascending cumulative probability is <= 1 - p,
    always keeping the most likely one. Softmax and cumsum run in the scores' dtype."""
    asc, idx = scores.sort(dim=-1, descending=False)                     # [B, V]
    cum = asc.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= cut.to(scores.dtype)[:, None]
    drop_sorted[:, -1] = False
    drop = drop_sorted.scatter(1, idx, drop_sorted)
    return scores.masked_fill(drop & on[:, None], float("-inf"))


def process(scores: torch.Tensor, seen: torch.Tensor | None, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty for every row; the warpers only matter for sampled rows (a greedy
    row's argmax is taken before them, as HF adds no warpers when do_sample=False)."""
    if seen is not None:
        scores = apply_repetition_penalty(scores, seen, batch.penalty)
    return scores


def warp(scores: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, top-k, top-p (HF's order); a step no row needs is skipped."""
    if batch.any_temperature:
        scores = apply_temperature(scores, batch.temperature)
    if batch.any_top_k:
        scores = apply_top_k(scores, batch.top_k)
    if batch.any_top_p:
        scores = apply_top_p(scores, batch.top_p_cut, batch.top_p_on)
    return scores


# ---------------------------------------------------------------------------- draws

def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 on int64 tensors holding uint32 values (products wrap mod 2^64,
    the low 32 bits are exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def uniforms(key: torch.Tensor, n: int) -> torch.Tensor:
    """[B] int64 draw keys -> [B, n] f32 uniforms in (0, 1), a pure function of (key, column)."""
    col = torch.arange(n, device=key.device, dtype=torch.int64)[None, :]
    lo, hi = (key & _M32)[:, None], ((key >> 32) & _M32)[:, None]
    h = _mix32(_mix32(col ^ hi) ^ lo)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def exponentials(key: torch.Tensor, n: int) -> torch.Tensor:
    """[...] int64 draw keys -> [..., n] f32 Exp(1) variates, E = -log U (a pure function of
    (key, column), so the first m columns of n >= m are those of m)."""
    return -torch.log(uniforms(key.reshape(-1), n)).view(*key.shape, n)


def draw(probs: torch.Tensor, key: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
    """One categorical draw per row: argmax p_i / E_i with E_i ~ Exp(1) (exponential race).
    probs [B, V] -> Long[B]; a zero-probability id is never chosen. e: the rows' E for this
    key, precomputed (at least V columns), else computed here."""
    V = probs.shape[-1]
    e = exponentials(key, V) if e is None else e[:, :V]                   # [B, V] Exp(1)
    return (probs.float() / e).argmax(dim=-1)


def choose(scores: torch.Tensor, seen: torch.Tensor | None, batch: SamplingBatch,
           e: torch.Tensor | None = None) -> torch.Tensor:
    """Full pipeline for one batched decision: scores [B, V] -> Long[B].

    Text callers pass fp32 scores (upcast logits); audio callers pass the head's dtype.
    e: this draw's exponentials (see `draw`), when the caller made them for several draws at once."""
    scores = process(scores, seen, batch)
    greedy_ids = scores.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_ids
    probs = warp(scores, batch).softmax(dim=-1)
    return torch.where(batch.greedy, greedy_ids, draw(probs, batch.keys[:, batch.col], e))


# ---------------------------------------------------------------------------- histories

class TokenCounts:
    """Per-slot count of every token id in the sequence: the text repetition-penalty history.

    counts [num_slots, vocab] int32 on the device."""

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device | str = "cpu"):
        self.vocab_size = vocab_size
        self.counts = torch.zeros(num_slots, vocab_size, dtype=torch.int32, device=device)

    def reset(self, slot: int, ids: torch.Tensor | Sequence[int]) -> None:
        ids = torch.as_tensor(ids, dtype=torch.int64, device=self.counts.device)
        row = torch.zeros(self.vocab_size, dtype=torch.int32, device=self.counts.device)
        row.scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        self.counts[slot] = row

    def add(self, slots: torch.Tensor, ids: torch.Tensor) -> None:
        """slots [N], ids [N]: one more occurrence each (N may repeat a slot)."""
        self.counts.index_put_((slots, ids), torch.ones_like(ids, dtype=torch.int32), accumulate=True)

    def replace(self, slot: int, old: int, new: int) -> None:
        """A host write turned one `old` token of the sequence into `new`."""
        if old != new:
            self.counts[slot, old] -= 1
            self.counts[slot, new] += 1

    def seen(self, slots: torch.Tensor) -> torch.Tensor:
        return self.counts.index_select(0, slots) > 0                     # [B, V] bool


class CodeHistory:
    """Per-slot, per-codebook presence of the codes of the current audio segment.

    seen [num_slots, C, Kmax + 1] bool; codebook k uses its first K_k (+1 for k = 0) columns."""

    def __init__(self, num_slots: int, codebook_sizes: Sequence[int], device: torch.device | str = "cpu"):
        self.sizes = tuple(codebook_sizes)
        self.mask = torch.zeros(num_slots, len(self.sizes), max(self.sizes) + 1, dtype=torch.bool, device=device)

    def clear(self, slots: torch.Tensor) -> None:
        self.mask[slots] = False

    def add(self, slots: torch.Tensor, codes: torch.Tensor) -> None:
        """slots [B], codes [B, C] (one frame each)."""
        C = codes.shape[1]
        cb = torch.arange(C, device=codes.device)[None, :].expand_as(codes)
        self.mask[slots[:, None].expand_as(codes), cb, codes] = True

    def seen(self, slots: torch.Tensor, k: int, n_classes: int) -> torch.Tensor:
        return self.mask[slots, k, :n_classes]                             # [B, n_classes] bool
