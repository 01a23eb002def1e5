"""The run dtype rule every stage shares."""
from __future__ import annotations

import torch


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (the reference's `torch_dtype`), fp32 on the CPU (tests, benchmarks)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
