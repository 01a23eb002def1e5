"""Greedy audio codes compared across computations that differ only by rounding.

Two computations of the same logits (another CPU kernel, another op order or batch shape)
agree to a tolerance, not bit for bit, so their argmaxes agree only where the top-1 margin is
larger than the difference. Codes are compared exactly up to each row's first near-tie, and
every reference code must be a near-argmax of our logits along the reference's own path.
"""
from __future__ import annotations

from typing import Callable

import torch


def teacher_forced(head, x: torch.Tensor, tables, codes: torch.Tensor) -> list[torch.Tensor]:
    """The logits `head.frame` hands to `choose` when the codes of `codes` (B, D) are forced:
    one tensor per codebook, (B, K_0 + 1) for k = 0 and (B, K_k) after."""
    seen = {}

    def choose(k, logits):
        seen[k] = logits
        return codes[:, k]

    out = head.frame(x, tables, choose)
    assert torch.equal(out, codes)                           # integer codes, just handed back
    return [seen[k] for k in range(head.depth)]


def assert_greedy_frame(ref: torch.Tensor, logits: list[torch.Tensor], tol: Callable[[int, torch.Tensor], float],
                        *others: torch.Tensor, what: str = "") -> int:
    """ref (B, D): a greedy frame of another computation; logits: ours, teacher-forced along
    ref (`teacher_forced`); tol(k, logits_k): how far the two computations' logits may differ.

    Each ref code must be within tol of our best logit. Each of `others` (greedy frames of
    computations within tol of ours) must equal ref on every row up to its first decision
    whose top-1 margin is at most 2·tol (rounding may settle a near-tie either way, and the
    later codebooks are conditioned on it). Returns how many decisions were compared exactly."""
    exact = 0
    for b in range(ref.shape[0]):
        for k, lg in enumerate(logits):
            row = lg[b].float()
            eps = tol(k, lg)
            top = row.topk(2).values
            c = int(ref[b, k])
            assert row[c] >= top[0] - eps, (f"{what} row {b} codebook {k}: reference code {c} has logit "
                                            f"{row[c].item():.6g}, our best is {top[0].item():.6g} (tol {eps:.3g})")
            if top[0] - top[1] <= 2 * eps:
                break
            for o in others:
                assert int(o[b, k]) == c, f"{what} row {b} codebook {k}: code {int(o[b, k])} != reference {c}"
            exact += 1
    return exact
