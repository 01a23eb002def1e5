"""Who runs this step: admission of waiting requests to KV slots (and, with a paged cache, only
when their blocks fit), then per step every decoding sequence forwards its one pending token,
and prefills are cut into chunks under a token budget so a long prompt never stalls running
streams. Pure Python (no model, no device)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from services.llm.kv_slots import SessionTable, common_prefix
from services.llm.protocol import Phase, Sequence


@dataclass(frozen=True)
class Work:
    seq: Sequence
    n: int                 # tokens to forward this step
    decide: bool           # the step ends the pending span: a decision follows


class Scheduler:
    def __init__(self, sessions: SessionTable, max_batch: int, prefill_budget: int):
        if prefill_budget < 1:
            raise ValueError("prefill_budget must be >= 1 token per step")
        self.sessions = sessions
        self.max_batch = max_batch
        self.prefill_budget = prefill_budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.admitted: list[Sequence] = []       # admitted by the last plan(): need device setup

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def all(self) -> list[Sequence]:
        return list(self.waiting) + self.running

    def _blocks_ok(self, seq: Sequence) -> bool:
        """Paged KV: blocks for the prompt and its first decision, plus one block of headroom
        per running sequence (so that admitting does not starve running streams)."""
        pool = self.sessions.pool
        if pool is None:
            return True
        sid = seq.request.session_id
        s = self.sessions.sessions.get(sid) if sid is not None else None
        tokens = len(seq.tokens) + 1
        need = pool.need(s.slot, tokens) if s is not None and s.slot is not None else pool.blocks_for(tokens)
        return self.sessions.make_room(need + len(self.running))

    def _admit(self) -> None:
        self.admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            sid = seq.request.session_id
            if not self._blocks_ok(seq):
                break
            slot = self.sessions.acquire(sid)
            if slot is None:
                break
            self.waiting.popleft()
            seq.slot = slot
            if sid is not None:
                s = self.sessions.sessions[sid]
                n = common_prefix(seq.tokens, seq.pad_rows, s.cached, s.cached_pads, seq.rules.audio_pad)
                seq.reuse_prefix(n)
            self.running.append(seq)
            self.admitted.append(seq)

    def plan(self) -> list[Work]:
        """Admit what fits, then: every sequence with one pending token decodes; the prefill
        budget is shared by the others, oldest first."""
        self._admit()
        live = [s for s in self.running if s.phase != Phase.DONE]
        work = [Work(s, 1, True) for s in live if s.pending == 1]
        budget = self.prefill_budget
        for s in live:
            if s.pending > 1 and budget > 0:
                n = min(s.pending, budget)
                budget -= n
                work.append(Work(s, n, n == s.pending))
        return work

    def retire(self) -> list[Sequence]:
        """Remove finished sequences; their slots go back (or stay with their session)."""
        done = [s for s in self.running if s.phase == Phase.DONE]
        if done:
            self.running = [s for s in self.running if s.phase != Phase.DONE]
            for s in done:
                self.sessions.release(s)
        return done

    def drop_waiting(self, pred: Callable[[Sequence], bool]) -> list[Sequence]:
        gone = [s for s in self.waiting if pred(s)]
        if gone:
            self.waiting = deque(s for s in self.waiting if not pred(s))
        return gone
