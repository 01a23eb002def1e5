"""Tokenizer stage runner: audio -> (L, n_codebooks) codes; plain Python, no Ray.

  waveform (C, N) @ sr -> 16 kHz mono -> 30 s splits -> log-mel (all splits of all requests
  in one batch) -> encoder -> VQ bridge -> RVQ -> each request's splits' codes concatenated.

Each split is computed as if it were alone (see AudioEncoder.forward, conv_lengths), so a
request's codes do not depend on what else is in the batch; `joint_padding=True` instead
reproduces the reference processor's collate of one prompt (all its audios padded to the
longest split), for exact parity with multi-audio prompts.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from services.common.checkpoint import PREFIX, Checkpoint, load_state
from services.common.dtypes import default_dtype
from services.common.model_config import ModelConfig
from services.tokenizer.audio_io import DEFAULT_LIMITS, AudioInputError, AudioLimits, check_waveform, read_audio
from services.tokenizer.encoder import AudioEncoder, sinusoid_dtype
from services.tokenizer.log_mel import LogMel, encoder_length, plan_splits, resampled_length, to_mono_16k
from services.tokenizer.rvq import VQBridge


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """bf16 on CUDA (the reference's dtype), fp32 on CPU."""
    device = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = default_dtype(device)
    return device, dtype


class TokenizerRunner:
    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor] | None, *,
                 device=None, dtype=None, source: str = "tensors",
                 limits: AudioLimits = DEFAULT_LIMITS):
        """tensors: full-key state dict holding the encoder and bridge prefixes; None keeps the
        random init (benchmarks). Modules are built and loaded in fp32, then cast, so stored
        fp32 buffers are rounded to the run dtype as the reference's bf16 load does."""
        self.config = config
        self.audio = config.audio
        self.limits = limits
        self.device, self.dtype = default_device_dtype(device, dtype)
        encoder = AudioEncoder(self.audio, table_dtype=sinusoid_dtype(config.raw.get("torch_dtype")))
        bridge = VQBridge(self.audio)
        if tensors is not None:
            load_state(encoder, tensors, PREFIX["encoder"], source=source, optional=["positional_embedding"])
            load_state(bridge, tensors, PREFIX["bridge"], source=source)
        self.encoder = encoder.to(self.device, self.dtype).eval()
        self.bridge = bridge.to(self.device, self.dtype).eval()
        self.log_mel = LogMel(self.audio).to(self.device)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device=None, dtype=None, **kw) -> "TokenizerRunner":
        tensors = ckpt.tensors([PREFIX["encoder"], PREFIX["bridge"]])
        return cls(ckpt.config, tensors, device=device, dtype=dtype, source=str(ckpt.path), **kw)

    # ------------------------------------------------------------------ API
    def split_count(self, samples: int, sample_rate: int) -> int:
        """How many 30 s splits (each with at least one token) an audio of this length gives."""
        return len(plan_splits(resampled_length(samples, sample_rate, self.audio.sampling_rate), self.audio))

    def tokenize_bytes(self, items: Iterable[bytes], **kw) -> list[torch.Tensor]:
        """Encoded WAV/FLAC files -> codes per file (see tokenize)."""
        decoded = [read_audio(b, self.audio, self.limits) for b in items]
        return self.tokenize(decoded, **kw)

    @torch.inference_mode()
    def tokenize(self, items: Sequence[tuple[torch.Tensor, int]], *,
                 joint_padding: bool = False) -> list[torch.Tensor]:
        """[(waveform (C, N) float in [-1, 1], sample_rate)] -> [codes (L_i, n_codebooks) int64, CPU].

        L_i is the sum of the bridge lengths of the request's splits (its audio_pad count).
        Raises AudioInputError (naming the request) for audio the model cannot take."""
        a = self.audio
        splits: list[torch.Tensor] = []
        owner: list[int] = []
        bridge_lengths: list[int] = []
        for i, (wave, sr) in enumerate(items):
            if isinstance(wave, torch.Tensor) and wave.dim() == 1:
                wave = wave[None]
            try:
                check_waveform(wave, sr, a, self.limits)
            except AudioInputError as e:
                raise AudioInputError(e.reason, f"request {i}: {e}") from None
            mono = to_mono_16k(wave.to(self.device), sr, a)                  # (N16,)
            plan = plan_splits(mono.shape[0], a)
            if not plan:   # unreachable after check_waveform; kept as the contract's guard
                raise AudioInputError("too_short", f"request {i}: audio too short for one audio token")
            for s, e, n in plan:
                splits.append(mono[s:e])
                owner.append(i)
                bridge_lengths.append(n.bridge_length)
        if not splits:
            return []
        codes = self._codes(splits, joint_padding)                          # (ΣL, n_codebooks) CPU
        per_split = codes.split(bridge_lengths)
        out: list[list[torch.Tensor]] = [[] for _ in items]
        for i, c in zip(owner, per_split):
            out[i].append(c)
        return [torch.cat(cs) for cs in out]

    # ------------------------------------------------------------------ batch
    def _codes(self, splits: list[torch.Tensor], joint_padding: bool) -> torch.Tensor:
        """Splits (16 kHz, each n_fft..30 s) -> codes of all splits, rows split-major then time."""
        a = self.audio
        features, mel_lengths = self.log_mel(splits)                        # (B, mel, T), (B,)
        enc_lengths = encoder_length(mel_lengths, a)
        bridge_lengths = enc_lengths // a.avg_pooler
        h = self.encoder(features, enc_lengths, None if joint_padding else mel_lengths)   # (B, T_enc, d)
        codes = self.bridge(h, bridge_lengths)                               # (B, T4, n), -1 beyond length
        valid = codes[..., 0] >= 0                                           # (B, T4)
        return codes[valid].cpu()                                            # (ΣL, n) the only sync
