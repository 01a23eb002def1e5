"""KV slots of the engine: which sequence holds which slot, the sessions kept across turns
(their cached tokens, for prefix reuse), and LRU eviction of idle sessions. Pure Python."""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence as Seq

from services.llm.protocol import EngineError, Sequence, UnknownSessionError


@dataclass
class Session:
    id: str
    slot: Optional[int] = None
    cached: list[int] = field(default_factory=list)               # tokens in the slot's KV
    cached_pads: list[tuple[int, ...]] = field(default_factory=list)
    busy: bool = False


class SessionTable:
    """KV slots. A running sequence holds one; an idle session keeps its slot (and so its
    KV) until a request needs the slot: then the least recently used idle session loses it."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free = list(range(num_slots - 1, -1, -1))
        self.sessions: "OrderedDict[str, Session]" = OrderedDict()   # LRU order: oldest first
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
        self.sessions[sid] = Session(sid)
        return sid

    def get(self, sid: str) -> Session:
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
            self.free.append(s.slot)
        return s.slot

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
        for victim in self.sessions.values():      # oldest first
            if not victim.busy and victim.slot is not None:
                slot, victim.slot = victim.slot, None
                victim.cached, victim.cached_pads = [], []
                self.evictions += 1
                return slot
        return None

    def release(self, seq: Sequence) -> None:
        sid = seq.request.session_id
        s = self.sessions.get(sid) if sid is not None else None
        if s is None:                              # no session (or closed meanwhile)
            if seq.slot is not None:
                self.free.append(seq.slot)
            return
        s.busy = False
        if seq.slot is None:                       # never admitted: the session's cache is untouched
            return
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
