"""KV slots of the engine: which sequence holds which slot, the sessions kept across turns
(their cached tokens, for prefix reuse), LRU eviction of idle sessions, and the blocks of a
paged KV cache (BlockPool). Pure Python."""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence as Seq

from services.llm.protocol import EngineError, Sequence, UnknownSessionError


class BlockPool:
    """The blocks of a paged KV cache (services/llm/kv_cache.py) and which slot owns which.

    Blocks 1..num_blocks are handed out (0 is the cache's null block). `on_change(slot, blocks)`
    mirrors a slot's list into the device table; it runs only when the list changes."""

    def __init__(self, num_blocks: int, block_size: int, num_slots: int,
                 on_change: Callable[[int, list[int]], None] = lambda slot, blocks: None):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks, 0, -1))            # pop() hands out low ids first
        self.owned: list[list[int]] = [[] for _ in range(num_slots)]
        self.on_change = on_change

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def need(self, slot: int, tokens: int) -> int:
        """Blocks the slot still lacks to hold `tokens` tokens."""
        return max(0, self.blocks_for(tokens) - len(self.owned[slot]))

    @property
    def available(self) -> int:
        return len(self.free)

    def ensure(self, slot: int, tokens: int) -> bool:
        """Make the slot hold `tokens` tokens; False (and nothing taken) if too few blocks are free."""
        n = self.need(slot, tokens)
        if n > len(self.free):
            return False
        if n:
            self.owned[slot] += [self.free.pop() for _ in range(n)]
            self.on_change(slot, self.owned[slot])
        return True

    def truncate(self, slot: int, tokens: int) -> None:
        """Keep the blocks of the first `tokens` tokens, free the rest."""
        keep = self.blocks_for(tokens)
        extra = self.owned[slot][keep:]
        if extra:
            del self.owned[slot][keep:]
            self.free += extra[::-1]
            self.on_change(slot, self.owned[slot])

    def release(self, slot: int) -> None:
        self.truncate(slot, 0)


@dataclass
class KVSession:
    """A conversation session as the LLM replica sees it: the KV slot it holds and the tokens
    cached there (orchestrator/sessions.py keeps the conversation's record in Redis)."""

    id: str
    slot: Optional[int] = None
    cached: list[int] = field(default_factory=list)               # tokens in the slot's KV
    cached_pads: list[tuple[int, ...]] = field(default_factory=list)
    busy: bool = False


class SessionTable:
    """KV slots. A running sequence holds one; an idle session keeps its slot (and so its
    KV) until a request needs the slot: then the least recently used idle session loses it."""

    def __init__(self, num_slots: int, pool: Optional[BlockPool] = None):
        self.num_slots = num_slots
        self.pool = pool                         # paged KV: a freed slot gives its blocks back
        self.free = list(range(num_slots - 1, -1, -1))
        self.sessions: "OrderedDict[str, KVSession]" = OrderedDict()   # LRU order: oldest first
        self._ids = itertools.count()
        self.evictions = 0

    def reserve(self, sid: str) -> None:
        """A turn was submitted for this session: one at a time; its cache is kept from
        eviction while the turn waits."""
        s = self.get(sid)
        if s.busy:
            raise EngineError(f"session {sid!r} already has a turn in progress")
        s.busy = True

    def open(self, sid: Optional[str] = None) -> str:
        sid = sid if sid is not None else f"session-{next(self._ids)}"
        if sid in self.sessions:
            raise EngineError(f"session {sid!r} is already open")
        self.sessions[sid] = KVSession(sid)
        return sid

    def get(self, sid: str) -> KVSession:
        s = self.sessions.get(sid)
        if s is None:
            raise UnknownSessionError(f"unknown session {sid!r}: open it first (engine.open_session), "
                                      f"or it was closed")
        return s

    def close(self, sid: str) -> Optional[int]:
        s = self.get(sid)
        if s.busy:
            raise EngineError(f"session {sid!r} has a turn in progress; cancel it before closing")
        del self.sessions[sid]
        if s.slot is not None:
            self._free(s.slot)
        return s.slot

    def _free(self, slot: int) -> None:
        self.free.append(slot)
        if self.pool is not None:
            self.pool.release(slot)

    def acquire(self, sid: Optional[str]) -> Optional[int]:
        """A slot for a new sequence (None: none free now; wait)."""
        s = self.sessions[sid] if sid is not None else None
        if s is not None and s.slot is not None:
            self.sessions.move_to_end(sid)
            return s.slot
        slot = self.free.pop() if self.free else self._evict()
        if slot is not None and s is not None:
            s.slot, s.cached, s.cached_pads = slot, [], []
            self.sessions.move_to_end(sid)
        return slot

    def _evict(self) -> Optional[int]:
        """Take the slot of the least recently used idle session holding one (its KV is lost)."""
        for victim in self.sessions.values():      # oldest first
            if not victim.busy and victim.slot is not None:
                slot, victim.slot = victim.slot, None
                victim.cached, victim.cached_pads = [], []
                self.evictions += 1
                if self.pool is not None:
                    self.pool.release(slot)
                return slot
        return None

    def make_room(self, blocks: int) -> bool:
        """Paged KV: evict idle sessions, least recently used first, until `blocks` blocks are
        free. False if even that is not enough (nothing is evicted then)."""
        pool = self.pool
        if pool is None or pool.available >= blocks:
            return True
        idle = sum(len(pool.owned[s.slot]) for s in self.sessions.values() if not s.busy and s.slot is not None)
        if pool.available + idle < blocks:
            return False
        while pool.available < blocks:
            self.free.append(self._evict())
        return True

    def release(self, seq: Sequence) -> None:
        sid = seq.request.session_id
        s = self.sessions.get(sid) if sid is not None else None
        if s is None:                              # no session (or closed meanwhile)
            if seq.slot is not None:
                self._free(seq.slot)
            return
        s.busy = False
        if seq.slot is None:                       # never admitted: the session's cache is untouched
            return
        if self.pool is not None:                  # keep the blocks of the cached tokens only
            self.pool.truncate(seq.slot, seq.kv_len)
        s.cached = seq.tokens[:seq.kv_len]
        s.cached_pads = seq.pad_rows[:seq.pads_fwd]
        self.sessions.move_to_end(sid)


def common_prefix(prompt: Seq[int], prompt_pads: Seq[tuple], cached: Seq[int], cached_pads: Seq[tuple],
                  audio_pad: int) -> int:
    """Length of the shared prefix of two token sequences; an audio_pad matches only when
    its codes match too (its embedding is the codes')."""
    n = 0
    p = 0
    for a, b in zip(prompt, cached):
        if a != b:
            break
        if a == audio_pad:
            if prompt_pads[p] != cached_pads[p]:
                break
            p += 1
        n += 1
    return n
