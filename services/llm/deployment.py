"""Ray Serve deployment of the LLM stage: one engine per replica (GPU-pinned in production).

`generate` submits a turn and returns at once; a thread per turn forwards the engine's events
to Redis (turn:{id}:llm and jobs:decoder, see publisher.py). Session affinity: callers pass
the session id as Serve's multiplexed model id, so a session's turns reach the replica that
holds its KV cache while it has it; any other replica rebuilds it from the prompt.

Also implements the `LLM.Generate` gRPC service (streamed events) for direct calls."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from ray import serve

from baichuan_audio.v1 import conversation_pb2, stages_pb2
from services.common.auth import Authenticator
from services.common.bus import Bus, RedisFull, reply_record_key, unreachable
from services.common.entries import DECODER_JOBS, TurnError, lanes
from services.common.errors import Status
from services.common.grpc_status import grpc_errors
from services.common.leases import Leases
from services.common.runtime import device_and_dtype, open_checkpoint, start_replica
from services.common.telemetry import start_span
from services.common.text_tokenizer import load_text_tokenizer
from services.llm.continuation import continuation_seed, decisions, decode_items
from services.llm.engine import Engine, EngineConfig, EngineError, Request
from services.llm.kv_cache import KVCache
from services.llm.model import AudioLLM
from services.llm.prompts import PromptBuilder
from services.llm.publisher import ChunkPolicy, TurnPublisher
from services.llm.protocol import AudioFrame, Done, SegmentEnd, TextToken

log = logging.getLogger(__name__)

SESSIONS_PER_SLOT = 16   # sessions remembered (without KV) per KV slot before the oldest are forgotten

MODES = {stages_pb2.GENERATE_MODE_UNSPECIFIED: "spoken", stages_pb2.GENERATE_MODE_SPOKEN: "spoken",
         stages_pb2.GENERATE_MODE_TEXT: "text", stages_pb2.GENERATE_MODE_ASR: "asr",
         stages_pb2.GENERATE_MODE_TTS: "tts"}


# Slots beyond the running ones let idle sessions keep their KV (while blocks allow), so a
# conversation's next turn prefills only what it adds.
KEPT_SESSIONS_PER_SLOT = 4
ENDED_KEPT = 1024        # recently ended requests whose end reason `request_status` reports
TURN_ERROR_RETRY_S = 120.0  # how long a turn's error refused by a full Redis is retried
SUPERSEDE_WAIT_S = 10.0  # how long a session's new turn waits for its cancelled previous one to end
DRAIN_S = 60.0           # a replica told to stop lets its running turns end for this long (graceful_shutdown_timeout_s: 120)
LEASE = "llm"            # the turn lease this replica holds while it generates (orchestrator/turns.py watches it)


@serve.deployment(name="LLM")
class LLMDeployment:
    def __init__(self, config: Any = None):
        self.settings = start_replica(config)
        self.internal = Authenticator.internal(self.settings.auth)   # the gRPC service: internal keys only
        device, dtype = device_and_dtype(self.settings)
        ckpt = open_checkpoint(self.settings)
        model = AudioLLM.from_checkpoint(ckpt, dtype=dtype, device=device,
                                         attn_impl=self.settings.llm.attention if device.type == "cuda" else "math")
        s = self.settings.llm
        self.ended: OrderedDict[str, str] = OrderedDict()   # request id -> Done reason, newest last
        self._lock = threading.Lock()
        # Paged KV: the budget is shared by running sequences and idle sessions' cached turns,
        # block by block; one sequence may use up to the model's context (or the whole budget).
        self.engine = Engine(model, load_text_tokenizer(ckpt.path), generation_config=ckpt.generation_config(),
                             on_event=self._on_engine_event,
                             config=EngineConfig(num_slots=KEPT_SESSIONS_PER_SLOT * s.max_slots,
                                                 max_len=s.context_tokens(model.cfg.llm.max_position_embeddings),
                                                 paged=True,
                                                 kv_budget_bytes=s.kv_budget_tokens * KVCache.block_bytes(model.cfg, 1, dtype),
                                                 prefill_budget=s.prefill_chunk_tokens,
                                                 compile_backend=s.compile_backend if device.type == "cuda" else None,
                                                 # sequences decoded together in one step
                                                 max_batch=min(s.max_slots, self.settings.stages.llm.max_batch_size)))
        if device.type == "cuda":          # capture every decode shape now, not on a user's turn
            t0 = time.perf_counter()
            n = self.engine.warm_up()
            log.info("LLM engine: %d decode shapes captured as CUDA graphs in %.1f s", n, time.perf_counter() - t0)
        self.engine.run_forever()
        self.prompts = PromptBuilder(self.engine.tokenizer, self.engine.tokens, self.engine.cfg.audio.num_codebooks)
        # the operator's per-turn limits, on every request whichever way it arrives
        lim = self.settings.limits
        self.limits = {"max_new_tokens": lim.max_new_tokens, "max_turn_frames": lim.max_audio_frames}
        self.bus = Bus.from_settings(self.settings)
        self.leases = Leases(self.bus)
        d = self.settings.decoder
        self.low_latency = ChunkPolicy(d.first_chunk_frames, d.chunk_growth, d.max_chunk_frames)
        self.turns: dict[str, Any] = {}           # turn_id -> engine Handle
        self.session_turns: dict[str, Any] = {}   # session -> the engine Handle of its latest turn

    def __del__(self):
        """Serve's graceful shutdown (a redeploy, a scale-down): no new turn comes here any more;
        let the running ones end (up to DRAIN_S), then stop the engine. A turn cut off then
        loses its lease, and another replica continues it (orchestrator/turns.py)."""
        deadline = time.monotonic() + DRAIN_S
        while getattr(self, "turns", None) and time.monotonic() < deadline:
            time.sleep(0.05)
        if getattr(self, "turns", None):
            log.warning("LLM replica stopping with %d turns still running: other replicas continue them",
                        len(self.turns))
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()

    # ---------------------------------------------------------------- session affinity
    @serve.multiplexed(max_num_models_per_replica=64)
    async def _session(self, session_id: str) -> str:
        # "loading" a session only pins it to this replica; the engine keeps its KV cache
        return session_id

    # ---------------------------------------------------------------- both paths
    def _submit(self, request: Request):
        """The engine's handle of `request` under the operator's limits, its session opened here."""
        if request.session_id:
            self._open(request.session_id)
        return self.engine.submit(dataclasses.replace(request, **self.limits))

    # ---------------------------------------------------------------- handle API
    async def generate(self, request: Request, low_latency: bool = False, trace: dict | None = None,
                       continuation: int = 0) -> str:
        """Start a turn (request.request_id is its turn id); its events go to Redis (publisher.py),
        low_latency: chunk the first audio segment's decode jobs; trace: the caller's trace
        context. Returns the turn id once the engine accepted the request.

        continuation n >= 1: the turn's LLM replica died; `request` is the turn's original one,
        and this replica continues the reply after what was published of it (continuation.py),
        the sampler seeded with continuation_seed."""
        sid = serve.get_multiplexed_model_id()
        if sid:
            await self._session(sid)
        turn_id = request.request_id
        if not turn_id:
            raise ValueError("the LLM request has no request_id: it is the turn id its stream entries carry")
        seed, skip = request.seed, 0     # the decoder's noise seeds stay the original request's
        if continuation:
            request, skip = self._continued(request, continuation)
        await self._supersede(request.session_id)
        self.leases.hold(turn_id, LEASE)        # before the caller starts watching for it
        try:
            handle = self._submit(request)
        except BaseException:
            self.leases.release(turn_id, LEASE)
            raise
        emit = self._emit(turn_id)
        pub = TurnPublisher(turn_id, request.session_id or "", emit,
                            chunks=self.low_latency if low_latency else ChunkPolicy(), seed=seed,
                            recorded=emit if request.session_id else None, skip=skip)
        with self._lock:
            self.turns[turn_id] = handle
            if request.session_id:
                self.session_turns[request.session_id] = handle
        threading.Thread(target=self._forward, args=(turn_id, handle, pub, trace), daemon=True,
                         name=f"turn-{turn_id}").start()
        return turn_id

    async def _supersede(self, session_id: str | None) -> None:
        """A session's new turn while its previous one still runs here: the orchestrator starts
        one turn per session at a time, so the old one was interrupted (its cancel may still be
        on its way) or abandoned. Cancel it and wait the step or two the engine needs to let the
        session go, instead of refusing the new turn."""
        with self._lock:
            old = self.session_turns.get(session_id) if session_id else None
        if old is None or old.done is not None:
            return
        self._cancel(old)
        deadline = time.monotonic() + SUPERSEDE_WAIT_S
        while old.done is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def _continued(self, request: Request, n: int) -> tuple[Request, int]:
        """The n-th continuation of a turn whose replica died: its request replaying what was
        published of the reply (continuation.py), with a new sampler seed; and how many recorded
        entries that replay publishes again."""
        rules = self.engine.rules
        so_far = decisions(decode_items(self.bus.redis.lrange(reply_record_key(request.request_id), 0, -1)),
                           rules.eoa, rules.num_codebooks)
        log.warning("turn %s: continuing its reply (continuation %d) after %d decisions already published",
                    request.request_id, n, len(so_far.decisions))
        return dataclasses.replace(request, replay=so_far.decisions,
                                   seed=continuation_seed(request.request_id, request.seed, n)), so_far.items

    def _emit(self, turn_id: str):
        """The publisher's sink: decode jobs to their lane of jobs:decoder, the rest to the turn's
        stream; with an item, that goes to the turn's reply record in the same write."""
        key = reply_record_key(turn_id)

        def emit(target: str, entry, item: bytes | None = None) -> None:
            record = (key, item) if item is not None else None
            if target in lanes(DECODER_JOBS):
                self.bus.submit(target, entry, record=record)
            else:
                self.bus.publish(turn_id, target, entry, record=record)
        return emit

    def _forward(self, turn_id: str, handle, pub: TurnPublisher, trace: dict | None) -> None:
        try:
            # entries written under this span carry its context: the turn's trace continues
            with start_span("llm.generate", parent_carrier=trace, attributes={"turn.id": turn_id}):
                for ev in handle.events():
                    pub.feed(ev)
        except Exception as e:  # noqa: BLE001 - the turn must hear about it
            log.exception("turn %s: publishing failed", turn_id)
            self._cancel(handle)    # nobody can hear the rest: free the sequence's slot and KV now
            code = Status.RESOURCE_EXHAUSTED if isinstance(e, RedisFull) else Status.UNAVAILABLE
            message = (f"Redis did not answer while the reply was being generated ({e}); what you received "
                       "stays: send the turn again" if unreachable(e) else f"publishing the reply failed: {e}")
            try:                    # a full Redis may take writes again soon: the turn's reader waits
                self.bus.publish(turn_id, "llm", TurnError(turn_id=turn_id, stage="llm", code=code, message=message),
                                 retry_full_s=TURN_ERROR_RETRY_S)
            except Exception:  # noqa: BLE001 - Redis is down; the orchestrator times out
                pass
        finally:
            self.leases.release(turn_id, LEASE)   # after its end or error was written
            with self._lock:
                self.turns.pop(turn_id, None)
                if pub.session_id and self.session_turns.get(pub.session_id) is handle:
                    del self.session_turns[pub.session_id]

    def _on_engine_event(self, ev) -> None:
        """Every engine event (engine thread): remember how each request ended, whoever listened."""
        if isinstance(ev, Done):
            with self._lock:
                self.ended[ev.request_id] = ev.reason
                while len(self.ended) > ENDED_KEPT:
                    self.ended.popitem(last=False)

    async def request_status(self, request_id: str) -> str:
        """"running" while the engine holds the request, then its Done reason ("eos", "length",
        "cancelled", ...) for the last ENDED_KEPT requests; "unknown" otherwise (operators, tests)."""
        if request_id in self.engine.handles:
            return "running"
        with self._lock:
            return self.ended.get(request_id, "unknown")

    def _open(self, sid: str) -> None:
        try:
            if not self.engine.has_session(sid):
                self.engine.open_session(sid)
                # sessions that expired in Redis are never closed here: bound what is remembered
                self.engine.forget_idle_sessions(keep=SESSIONS_PER_SLOT * self.engine.num_slots)
        except EngineError:  # opened meanwhile by a concurrent request
            pass

    async def cancel(self, turn_id: str) -> bool:
        """Stop a running turn within one engine step. False if it is not running here."""
        with self._lock:
            handle = self.turns.get(turn_id)
        if handle is None:
            return False
        handle.cancel()
        return True

    async def close_session(self, session_id: str) -> None:
        if self.engine.has_session(session_id):
            self.engine.close_session(session_id)

    # ---------------------------------------------------------------- gRPC
    @grpc_errors
    async def Generate(self, request, grpc_context=None):
        """Direct streaming generation (no Redis): events as they come. A caller that goes away
        (disconnect, cancel, deadline) ends the request within one engine step: Serve cancels
        this generator and the engine request is cancelled with it."""
        self.internal.caller(grpc_context)
        nb = self.engine.cfg.audio.num_codebooks
        codes = np.asarray(request.prompt_codes.values, dtype=np.int64).reshape(-1, request.prompt_codes.codebooks or nb)
        sampling = {f.name: v for f, v in request.sampling.ListFields()}
        handle = self._submit(Request(
            prompt_ids=list(request.prompt_ids), mode=MODES.get(request.mode, "spoken"),
            audio_codes=torch.from_numpy(codes) if len(codes) else None,
            tts_chunks=[self.prompts.tts_chunk(c) for c in request.tts_chunks], session_id=request.session_id or None,
            greedy=bool(sampling.pop("greedy", False)), seed=sampling.pop("seed", None),
            sampling=sampling or None, request_id=request.turn_id or None))
        try:
            async for ev in self._generate_events(handle):
                yield ev
        finally:
            if handle.done is None:     # the caller left (or the stream broke) before the end
                log.info("LLM.Generate %s: the caller left; cancelling the request", handle.request_id)
                self._cancel(handle)

    @staticmethod
    def _cancel(handle) -> None:
        try:
            handle.cancel()
        except EngineError:     # it ended meanwhile
            pass

    async def _generate_events(self, handle):
        loop = asyncio.get_running_loop()
        events = handle.events()
        while True:
            ev = await loop.run_in_executor(None, next, events, None)
            if ev is None:
                return
            if isinstance(ev, TextToken) and ev.text:
                yield stages_pb2.GenerateEvent(text=conversation_pb2.TextDelta(text=ev.text, segment=ev.segment))
            elif isinstance(ev, AudioFrame):
                yield stages_pb2.GenerateEvent(frames=stages_pb2.AudioFrames(segment=ev.segment, codes=stages_pb2.Codes(
                    frames=1, codebooks=len(ev.codes), values=list(ev.codes))))
            elif isinstance(ev, SegmentEnd):
                kind = (conversation_pb2.SegmentBoundary.TEXT_END if ev.kind == "text"
                        else conversation_pb2.SegmentBoundary.AUDIO_END)
                yield stages_pb2.GenerateEvent(segment=conversation_pb2.SegmentBoundary(
                    segment=ev.segment, kind=kind, audio_frames=len(ev.codes)))
            elif isinstance(ev, Done):
                if ev.reason == "error":
                    raise RuntimeError(ev.error or "generation failed")
                yield stages_pb2.GenerateEvent(done=stages_pb2.GenerateDone(reason=ev.reason, sequence=list(ev.final_sequence)))
                return
