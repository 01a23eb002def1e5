"""VocoderRunner: mels in, 24 kHz waveforms out, batched across lengths (plain Python, no Ray).

Mels of different lengths run as one padded batch: the generator masks its padding (see hift.py)
so each waveform equals the one the mel would get alone, for the same source draws. Each item's
draws are taken from the generator in input order with the item's own length, so with a seed an
item's audio does not depend on how the batch was padded, sorted or split.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from services.common.checkpoint import Checkpoint, load_hift_tensors, load_state
from services.common.model_config import HiFTConfig
from services.vocoder.hift import HiFTGenerator
from services.vocoder.source import SourceDraws, draw_source


class VocodeInputError(ValueError):
    """A mel the vocoder cannot take; the message names the item and the expected layout."""


class VocoderRunner:
    def __init__(self, config: HiFTConfig, tensors: dict[str, torch.Tensor], *, device: str | torch.device = "cpu",
                 source: str = "HiFT tensors", max_batch: int = 16, max_seconds: float = 60.0):
        """config + the HiFT state dict (keys of §10.7, no prefix). Always fp32."""
        self.config = config
        self.device = torch.device(device)
        self.max_batch = max_batch
        # Longest accepted mel; a reference segment is at most 500 tokens = 40 s.
        self.max_frames = int(math.ceil(max_seconds * config.sampling_rate / config.hop_samples))
        model = HiFTGenerator(config)
        load_state(model, tensors, "", source=source)
        self.model = model.to(self.device, torch.float32).eval().fold_weight_norm()

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint | str | Path, **kw) -> "VocoderRunner":
        """From a checkpoint directory: `hift.pt` / `hift.safetensors`, `hift_config.json` if present."""
        if not isinstance(ckpt, Checkpoint):
            ckpt = Checkpoint(ckpt)
        path = ckpt.hift_path()
        return cls(ckpt.hift_config(), load_hift_tensors(path), source=str(path), **kw)

    @property
    def hop(self) -> int:
        return self.config.hop_samples

    # ------------------------------------------------------------------ validation
    def check(self, i: int, mel) -> torch.Tensor:
        if not isinstance(mel, torch.Tensor):
            try:
                mel = torch.as_tensor(mel)
            except (TypeError, ValueError, RuntimeError) as e:
                raise VocodeInputError(f"mel {i}: not an array ({e})") from None
        bins = self.config.in_channels
        if mel.dim() != 2 or mel.shape[0] != bins:
            raise VocodeInputError(f"mel {i} has shape {tuple(mel.shape)}; the vocoder takes ({bins}, T): "
                                   f"{bins} mel bins by T frames at {self.config.sampling_rate // self.hop} Hz")
        if not mel.is_floating_point():
            raise VocodeInputError(f"mel {i} has dtype {mel.dtype}; expected a float tensor")
        t = mel.shape[1]
        if t == 0:
            raise VocodeInputError(f"mel {i} has 0 frames; skip empty segments instead of vocoding them")
        if t > self.max_frames:
            raise VocodeInputError(f"mel {i} has {t} frames ({t * self.hop / self.config.sampling_rate:.1f} s); "
                                   f"the limit is {self.max_frames} frames")
        mel = mel.to(torch.float32)
        if not bool(torch.isfinite(mel).all()):
            raise VocodeInputError(f"mel {i} contains NaN or infinite values")
        return mel

    # ------------------------------------------------------------------ vocoding
    @torch.inference_mode()
    def vocode(self, mels: Sequence[torch.Tensor], seed: int | Sequence[int | None] | None = None,
               context_frames: Sequence[int] | None = None, quiet_source: bool = False) -> list[torch.Tensor]:
        """mels: list of Float[80, T_i] -> list of Float[hop·T_i] (CPU, fp32), in input order.

        seed: makes the random source reproducible (None: fresh randomness). One int seeds the
        whole call; a list seeds each mel on its own (None entries: fresh), so a seeded piece
        sounds the same whatever else shares its batch. An empty list gives [].
        context_frames: per mel, leading frames that are left context (a streamed chunk's
        continuity with the previous one): synthesised, then their samples dropped.
        quiet_source: no random source noise and zero harmonic start phases, so that two
        vocodings differ only through their mels (for measurements, not for serving: the
        reference's source is stochastic)."""
        checked = [self.check(i, m) for i, m in enumerate(mels)]
        if not checked:
            return []
        if seed is None or isinstance(seed, int):
            shared = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
            gens = [shared] * len(checked)
        else:
            if len(seed) != len(checked):
                raise VocodeInputError(f"{len(seed)} seeds for {len(checked)} mels: give one per mel")
            gens = [None if s is None else torch.Generator(device=self.device).manual_seed(s) for s in seed]
        draws = [draw_source(1, self.config.nb_harmonics, m.shape[1] * self.hop, generator=g, device=self.device)
                 for m, g in zip(checked, gens)]
        if quiet_source:
            draws = [SourceDraws(torch.zeros_like(d.phase), torch.zeros_like(d.noise)) for d in draws]
        out: list[torch.Tensor | None] = [None] * len(checked)
        # Longest first, so that each batch pads as little as possible.
        order = sorted(range(len(checked)), key=lambda i: -checked[i].shape[1])
        for start in range(0, len(order), self.max_batch):
            idx = order[start:start + self.max_batch]
            waves = self._run([checked[i] for i in idx], [draws[i] for i in idx])
            for i, w in zip(idx, waves):
                out[i] = w
        if context_frames is not None:
            if len(context_frames) != len(out) or any(not 0 <= c < m.shape[1] for c, m in zip(context_frames, checked)):
                raise VocodeInputError("context_frames must give, per mel, fewer leading frames than it has")
            out = [w[c * self.hop:] for w, c in zip(out, context_frames)]
        return out  # type: ignore[return-value]

    def _run(self, mels: list[torch.Tensor], draws: list[SourceDraws]) -> list[torch.Tensor]:
        frames = [m.shape[1] for m in mels]
        t_max, n_max = max(frames), max(frames) * self.hop
        mel = torch.zeros(len(mels), self.config.in_channels, t_max)            # (B, 80, T_max)
        phase = torch.cat([d.phase for d in draws])                              # (B, H+1, 1)
        noise = torch.zeros(len(mels), self.config.nb_harmonics + 1, n_max, device=self.device)
        for b, (m, d) in enumerate(zip(mels, draws)):
            mel[b, :, :m.shape[1]] = m
            noise[b, :, :d.noise.shape[-1]] = d.noise[0]
        lengths = None
        if any(t != t_max for t in frames):
            lengths = torch.tensor(frames, device=self.device)
        wave = self.model(mel.to(self.device), lengths, draws=SourceDraws(phase, noise))  # (B, hop·T_max)
        wave = wave.cpu()
        return [wave[b, :t * self.hop] for b, t in enumerate(frames)]
