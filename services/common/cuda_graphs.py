"""CUDA graphs captured on first use, one per static shape: the piece every stage's runner shares.

A stage's runner keeps its inputs and outputs in persistent device buffers and hands `run` a
function that reads and writes only those; the first call for a key captures the function (after
a warm-up on a side stream, which capture requires), later calls replay it: one launch instead of
one per kernel. Disabled (CPU, or graphs off), `run` just calls the function: the same code path.

All graphs of one cache share a memory pool: they replay one at a time, and a captured function
leaves nothing alive in the pool (its results are copied into the caller's buffers)."""
from __future__ import annotations

from typing import Callable, Hashable, Optional

import torch


class GraphCache:
    def __init__(self, device: torch.device, enabled: Optional[bool] = None):
        self.device = torch.device(device)
        self.enabled = (self.device.type == "cuda") if enabled is None else bool(enabled)
        if self.enabled and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.graphs: dict[Hashable, "torch.cuda.CUDAGraph"] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self.stats = {"captures": 0, "replays": 0, "eager": 0}

    def run(self, key: Hashable, fn: Callable[[], None]) -> None:
        if not self.enabled:
            self.stats["eager"] += 1
            fn()
            return
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(fn)
        g.replay()
        self.stats["replays"] += 1

    def _capture(self, fn: Callable[[], None]) -> "torch.cuda.CUDAGraph":
        # The warm-up (lazy inits, library workspaces) runs on the side stream capture needs; it
        # writes the same outputs the replay rewrites. No device-wide synchronisation (which
        # torch.cuda.graph() does): other threads (another stage in one process, a replica's
        # I/O) may be running or capturing meanwhile, and thread_local capture lets them.
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            fn()
            side.synchronize()
            g.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                fn()
            finally:
                g.capture_end()
        current.wait_stream(side)
        self.stats["captures"] += 1
        return g


def ladder(max_n: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= max_n."""
    out = [1]
    while out[-1] < max_n:
        out.append(out[-1] * 2)
    return out


def bucket(n: int, sizes: list[int]) -> int:
    """The smallest size in `sizes` (ascending) that holds n."""
    for b in sizes:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest size {sizes[-1]}")
