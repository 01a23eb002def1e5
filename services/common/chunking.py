"""How a streamed audio segment is cut into decode chunks (low-latency mode).

Shared by the LLM stage, which sends one decode job per chunk as the frames arrive
(services/llm/publisher.py), and the decoder, which decodes a segment chunk by chunk
(services/decoder/runner.py): both must cut at the same tokens."""
from __future__ import annotations


def chunk_plan(n_tokens: int, first_chunk: int = 6, growth: float = 2.0,
               max_chunk: int = 50) -> list[tuple[int, int]]:
    """Token ranges [start, end) covering n_tokens: first_chunk, then growing by `growth`, capped."""
    if first_chunk < 1 or growth < 1.0 or max_chunk < first_chunk:
        raise ValueError(f"chunk plan needs first_chunk >= 1, growth >= 1, max_chunk >= first_chunk "
                         f"(got {first_chunk}, {growth}, {max_chunk})")
    plan, start, size = [], 0, float(first_chunk)
    while start < n_tokens:
        end = min(n_tokens, start + int(size))
        plan.append((start, end))
        start, size = end, min(float(max_chunk), size * growth)
    return plan
