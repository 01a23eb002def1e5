"""Ray Serve deployment of the decoder stage.

Serves the `jobs:decoder` work stream (codes -> mel, handed on to `jobs:vocoder` once per
(turn, segment, chunk)) and the `Decoder` gRPC service for direct calls.

A job carries the codes of a whole segment (faithful mode) or, in low-latency mode, the
segment's prefix up to the end of chunk k with `context_frames` = the tokens before the chunk:
the prefix is decoded whole (decoder and Pre-Net are causal, so the chunk sees its full
history) and only the chunk's mel frames are passed on, plus a few frames of left context for
the vocoder's continuity."""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import torch
from ray import serve

from baichuan_audio.v1 import stages_pb2
from services.common.bus import DECODER_JOBS, VOCODER_JOBS, Bus, Job, PermanentError, VocodeJob
from services.common.grpc_status import grpc_errors
from services.common.telemetry import setup_telemetry
from services.common.runtime import device_and_dtype, load_settings, open_checkpoint
from services.common.stage_worker import WorkStreamReplica
from services.decoder.noise import prefix_noise
from services.decoder.runner import DecodeInputError, DecoderRunner, mel_frames

# Mel frames of left context given to the vocoder for a later chunk (80 ms): its samples are
# synthesised for continuity across the chunk boundary and then dropped.
VOCODER_CONTEXT_FRAMES = 4


def chunk_window(context_tokens: int, stride: int) -> int:
    """First mel frame of a chunk that starts at token `context_tokens` (frame 4s-1, or 0)."""
    return 0 if context_tokens == 0 else stride * context_tokens - 1


@serve.deployment(name="Decoder")
class DecoderDeployment(WorkStreamReplica):
    def __init__(self, config: Any = None):
        self.settings = load_settings(config)
        setup_telemetry(self.settings)
        device, dtype = device_and_dtype(self.settings)
        self.runner = DecoderRunner.from_checkpoint(open_checkpoint(self.settings), device=device, dtype=dtype,
                                                    max_batch=self.settings.stages.decoder.max_batch_size)
        self.bins = self.runner.config.flow.in_channels
        self.start_worker(self.settings, DECODER_JOBS, "decoder", self.handle_jobs,
                          self.settings.stages.decoder.max_batch_size)

    def handle_jobs(self, jobs: list[Job]) -> list:
        """One batched decode for all claimed jobs; bad codes fail only their own job."""
        outcomes: list = [None] * len(jobs)
        good, codes, noise = [], [], []
        for i, job in enumerate(jobs):
            e = job.entry
            try:
                c = self.runner.check_segment(i, torch.from_numpy(np.array(e.codes_array(), dtype=np.int64)))
                if e.context_frames >= c.shape[0]:
                    raise DecodeInputError(f"job context_frames={e.context_frames} leaves no frames of "
                                           f"its {c.shape[0]}-frame chunk to decode")
            except DecodeInputError as err:
                outcomes[i] = PermanentError(str(err))
                continue
            good.append(i)
            codes.append(c)
            noise.append(prefix_noise(e.seed, mel_frames(c.shape[0], self.runner.stride), self.bins))
        mels = self.runner.decode(codes, noise=noise) if codes else []
        for i, mel in zip(good, mels):
            e = jobs[i].entry
            first = chunk_window(e.context_frames, self.runner.stride)
            ctx = min(first, VOCODER_CONTEXT_FRAMES)
            job = VocodeJob.from_mel(e.turn_id, e.segment, e.chunk, mel[:, first - ctx:].cpu(),
                                     final=e.final, context_frames=ctx, seed=e.seed, session_id=e.session_id)
            outcomes[i] = [(VOCODER_JOBS, job, Bus.result_key("decoder", e.turn_id, e.segment, e.chunk))]
        return outcomes

    @grpc_errors
    async def Decode(self, request, grpc_context=None):
        c = request.codes
        if c.codebooks and c.frames * c.codebooks != len(c.values):
            raise DecodeInputError(f"codes say {c.frames}x{c.codebooks} but carry {len(c.values)} values")
        if not c.values:
            raise DecodeInputError("no codes: send at least one frame of 8 codes")
        codes = torch.tensor(list(c.values), dtype=torch.int64).reshape(c.frames, c.codebooks or 8)
        seed = request.seed or None
        (mel,) = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.runner.decode([codes], seed=seed))
        mel = mel.cpu().float()
        first = chunk_window(request.context_frames, self.runner.stride)
        mel = mel[:, first:].contiguous()
        return stages_pb2.DecodeResponse(mel=stages_pb2.Tensor2D(
            rows=mel.shape[0], cols=mel.shape[1], float32_le=mel.numpy().astype("<f4").tobytes()))
