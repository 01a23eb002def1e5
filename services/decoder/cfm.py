"""Conditional flow matching: Euler ODE solve from noise to mel (reference-model.md §9.3).

    t_k = 1 - cos(k/n * pi/2)  (fp32, then cast to the model dtype)
    x = z;  for k in 1..n:  v = (1+w) est(x, mu, t) - w est(x, 0, t);  x += dt v;  t += dt;  dt = t_{k+1} - t

t, dt and x live in the model dtype, so in bf16 the times accumulate with bf16 rounding
(correction 4: 0, .0123, .0488, .1089, ...). The unconditional branch (zero mu) is a separate
estimator call, as in the reference; `batch_cfg=True` runs both branches as one call of batch
2B instead. That gave identical numbers on the CPUs we ran (tests/decoder/test_runner.py holds it to
the fp32 tolerance, since other CPUs may pick other kernels for 2B) but not on a GPU, where
cuBLAS picks kernels by batch size: on an H200 in bf16 it moved the mel by at most 0.047, the
same as decoding a segment alone instead of in a batch, and it was 2.3x faster at batch 1.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from services.common.model_config import CFMParams
from services.decoder.estimator import Estimator, attention_bias

# on_call(step, t, x_in, v_cond, v_uncond): a hook for parity tests and tracing, None in serving.
StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], None]


def t_span(n_steps: int, scheduler: str, dtype: torch.dtype, device=None) -> torch.Tensor:
    """(n_steps + 1,) times in `dtype`, computed in fp32 like the reference."""
    t = torch.linspace(0, 1, n_steps + 1, device=device)
    if scheduler == "cosine":
        t = 1 - torch.cos(t * 0.5 * torch.pi)
    elif scheduler != "linear":
        raise ValueError(f"cfm_params.t_scheduler {scheduler!r}: expected 'cosine' or 'linear'")
    return t.to(dtype)


def draw_noise(shape, dtype: torch.dtype, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial CFM state z ~ N(0, 1), drawn directly in the model dtype (the reference's randn_like(mu))."""
    return torch.randn(shape, dtype=dtype, device=device, generator=generator)


@torch.inference_mode()
def solve(estimator: Estimator, mu: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
          n_steps: int, params: CFMParams, *, batch_cfg: bool = False,
          on_call: StepHook | None = None) -> torch.Tensor:
    """mu (B, M, T) prior, mask (B, 1, T), noise (B, M, T) -> mel (B, M, T) in the model dtype.

    Frames beyond a segment's length keep their noise (the estimator output is masked there)."""
    if params.solver != "euler":
        raise ValueError(f"cfm_params.solver {params.solver!r}: only 'euler' is implemented")
    dtype = estimator.final_proj.weight.dtype
    mu = mu.to(dtype)
    mask = mask.to(dtype)
    x = noise.to(dtype)
    w = params.inference_cfg_rate
    ts = t_span(n_steps, params.t_scheduler, dtype, mu.device)
    bias = attention_bias(mask, dtype)                              # shared by all 2n calls
    if w > 0 and batch_cfg:
        mask2, bias2 = torch.cat([mask, mask]), torch.cat([bias, bias])
        mu2 = torch.cat([mu, torch.zeros_like(mu)])
    t, dt = ts[0], ts[1] - ts[0]
    for step in range(1, n_steps + 1):
        v_uncond = None
        if w > 0 and batch_cfg:
            v_cond, v_uncond = estimator(torch.cat([x, x]), mask2, mu2, t, bias2).chunk(2)
        else:
            v_cond = estimator(x, mask, mu, t, bias)
            if w > 0:
                v_uncond = estimator(x, mask, torch.zeros_like(mu), t, bias)
        if on_call is not None:
            on_call(step - 1, t, x, v_cond, v_uncond)
        v = (1.0 + w) * v_cond - w * v_uncond if w > 0 else v_cond
        x = x + dt * v
        t = t + dt
        if step < n_steps:
            dt = ts[step + 1] - t
    return x
