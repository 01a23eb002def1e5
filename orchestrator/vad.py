"""Server-side voice activity detection for the Realtime API's `server_vad` (plain Python: torch
and the `silero-vad` package, which ships its model; no Ray, Redis or gRPC).

`SpeechDetector` takes a caller's 24 kHz PCM16 as it arrives and says when speech started and
when it stopped, in ms of the caller's input audio: speech starts at the first window whose
speech probability reaches `threshold`; it stops once the probability has stayed below
`threshold - NEG_MARGIN` (silero's own hysteresis) for `silence_ms`. Prefix padding is the
caller's business (realtime.py keeps that much audio before the start in the buffer)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchaudio.functional as AF

VAD_RATE = 16000          # silero's rate here (it also takes 8 kHz)
WINDOW = 512              # samples per silero window at 16 kHz (32 ms): what the model takes
NEG_MARGIN = 0.15         # silero's VADIterator: speech ends below threshold - 0.15


def load_model():
    """Silero VAD from the package (its TorchScript model; nothing is downloaded)."""
    from silero_vad import load_silero_vad

    return load_silero_vad()


@dataclass
class VadEvent:
    kind: str             # "speech_started" or "speech_stopped"
    ms: float             # where, in ms of the caller's input audio


class SpeechDetector:
    def __init__(self, model, *, threshold: float = 0.5, silence_ms: float = 500.0, input_rate: int = 24000):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"turn_detection.threshold={threshold:g} is not in (0, 1)")
        if silence_ms <= 0:
            raise ValueError(f"turn_detection.silence_duration_ms={silence_ms:g} must be positive")
        self.model = model
        self.threshold = threshold
        self.silence_ms = silence_ms
        self.input_rate = input_rate
        self.pending = np.zeros(0, np.float32)     # 16 kHz samples not yet a whole window
        self.consumed = 0                          # 16 kHz samples given to the model
        self.speaking = False
        self.silence_from: float | None = None     # ms where the current run of silence began
        self.model.reset_states()

    def _ms(self, samples_16k: int) -> float:
        return samples_16k * 1000.0 / VAD_RATE

    def feed(self, pcm16: bytes) -> list[VadEvent]:
        """The next piece of the caller's audio (PCM16 mono at `input_rate`) -> the starts and
        stops it completes."""
        x = torch.from_numpy(np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0)
        if self.input_rate != VAD_RATE:
            x = AF.resample(x, self.input_rate, VAD_RATE)
        self.pending = np.concatenate([self.pending, x.numpy()])
        out: list[VadEvent] = []
        while len(self.pending) >= WINDOW:
            window, self.pending = self.pending[:WINDOW], self.pending[WINDOW:]
            with torch.no_grad():
                p = float(self.model(torch.from_numpy(window.copy()), VAD_RATE))
            start_ms = self._ms(self.consumed)
            self.consumed += WINDOW
            if not self.speaking:
                if p >= self.threshold:
                    self.speaking, self.silence_from = True, None
                    out.append(VadEvent("speech_started", start_ms))
                continue
            if p >= self.threshold - NEG_MARGIN:
                self.silence_from = None
            elif self.silence_from is None:
                self.silence_from = start_ms
            if self.silence_from is not None and self._ms(self.consumed) - self.silence_from >= self.silence_ms:
                self.speaking = False
                out.append(VadEvent("speech_stopped", self._ms(self.consumed)))
                self.silence_from = None
        return out
