"""Ray Serve deployment of the vocoder stage.

Serves the `jobs:vocoder` work stream (mel -> 24 kHz PCM chunks on the turn's audio stream,
published once per (turn, segment, chunk)) and the `Vocoder` gRPC service for direct calls."""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import torch
from ray import serve

from baichuan_audio.v1 import stages_pb2
from services.common.audio import to_pcm16
from services.common.auth import Authenticator
from services.common.bus import Bus
from services.common.entries import VOCODER_JOBS, Job, PcmChunk
from services.common.grpc_status import grpc_errors
from services.common.runtime import device_and_dtype, open_checkpoint, start_replica
from services.common.stage_worker import WorkStreamReplica
from services.common.worker import checked_batch
from services.vocoder.runner import VocodeInputError, VocoderRunner


@serve.deployment(name="Vocoder")
class VocoderDeployment(WorkStreamReplica):
    def __init__(self, config: Any = None):
        self.settings = start_replica(config)
        self.internal = Authenticator.internal(self.settings.auth)   # the gRPC service: internal keys only
        device, _ = device_and_dtype(self.settings)        # HiFT always runs in fp32
        self.runner = VocoderRunner.from_checkpoint(open_checkpoint(self.settings), device=device,
                                                    max_batch=self.settings.stages.vocoder.max_batch_size)
        self.start_worker(self.settings, VOCODER_JOBS, "vocoder", self.handle_jobs,
                          self.settings.stages.vocoder.max_batch_size)

    def handle_jobs(self, jobs: list[Job]) -> list:
        """One batched forward for all claimed jobs; a bad mel fails only its own job."""
        return checked_batch(jobs, lambda i, job: self.runner.check(i, job.entry.mel.tensor()),
                             VocodeInputError, self._vocode_jobs)

    def _vocode_jobs(self, jobs: list[Job], mels: list[torch.Tensor]) -> list:
        # each job's own seed: a seeded turn sounds the same whatever shares its batch
        waves = self.runner.vocode(mels, seed=[j.entry.seed or None for j in jobs],
                                   context_frames=[j.entry.context_frames for j in jobs])
        out = []
        for job, wave in zip(jobs, waves):
            e = job.entry
            chunk = PcmChunk.from_pcm16(e.turn_id, e.segment, e.chunk, to_pcm16(wave.numpy()),
                                        self.runner.config.sampling_rate, final=e.final)
            out.append([(Bus.turn_stream(e.turn_id, "audio"), chunk,
                         Bus.result_key("vocoder", e.turn_id, e.segment, e.chunk))])
        return out

    @grpc_errors
    async def Vocode(self, request, grpc_context=None):
        self.internal.caller(grpc_context)
        m = request.mel
        if m.rows * m.cols * 4 != len(m.float32_le):
            raise VocodeInputError(f"mel of {m.rows}x{m.cols} needs {m.rows * m.cols * 4} bytes, got {len(m.float32_le)}")
        mel = torch.from_numpy(np.frombuffer(m.float32_le, dtype="<f4").reshape(m.rows, m.cols).copy())
        seed = request.seed or None
        (wave,) = await asyncio.get_running_loop().run_in_executor(None, lambda: self.runner.vocode([mel], seed=seed))
        return stages_pb2.VocodeResponse(sample_rate=self.runner.config.sampling_rate,
                                         pcm16=to_pcm16(wave.numpy()),
                                         float32_le=wave.numpy().astype("<f4").tobytes())
