"""Turn leases: who is working on a turn (architecture.md, "Faults and recovery").

A process that works on a turn (the conversation replica producing its events, the LLM replica
generating it) holds `turn:{id}:lease:{role}` (`Bus.lease_key`), renewed here on a daemon
thread every third of `bus.lease_ttl_s`. A process killed with -9 renews nothing: its lease
expires, and whoever waits on the turn (`Bus.holds_lease`) knows within the TTL instead of a
stall timeout.
"""
from __future__ import annotations

import logging
import threading
import uuid

from services.common.bus import Bus

log = logging.getLogger(__name__)

# KEYS[1] a lease, ARGV[1] the holder's token, ARGV[2] ttl ms. Keep (renew, or take again if it
# lapsed) a lease unless another holder has it: 1 kept, 0 someone else's.
_KEEP_LEASE = """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# Release a lease only if it is still this holder's.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leases:
    """The turn leases one process holds (see Bus.lease_key), renewed on a daemon thread.

    A lease's value is its holder's token, so a holder that was away (Redis unreachable past
    the TTL) and meanwhile lost its turn to another replica notices (`keep` is False) instead
    of producing the turn a second time. `hold` sets a lease at once (so it exists before
    anyone can look for it), `take` only if nobody holds it (one taker wins), `release`
    deletes it if it is still this holder's; the thread renews (or takes again, if it lapsed
    and nobody took it) every held lease every third of the TTL."""

    def __init__(self, bus: Bus):
        self.bus = bus
        self.token = uuid.uuid4().hex.encode()
        self._held: dict[str, None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keep = bus.redis.register_script(_KEEP_LEASE)
        self._release = bus.redis.register_script(_RELEASE_LEASE)
        self._thread = threading.Thread(target=self._renew, name="turn-leases", daemon=True)
        self._thread.start()

    def _px(self) -> int:
        return int(self.bus.lease_ttl_s * 1000)

    def hold(self, turn_id: str, role: str) -> None:
        key = self.bus.lease_key(turn_id, role)
        with self._lock:
            self._held[key] = None
        self.bus.redis.set(key, self.token, px=self._px())

    def take(self, turn_id: str, role: str) -> bool:
        """Take the lease unless someone holds it (SET NX); then renew it."""
        key = self.bus.lease_key(turn_id, role)
        with self._lock:
            if not self.bus.redis.set(key, self.token, nx=True, px=self._px()):
                return False
            self._held[key] = None
            return True

    def keep(self, turn_id: str, role: str) -> bool:
        """Still this holder's (renewed now)? False if another holder took it."""
        key = self.bus.lease_key(turn_id, role)
        with self._lock:
            if key not in self._held:
                return False
            if not int(self._keep(keys=[key], args=[self.token, self._px()])):
                del self._held[key]
                return False
            return True

    def release(self, turn_id: str, role: str) -> None:
        key = self.bus.lease_key(turn_id, role)
        with self._lock:
            self._held.pop(key, None)
            try:
                self._release(keys=[key], args=[self.token])
            except Exception:  # noqa: BLE001 - Redis away: the lease lapses by itself
                log.warning("could not release lease %s; it lapses in %.0f s", key, self.bus.lease_ttl_s)

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def _renew(self) -> None:
        while not self._stop.wait(self.bus.lease_ttl_s / 3):
            with self._lock:     # a lease released meanwhile must not come back
                keys = list(self._held)
                if not keys:
                    continue
                try:
                    pipe = self.bus.redis.pipeline(transaction=False)
                    for key in keys:
                        self._keep(keys=[key], args=[self.token, self._px()], client=pipe)
                    for key, kept in zip(keys, pipe.execute()):
                        if not int(kept):
                            log.warning("lease %s was taken over by another replica", key)
                            self._held.pop(key, None)
                except Exception as e:  # noqa: BLE001 - tried again next round
                    log.warning("could not renew %d turn leases: %s", len(keys), e)

    def stop(self) -> None:
        self._stop.set()
