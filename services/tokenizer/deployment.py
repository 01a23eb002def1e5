"""Ray Serve deployment of the tokenizer stage: the `Tokenizer` gRPC service.

Thin: decodes and validates each request on arrival (so one bad file fails alone), then
merges concurrent requests into one batched forward with `@serve.batch`."""
from __future__ import annotations

import asyncio
from typing import Any

import torch
from ray import serve

from baichuan_audio.v1 import stages_pb2
from services.common.auth import Authenticator
from services.common.grpc_status import grpc_errors
from services.common.runtime import device_and_dtype, open_checkpoint, start_replica
from services.tokenizer.audio_io import AudioInputError, AudioLimits, pcm16_to_waveform, read_audio
from services.tokenizer.runner import TokenizerRunner


def codes_to_proto(codes: torch.Tensor) -> stages_pb2.Codes:
    return stages_pb2.Codes(frames=codes.shape[0], codebooks=codes.shape[1],
                            values=codes.flatten().tolist())


@serve.deployment(name="Tokenizer")
class TokenizerDeployment:
    def __init__(self, config: Any = None):
        self.settings = start_replica(config)
        self.internal = Authenticator.internal(self.settings.auth)   # the gRPC service: internal keys only
        device, dtype = device_and_dtype(self.settings)
        self.runner = TokenizerRunner.from_checkpoint(
            open_checkpoint(self.settings), device=device, dtype=dtype,
            limits=AudioLimits.from_settings(self.settings.limits))
        stage = self.settings.stages.tokenizer
        self._batch.set_max_batch_size(stage.max_batch_size)
        self._batch.set_batch_wait_timeout_s(stage.batch_wait_timeout_s)

    def decode_audio(self, audio) -> tuple[torch.Tensor, int]:
        """An AudioInput message -> (waveform, rate); AudioInputError for anything unusable."""
        kind = audio.WhichOneof("source") if audio is not None else None
        limits = self.runner.limits
        if kind == "file":
            return read_audio(audio.file, self.runner.audio, limits)
        if kind == "pcm16":
            p = audio.pcm16
            return pcm16_to_waveform(p.data, p.sample_rate, p.channels or 1, self.runner.audio, limits), p.sample_rate
        raise AudioInputError("empty", "no audio in the request: set audio.file (WAV/FLAC bytes) or audio.pcm16")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batch(self, items: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        # the forward blocks; run it off the event loop so requests keep queueing meanwhile
        return await asyncio.get_running_loop().run_in_executor(None, self.runner.tokenize, items)

    async def tokenize(self, audio) -> tuple[torch.Tensor, float, int]:
        """For handle calls: AudioInput -> (codes (L, 8), seconds, splits)."""
        wave, sr = self.decode_audio(audio)
        codes = await self._batch((wave, sr))
        seconds = wave.shape[-1] / sr
        return codes, seconds, self.runner.split_count(wave.shape[-1], sr)

    @grpc_errors
    async def Tokenize(self, request, grpc_context=None):
        self.internal.caller(grpc_context)
        codes, seconds, splits = await self.tokenize(request.audio)
        return stages_pb2.TokenizeResponse(codes=codes_to_proto(codes), audio_seconds=seconds, chunks=splits)
