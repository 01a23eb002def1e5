"""Parity harness: golden tensors from the shared fixture root (see its README).

The root comes from BAICHUAN_AUDIO_FIXTURES (default ../shared/fixtures beside the repo).
Every module is built from the root's model_config.json; tolerances come from its
tolerances.json (the replay differences of the reference on other CPU kernels), with a
floor per dtype so a self-consistent root does not demand bit-exactness.
"""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.common.model_config import HiFTConfig, ModelConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO.parent / "shared" / "fixtures"

# Floors, relative above magnitude 1 (README "Suggested acceptance"): fp32 ~1e-5, front-end
# log-mel 1e-4, bf16 8 eps: twice the largest bf16 difference measured on native, AVX2 and
# scalar kernels (0.015 of the magnitude, CFM estimator and audio-head logits).
FLOOR = {"fp32": 1e-5, "frontend": 1e-4, "bf16": 8 * 2 ** -8}
# Margin over the largest replay difference seen on other kernels.
MARGIN = 2.0


def fixture_root() -> Path:
    return Path(os.environ.get("BAICHUAN_AUDIO_FIXTURES", str(DEFAULT_ROOT)))


def missing(msg: str):
    """Something a test needs is absent: skip on a developer machine, fail under CI (CI=true),
    where a silent skip would hide a whole module."""
    if os.environ.get("CI") == "true":
        pytest.fail(msg + " (required under CI=true)")
    pytest.skip(msg)


class Fixtures:
    def __init__(self, root: Path):
        self.root = root

    @cached_property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_file(self.root / "model_config.json")

    @cached_property
    def hift_config(self) -> HiFTConfig:
        return HiFTConfig.from_dict(json.loads((self.root / "05_vocoder" / "config.json").read_text()))

    @cached_property
    def tolerances(self) -> dict:
        return json.loads((self.root / "tolerances.json").read_text())["replay"]

    @cached_property
    def readme(self) -> str:
        return (self.root / "README.md").read_text()

    def has(self, fixture: str) -> bool:
        return (self.root / fixture).is_dir()

    def require(self, fixture: str) -> None:
        """Skip when the root lacks this fixture folder; under CI that is a failure."""
        if not self.has(fixture):
            missing(f"fixture {fixture} not in the fixture root {self.root}")

    def load(self, fixture: str, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / fixture / name))

    def json(self, fixture: str, name: str) -> dict:
        return json.loads((self.root / fixture / name).read_text())

    def tol(self, check: str, kind: str, scale: float = 1.0) -> float:
        """Tolerance for a check named as in tolerances.json (e.g. '02/bf16/encoder_out').

        kind: 'fp32', 'bf16' or 'frontend'. The larger of the floor, relative above 1 (rounding
        differences grow with the magnitude of what is rounded: `scale`), and MARGIN times the
        largest replay difference, which was measured at the tensor's own magnitude and so is
        not scaled again. Unknown checks get the floor."""
        seen = [float(v[check]) for v in self.tolerances.values() if check in v]
        return max([FLOOR[kind] * max(1.0, scale)] + [MARGIN * s for s in seen])

    def assert_close(self, actual: torch.Tensor, expected: torch.Tensor, check: str, kind: str,
                     scale: float | None = None) -> None:
        """max |actual - expected| <= tol(check, kind, scale).

        `scale` defaults to max |expected|; pass the magnitude of the pre-activation where a
        bounded function of a large one is compared (e.g. sin of an O(5) phase)."""
        assert actual.shape == expected.shape, f"{check}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        if not actual.numel():
            return
        diff = (actual.float() - expected.float()).abs().max().item()
        if scale is None:
            scale = expected.float().abs().max().item()
        tol = self.tol(check, kind, scale)
        _log(check, kind, diff, scale, tol)
        assert diff <= tol, f"{check}: max |diff| {diff:.3g} > tolerance {tol:.3g} (scale {scale:.3g})"


def _log(check: str, kind: str, diff: float, scale: float, tol: float) -> None:
    """BAICHUAN_AUDIO_PARITY_LOG=FILE: one JSON line per comparison (what the README's table of
    measured differences is made from)."""
    path = os.environ.get("BAICHUAN_AUDIO_PARITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"check": check, "kind": kind, "diff": diff, "scale": scale, "tol": tol,
                                "cpu": torch.backends.cpu.get_cpu_capability()}) + "\n")
