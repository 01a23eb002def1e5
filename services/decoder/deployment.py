"""Ray Serve deployment of the decoder stage.

Serves the `jobs:decoder` work stream (codes -> mel, handed on to `jobs:vocoder` once per
(turn, segment, chunk)) and the `Decoder` gRPC service for direct calls. What a job is (a
whole segment, or a low-latency chunk with its prefix) is services/decoder/streaming.py."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import torch
from ray import serve

from baichuan_audio.v1 import stages_pb2
from services.common.auth import Authenticator
from services.common.bus import Bus
from services.common.entries import DECODER_JOBS, VOCODER_JOBS, Job, VocodeJob, next_lane
from services.common.grpc_status import grpc_errors
from services.common.runtime import device_and_dtype, open_checkpoint, start_replica
from services.common.stage_worker import WorkStreamReplica
from services.common.worker import checked_batch
from services.decoder.streaming import check_piece, chunk_window, decode_pieces
from services.decoder.runner import WARM_UP_TOKENS, DecodeInputError, DecoderRunner

log = logging.getLogger(__name__)


@serve.deployment(name="Decoder")
class DecoderDeployment(WorkStreamReplica):
    def __init__(self, config: Any = None):
        self.settings = start_replica(config)
        self.internal = Authenticator.internal(self.settings.auth)   # the gRPC service: internal keys only
        device, dtype = device_and_dtype(self.settings)
        self.runner = DecoderRunner.from_checkpoint(open_checkpoint(self.settings), device=device, dtype=dtype,
                                                    max_batch=self.settings.stages.decoder.max_batch_size)
        if device.type == "cuda":          # capture the low-latency windows' solves now, not on a user's turn
            t0 = time.perf_counter()
            n = self.runner.warm_up(WARM_UP_TOKENS)
            log.info("decoder: %d CFM solve shapes captured as CUDA graphs in %.1f s", n, time.perf_counter() - t0)
        self.start_worker(self.settings, DECODER_JOBS, "decoder", self.handle_jobs,
                          self.settings.stages.decoder.max_batch_size)

    def handle_jobs(self, jobs: list[Job]) -> list:
        """One batched decode for all claimed jobs; bad codes fail only their own job."""
        return checked_batch(jobs, self._check_job, DecodeInputError, self._decode_jobs)

    def _check_job(self, i: int, job: Job) -> tuple:
        e = job.entry
        return check_piece(self.runner, i, e.codes.tensor("int64"), e.context_frames), e.context_frames, e.seed

    def _decode_jobs(self, jobs: list[Job], pieces: list[tuple]) -> list:
        out = []
        for job, (mel, vctx) in zip(jobs, decode_pieces(self.runner, pieces)):
            e = job.entry
            vocode = VocodeJob.from_mel(e.turn_id, e.segment, e.chunk, mel, final=e.final, context_frames=vctx,
                                        seed=e.seed, session_id=e.session_id)
            out.append([(next_lane(job.stream, VOCODER_JOBS), vocode,
                         Bus.result_key("decoder", e.turn_id, e.segment, e.chunk))])
        return out

    @grpc_errors
    async def Decode(self, request, grpc_context=None):
        self.internal.caller(grpc_context)
        c = request.codes
        books = c.codebooks or len(self.runner.codebook_sizes)    # 0: the model's number (proto3 default)
        if not c.values:
            raise DecodeInputError(f"no codes: send at least one frame of {books} codes")
        if c.frames * books != len(c.values):
            raise DecodeInputError(f"codes say {c.frames}x{books} but carry {len(c.values)} values")
        codes = torch.tensor(list(c.values), dtype=torch.int64).reshape(c.frames, books)
        seed = request.seed or None
        (mel,) = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.runner.decode([codes], seed=seed))
        mel = mel.cpu().float()
        first = chunk_window(request.context_frames, self.runner.stride)   # a caller's own chunking
        mel = mel[:, first:].contiguous()
        return stages_pb2.DecodeResponse(mel=stages_pb2.Tensor2D(
            rows=mel.shape[0], cols=mel.shape[1], float32_le=mel.numpy().astype("<f4").tobytes()))
