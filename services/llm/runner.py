"""The LLM stage's decode runner: one step of B running sequences, each forwarding one token,
and their decisions, on persistent device buffers; on CUDA, replayed as CUDA graphs.

An eager decode step of the real model dispatches thousands of small kernels (28 backbone
layers, then 8 codebook steps of the 3-layer audio head and their samplers); their launch cost,
not the arithmetic, bounds a frame at small batch. Captured once per shape, a step is one graph
launch per piece:

    backbone(B, L)   ids/codes/positions/slots/cache positions -> hidden (B, H), KV written
    text_tail(Bt)    hidden rows of text decisions -> lm_head (fp32) -> penalty, sampling -> Long[Bt]
    audio_tail(Ba)   hidden rows of audio decisions -> 8-codebook audio head with sampling -> Long[Ba, C]

B, Bt and Ba are padded up to a ladder of batch sizes (1, 2, 4, ... max_batch) and L, the
attended KV prefix, up to a power of two; `warm_up` captures every shape before serving (else a
shape is captured the first time it is needed).
Padding rows run on a scratch KV slot (the cache has one more slot than the engine hands out),
so they never touch a sequence's cache. Every input is copied into the buffers with one
host-to-device copy per table; the decisions come back with one device-to-host read.

The same code runs eagerly on the CPU (tests) and when graphs are off: only the replay differs.
Plain PyTorch; the engine (engine.py) decides what runs, this module only computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from services.common.cuda_graphs import GraphCache, bucket, ladder
from services.llm import sampler
from services.llm.model import AudioLLM


@dataclass(frozen=True)
class DecodeRow:
    """One sequence's token this step. decide: "text", "audio" or None (a prompt chunk of one
    token that does not end the prompt)."""

    token: int
    codes: Optional[tuple[int, ...]]     # the frame's codes when token is <audio_pad>
    position: int                        # 1-based RoPE position
    slot: int
    cache_pos: int                       # tokens already in the slot
    decide: Optional[str]
    params: Optional[sampler.SamplingParams] = None
    seed: int = 0
    draws: int = 0                       # the sequence's sampling-counter position
    ban_eoa: bool = False                # forced schedule: the audio segment must not end


class _Tables:
    """Static device tables of one sampling phase for up to n rows, and their host staging."""

    def __init__(self, n: int, draws: int, device: torch.device):
        self.draws = draws
        self.f = torch.zeros(n, 3, dtype=torch.float32, device=device)
        self.i = torch.zeros(n, 3 + draws, dtype=torch.int64, device=device)
        self.f[:, :2] = 1.0                                  # penalty, temperature: identity rows

    def fill(self, rows: Sequence[DecodeRow]) -> None:
        f, i = sampler.SamplingBatch.host_tables([r.params for r in rows], [r.seed for r in rows],
                                           [r.draws for r in rows], self.draws)
        self.f[:len(rows)].copy_(torch.tensor(f, dtype=torch.float32), non_blocking=True)
        self.i[:len(rows)].copy_(torch.from_numpy(i), non_blocking=True)

    def batch(self, n: int) -> sampler.SamplingBatch:
        return sampler.SamplingBatch.from_tables(self.f[:n], self.i[:n])      # every step, every row


class DecodeRunner:
    """Decode steps over a model, its slotted KV cache and the sampling histories.

    The cache, `counts` (sampler.TokenCounts) and `codes` (sampler.CodeHistory) must have num_slots + 1
    slots: the last is the scratch slot of padding rows."""

    def __init__(self, model: AudioLLM, cache, counts: sampler.TokenCounts, codes: sampler.CodeHistory, *,
                 audio_pad: int, eos: int, eoa: int, max_batch: int, kv_bucket: int = 128,
                 cuda_graphs: Optional[bool] = None, compile_backend: "str | Callable | None" = None):
        self.model, self.cache, self.counts, self.codes = model, cache, counts, codes
        self.audio_pad, self.eos, self.eoa = audio_pad, eos, eoa
        w = model.lm_head.weight
        self.device = w.device
        self.C = len(model.cfg.audio.codebook_sizes)
        self.n_classes = max(model.cfg.audio.codebook_sizes) + 1           # codebook 0 has its end-of-audio class
        self.scratch = cache.num_slots - 1
        self.ladder = ladder(max_batch)
        n = self.ladder[-1]
        self.kv_ladder = []
        q = max(1, kv_bucket)
        while q < cache.max_len:
            self.kv_ladder.append(q)
            q *= 2
        self.kv_ladder.append(cache.max_len)
        dev, long = self.device, torch.int64
        # step inputs (rows beyond the step's count keep padding values: scratch slot, position 1)
        self.ints = torch.zeros(n, 4 + self.C, dtype=long, device=dev)   # token, position, slot, cache_pos, codes
        self._pad_row = [eos, 1, self.scratch, 0] + [0] * self.C
        self.ints.copy_(torch.tensor([self._pad_row] * n, dtype=long))
        # decisions: which hidden rows decide, and their slots (histories)
        self.text_sel = torch.zeros(n, 2, dtype=long, device=dev)      # hidden row, slot
        self.audio_sel = torch.zeros(n, 2, dtype=long, device=dev)
        self.ban = torch.zeros(n, dtype=torch.bool, device=dev)
        self.text_tables = _Tables(n, 1, dev)
        self.audio_tables = _Tables(n, self.C, dev)
        # step outputs
        self.hidden = torch.zeros(n, model.cfg.llm.hidden_size, dtype=w.dtype, device=dev)
        self.text_out = torch.zeros(n, dtype=long, device=dev)
        self.audio_out = torch.zeros(n, self.C, dtype=long, device=dev)
        self.graphs = GraphCache(self.device, cuda_graphs)
        self.stats = self.graphs.stats
        if compile_backend:
            # Each piece is one graph without breaks (tests/llm/test_runner.py), so a compiler
            # can fuse its elementwise chains (norms, RoPE, residuals, the samplers' masks)
            # into few kernels; batch and KV length stay symbolic (one compile, not one per
            # shape), and the CUDA graphs then capture the compiled kernels.
            # Sizes 1 and "the whole buffer" are specialised (batch and KV blocks): up to 9
            # variants of the backbone, over dynamo's default limit of 8 per function.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
            for name in ("_backbone", "_text_tail", "_audio_tail"):
                setattr(self, name, torch.compile(getattr(self, name), backend=compile_backend,
                                                  fullgraph=True, dynamic=True))

    # ------------------------------------------------------------------ the pieces
    def _backbone(self, B: int, L: int) -> None:
        ints = self.ints[:B]
        ids, pos, slots, cache_pos, codes = ints[:, 0:1], ints[:, 1:2], ints[:, 2], ints[:, 3], ints[:, 4:]
        m = self.model
        x = m.embed_decode(ids, codes)                                       # (B, 1, H)
        h = m.forward(x, pos, self.cache, slots, cache_pos, None, kv_len=L)
        self.hidden[:B].copy_(h[:, -1])

    def _text_tail(self, B: int) -> None:
        h = self.hidden.index_select(0, self.text_sel[:B, 0])
        slots = self.text_sel[:B, 1]
        logits = self.model.logits(h).float()                                # correction 15: fp32 text logits
        # an <audio_pad> sampled as text would have no codes to embed (the reference asserts)
        logits[:, self.audio_pad] = float("-inf")
        self.text_out[:B].copy_(sampler.choose(logits, self.counts.seen(slots), self.text_tables.batch(B)))

    def _audio_tail(self, B: int) -> None:
        h = self.hidden.index_select(0, self.audio_sel[:B, 0])
        slots = self.audio_sel[:B, 1]
        ban = self.ban[:B]
        batch = self.audio_tables.batch(B)
        eoa = self.eoa
        # the exponential race's variates of all codebooks in one pass (the same numbers as one
        # call per codebook: a variate depends only on its key and column), ~20 kernels per frame
        # instead of ~20 per codebook
        e = sampler.exponentials(batch.keys, self.n_classes)                   # (B, C, max classes)

        def choose(k: int, logits: torch.Tensor) -> torch.Tensor:
            if k == 0:                      # rows on a forced schedule may not end the segment
                col = logits[:, eoa].masked_fill(ban, float("-inf"))
                logits = torch.cat([logits[:, :eoa], col[:, None], logits[:, eoa + 1:]], dim=1)
            return sampler.choose(logits, self.codes.seen(slots, k, logits.shape[-1]), batch.offset(k), e[:, k])

        self.audio_out[:B].copy_(self.model.audio_frame(h, choose))

    def _run(self, key: tuple, fn, *args) -> None:
        self.graphs.run(key, lambda: fn(*args))

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def forward(self, rows: Sequence[DecodeRow]) -> None:
        """Forward every row's one token; its last hidden state lands in hidden[i] for row i."""
        n = len(rows)
        B = bucket(n, self.ladder)
        table = [[r.token, r.position, r.slot, r.cache_pos] + list(r.codes or (0,) * self.C) for r in rows]
        table += [self._pad_row] * (B - n)
        self.ints[:B].copy_(torch.tensor(table, dtype=torch.int64), non_blocking=True)
        need = max(r.cache_pos for r in rows) + 1
        L = next(q for q in self.kv_ladder if q >= need)
        self._run(("backbone", B, L), self._backbone, B, L)

    def put_hidden(self, start: int, h: torch.Tensor) -> None:
        """Hidden states computed elsewhere (the last token of prefill chunks) into rows start.."""
        self.hidden[start:start + h.shape[0]].copy_(h)

    @torch.inference_mode()
    def decide(self, rows: Sequence[DecodeRow]) -> tuple[list[int], list[list[int]]]:
        """Decisions of the rows that decide (row i's hidden state is hidden[i]), in row order:
        text tokens, and audio frames (C codes each). The step's one device-to-host read."""
        text = [i for i, r in enumerate(rows) if r.decide == "text"]
        audio = [i for i, r in enumerate(rows) if r.decide == "audio"]
        outs = []
        if text:
            Bt = bucket(len(text), self.ladder)
            sel = [[i, rows[i].slot] for i in text] + [[0, self.scratch]] * (Bt - len(text))
            self.text_sel[:Bt].copy_(torch.tensor(sel, dtype=torch.int64), non_blocking=True)
            self.text_tables.fill([rows[i] for i in text])
            self._run(("text", Bt), self._text_tail, Bt)
            outs.append(self.text_out[:len(text)])
        if audio:
            Ba = bucket(len(audio), self.ladder)
            sel = [[i, rows[i].slot] for i in audio] + [[0, self.scratch]] * (Ba - len(audio))
            self.audio_sel[:Ba].copy_(torch.tensor(sel, dtype=torch.int64), non_blocking=True)
            self.ban[:Ba].copy_(torch.tensor([rows[i].ban_eoa for i in audio] + [False] * (Ba - len(audio))),
                                non_blocking=True)
            self.audio_tables.fill([rows[i] for i in audio])
            self._run(("audio", Ba), self._audio_tail, Ba)
            outs.append(self.audio_out[:len(audio)].flatten())
        flat = torch.cat(outs).tolist() if outs else []
        nt = len(text)
        return flat[:nt], [flat[nt + j * self.C: nt + (j + 1) * self.C] for j in range(len(audio))]

    @torch.inference_mode()
    def warm_up(self) -> int:
        """Run every shape once (capturing its graph on a GPU), so no request pays for a
        capture: the backbone for each batch and KV-length bucket, each tail for each batch.
        Only padding rows run, on the scratch slot. Returns the number of shapes."""
        n = self.ladder[-1]
        self.ints.copy_(torch.tensor([self._pad_row] * n, dtype=torch.int64))
        self.text_sel.copy_(torch.tensor([[0, self.scratch]] * n, dtype=torch.int64))
        self.audio_sel.copy_(torch.tensor([[0, self.scratch]] * n, dtype=torch.int64))
        self.ban.zero_()
        shapes = 0
        for B in self.ladder:
            for L in self.kv_ladder:
                self._run(("backbone", B, L), self._backbone, B, L)
                shapes += 1
            self._run(("text", B), self._text_tail, B)
            self._run(("audio", B), self._audio_tail, B)
            shapes += 2
        return shapes

    def step(self, rows: Sequence[DecodeRow]) -> tuple[list[int], list[list[int]]]:
        """forward + decide for rows that all forward one token."""
        self.forward(rows)
        return self.decide(rows)
