"""F0 predictor of HiFT (ConvRNNF0Predictor, reference-model.md §10.3), plus the weight-normed
convolutions every vocoder module uses.

The reference wraps its convolutions in the legacy `torch.nn.utils.weight_norm`, so the checkpoint
(`hift.pt`) stores `weight_g` / `weight_v` instead of `weight`. We declare exactly those parameters
and compute the effective weight w = g · v / ||v||, the norm taken over every dim but 0. For a
ConvTranspose1d dim 0 is the *input*-channel axis, so its g is (in, 1, 1).

`fold()` caches the effective weight in a non-persistent buffer (state_dict keys stay g/v) so that
inference does not renormalise every call; call it again after loading new g/v.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w = g · v / ||v||, ||·|| over all dims but 0 (legacy weight_norm with dim=0).

    Computed by torch's fused `_weight_norm` (what the reference's weight_norm hook calls): its
    reduction order differs from `v.norm()` by an ulp or so, and f0 goes through a phase cumsum
    that turns an ulp of weight into ~1e-3 of waveform; with the fused op f0 is bit-identical."""
    return torch._weight_norm(v, g, 0)


class _WeightNormed(nn.Module):
    """weight_g (D0, 1, 1), weight_v (D0, D1, K), bias; cached effective weight once folded."""

    def __init__(self, d0: int, d1: int, k: int, bias_size: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(d0, 1, 1))
        self.weight_v = nn.Parameter(torch.randn(d0, d1, k) / math.sqrt(d1 * k))
        self.bias = nn.Parameter(torch.zeros(bias_size))
        self.register_buffer("folded_weight", None, persistent=False)

    def effective_weight(self) -> torch.Tensor:
        return self.folded_weight if self.folded_weight is not None else weight_norm(self.weight_g, self.weight_v)

    @torch.no_grad()
    def fold(self) -> None:
        self.folded_weight = weight_norm(self.weight_g, self.weight_v)

    def unfold(self) -> None:
        self.folded_weight = None


class WNConv1d(_WeightNormed):
    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1):
        super().__init__(cout, cin, kernel_size, cout)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, Cin, L) -> (B, Cout, L')
        return F.conv1d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation)


class WNConvTranspose1d(_WeightNormed):
    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int):
        super().__init__(cin, cout, kernel_size, cout)  # weight (Cin, Cout, K): g over Cin
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, Cin, L) -> (B, Cout, (L-1)·stride - 2·padding + K)
        return F.conv_transpose1d(x, self.effective_weight(), self.bias, self.stride, self.padding)


def fold_weight_norm(module: nn.Module) -> None:
    """Cache every effective weight under `module` (after loading; weights are fp32 anyway)."""
    for m in module.modules():
        if isinstance(m, _WeightNormed):
            m.fold()


def unfold_weight_norm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, _WeightNormed):
            m.unfold()


class ConvRNNF0Predictor(nn.Module):
    """mel (B, in_channels, T) -> f0 (B, T) in Hz.

    5 × [weight-normed Conv1d(k3, p1), ELU], then Linear(cond -> 1) and |·|. Keys:
    condnet.{0,2,4,6,8}.weight_g/weight_v/bias (the ELUs sit at the odd indices, as in the
    reference nn.Sequential), classifier.weight/bias."""

    def __init__(self, in_channels: int = 80, cond_channels: int = 512, num_layers: int = 5):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += [WNConv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # mel: (B, C_mel, T); mask: (B, 1, T) 1.0 on valid frames, or None when none are padded.
        # Zeroing padded frames after each layer makes every conv see the zero padding it would
        # see on the unpadded mel (ELU(0) = 0), so valid frames do not depend on the padding.
        x = mel if mask is None else mel * mask
        for layer in self.condnet:
            x = layer(x)
            if isinstance(layer, nn.ELU) and mask is not None:
                x = x * mask
        # (B, cond, T) -> (B, T, cond) -> (B, T, 1) -> (B, T)
        return torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))
