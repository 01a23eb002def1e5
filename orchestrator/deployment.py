"""The public `ConversationService` as a Ray Serve deployment.

Thin glue: sessions (sessions.py), prompts (services/llm/prompts.py), calls to the tokenizer
and LLM applications through Serve handles (the LLM session-affine through the multiplexed
model id), and the turn producer (turns.py) that merges the stage streams for the caller."""
from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
import uuid
from typing import Any

import numpy as np
import redis
import torch
from ray import serve

from baichuan_audio.v1 import conversation_pb2 as pb
from services.common.bus import Bus
from services.common.errors import NotFound
from services.common.grpc_status import grpc_errors
from services.common.runtime import open_checkpoint, start_replica
from services.common.telemetry import inject_context, start_span
from services.common.text_tokenizer import DEFAULT_SYSTEM_PROMPT, load_text_tokenizer
from services.llm.prompts import Audio, GeneratedAudio, Message, PromptBuilder, ProtocolTokens
from orchestrator import turns
from orchestrator.merge import ReplyMerger
from orchestrator.sessions import SessionSettingsRecord, SessionStore

log = logging.getLogger(__name__)

# Caller overrides of the reference's per-phase sampling (§11.3), accepted within these bounds.
SAMPLING_LIMITS = {"temperature": (0.05, 2.0), "top_k": (1, 1000), "top_p": (0.05, 1.0)}


def sampling_overrides(msg: pb.SamplingOverrides) -> dict:
    """The fields a caller set, checked against SAMPLING_LIMITS (INVALID_ARGUMENT otherwise)."""
    out = {f.name: v for f, v in msg.ListFields()}
    for name, value in out.items():
        for key, (lo, hi) in SAMPLING_LIMITS.items():
            if name.endswith(key) and not lo <= value <= hi:
                raise ValueError(f"sampling.{name}={value:g} is out of range [{lo:g}, {hi:g}]")
    return out


def engine_sampling(overrides: dict) -> dict | None:
    """The overrides the LLM engine takes per request (seed and greedy travel separately)."""
    return {k: v for k, v in overrides.items() if k not in ("seed", "greedy")} or None


def _codes_to_b64(codes) -> str:
    return base64.b64encode(np.ascontiguousarray(np.asarray(codes), dtype="<i4").tobytes()).decode()


def _codes_from_b64(data: str, codebooks: int) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(data), dtype="<i4").astype(np.int64).reshape(-1, codebooks))


def _settings_record(s: pb.SessionSettings) -> SessionSettingsRecord:
    sampling = sampling_overrides(s.sampling)
    return SessionSettingsRecord(
        system_prompt=s.system_prompt, spoken=s.reply_mode != pb.REPLY_MODE_TEXT,
        faithful_history=s.faithful_history, low_latency_audio=s.low_latency_audio,
        ttl_seconds=s.ttl_seconds, sampling=sampling)


@serve.deployment(name="Conversation")
class ConversationDeployment:
    def __init__(self, config: Any = None):
        self.settings = start_replica(config)
        ckpt = open_checkpoint(self.settings)
        self.tokenizer = load_text_tokenizer(ckpt.path)
        self.cfg = ckpt.config
        tokens = ProtocolTokens.from_tokenizer(self.tokenizer, self.cfg, ckpt.generation_config())
        self.prompts = PromptBuilder(self.tokenizer, tokens, self.cfg.audio.num_codebooks)
        self.bus = Bus.from_settings(self.settings)
        r = self.settings.redis
        client = redis.Redis.from_url(r.url, protocol=2, username=r.username or None, password=r.password or None,
                                      socket_connect_timeout=r.connect_timeout_s)
        self.sessions = SessionStore(client, default_ttl_s=self.settings.limits.session_ttl_s,
                                     max_sessions=self.settings.limits.max_sessions,
                                     num_codebooks=self.cfg.audio.num_codebooks)
        self.tokenizer_app = serve.get_app_handle("tokenizer")
        self.llm_app = serve.get_app_handle("llm")
        self.interrupts: dict[str, threading.Event] = {}   # turn_id -> set by Interrupt
        self.producers: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- sessions
    def _session_proto(self, sess, history: bool = False) -> pb.Session:
        s = sess.settings
        out = pb.Session(session_id=sess.session_id, turns=sess.turns, created_unix_ms=sess.created_ms,
                         expires_unix_ms=sess.expires_ms, settings=pb.SessionSettings(
                             system_prompt=s.system_prompt or DEFAULT_SYSTEM_PROMPT,
                             reply_mode=pb.REPLY_MODE_SPOKEN if s.spoken else pb.REPLY_MODE_TEXT,
                             faithful_history=s.faithful_history, low_latency_audio=s.low_latency_audio,
                             ttl_seconds=s.ttl_seconds, sampling=pb.SamplingOverrides(**s.sampling)))
        if history:
            for h in sess.history:
                out.history.append(pb.HistoryEntry(role=h["role"], text=h.get("text", ""),
                                                   audio_seconds=h.get("audio_seconds", 0.0),
                                                   interrupted=h.get("interrupted", False)))
        return out

    @grpc_errors
    async def CreateSession(self, request, grpc_context=None):
        sess = self.sessions.create(_settings_record(request.settings), request.session_id)
        return self._session_proto(sess)

    @grpc_errors
    async def GetSession(self, request, grpc_context=None):
        return self._session_proto(self.sessions.get(request.session_id), history=True)

    @grpc_errors
    async def DeleteSession(self, request, grpc_context=None):
        deleted = self.sessions.delete(request.session_id)
        if deleted:
            try:
                await self.llm_app.options(multiplexed_model_id=request.session_id).close_session.remote(
                    request.session_id)
            except Exception:  # noqa: BLE001 - the session is gone either way; the cache ages out
                log.warning("could not release the LLM cache of session %s", request.session_id)
        return pb.DeleteSessionResponse(deleted=deleted)

    # ---------------------------------------------------------------- helpers
    async def _tokenize(self, audio: pb.AudioInput) -> tuple[torch.Tensor, float]:
        codes, seconds, _ = await self.tokenizer_app.tokenize.remote(audio)
        return codes, seconds

    def _history_prompt(self, sess, user_part, spoken: bool):
        """Prompt ids and pad codes: the session's model history (kept KV) + this user turn."""
        if not sess.tokens:
            system = sess.settings.system_prompt or DEFAULT_SYSTEM_PROMPT
            p = self.prompts.chat([Message("system", system), Message("user", user_part)], spoken=spoken)
            return p.ids, p.audio_codes
        ids = list(sess.tokens)
        pad, end = self.cfg.audio_tokens.audio_pad, self.cfg.audio_tokens.audiogen_end
        n_pads = sum(1 for t in ids if t == pad)
        if n_pads > sess.codes.shape[0]:
            # the reply's last end-of-audio pad was never forwarded: close the audio span as the
            # reference's history does (<audiogen_start> pads <audiogen_end>)
            if ids and ids[-1] == pad:
                ids[-1] = end
                n_pads -= 1
        if n_pads != sess.codes.shape[0]:
            raise RuntimeError(f"session {sess.session_id}: history has {n_pads} audio pads but "
                               f"{sess.codes.shape[0]} code rows")
        cont = self.prompts.chat([Message("user", user_part)], spoken=spoken)
        codes = [torch.from_numpy(sess.codes.astype(np.int64))]
        if cont.audio_codes is not None:
            codes.append(cont.audio_codes)
        return ids + cont.ids, torch.cat(codes)

    async def _faithful_prompt(self, sess, user_part, spoken: bool):
        """The reference's multi-turn prompt (§11.5): the whole conversation rebuilt, each
        assistant segment's audio re-encoded from its 24 kHz waveform through the tokenizer
        (codes re-quantised from the vocoded audio, not the generated ones)."""
        turns_ = self.sessions.faithful_turns(sess.session_id)
        nb = self.cfg.audio.num_codebooks
        changed = False
        system = sess.settings.system_prompt or DEFAULT_SYSTEM_PROMPT
        messages = [Message("system", system)]
        for t in turns_:
            u = t["user"]
            messages.append(Message("user", [Audio(_codes_from_b64(u["codes"], nb))] if "codes" in u else u["text"]))
            parts: list = []
            for seg in t["assistant"]:
                if seg["text"]:
                    parts.append(seg["text"])
                if seg.get("pcm16") and "codes" not in seg:
                    audio = pb.AudioInput(pcm16=pb.RawPcm16(data=base64.b64decode(seg["pcm16"]),
                                                            sample_rate=24000, channels=1))
                    codes, _ = await self._tokenize(audio)
                    seg["codes"] = _codes_to_b64(codes)
                    changed = True
                if "codes" in seg:
                    parts.append(GeneratedAudio(_codes_from_b64(seg["codes"], nb)))
            messages.append(Message("assistant", parts or ""))
        messages.append(Message("user", user_part))
        if changed:  # re-encoding is deterministic: keep the codes for the following turns
            self.sessions.save_faithful_turns(sess, turns_)
        p = self.prompts.chat(messages, spoken=spoken)
        return p.ids, p.audio_codes

    def _record_faithful(self, sess, user_part, outcome) -> None:
        turns_ = self.sessions.faithful_turns(sess.session_id)
        user = {"text": user_part} if isinstance(user_part, str) else {"codes": _codes_to_b64(user_part[0].codes)}
        assistant = [{"text": text, "pcm16": base64.b64encode(pcm).decode()} for text, pcm in outcome.segments]
        turns_.append({"user": user, "assistant": assistant})
        self.sessions.save_faithful_turns(sess, turns_)

    def _start_producer(self, turn_id: str, merger: ReplyMerger, on_done) -> None:
        flag = self.interrupts.setdefault(turn_id, threading.Event())
        loop = asyncio.get_running_loop()

        def interrupted() -> bool:  # this replica's Interrupt, or one that reached another replica
            return flag.is_set() or turns.interrupt_requested(self.bus, turn_id)

        def run():
            outcome = None
            try:
                outcome = turns.produce(self.bus, merger, turn_id, interrupted=interrupted)
                on_done(outcome)            # the history first, then the caller hears the end
            except Exception:  # noqa: BLE001
                log.exception("turn %s failed", turn_id)
                if outcome is None:
                    on_done(None)
                outcome = None
            finally:
                self.interrupts.pop(turn_id, None)
                turns.finish(self.bus, turn_id, outcome)

        task = loop.run_in_executor(None, run)
        self.producers.add(task)
        task.add_done_callback(self.producers.discard)

    async def _stream(self, turn_id: str, after: str = "0"):
        it = turns.events(self.bus, turn_id, after)
        loop = asyncio.get_running_loop()
        while True:
            item = await loop.run_in_executor(None, next, it, None)
            if item is None:
                return
            yield item[1]

    # ---------------------------------------------------------------- turns
    @grpc_errors
    async def Converse(self, request, grpc_context=None):
        if request.resume_turn_id:
            sess = self.sessions.get(request.session_id)
            if not self.bus.redis.exists(self.bus.turn_stream(request.resume_turn_id, "events")):
                raise NotFound(f"turn {request.resume_turn_id} of session {sess.session_id} is not known "
                               "(finished too long ago, or never started)")
            async for ev in self._stream(request.resume_turn_id, request.after_event_id or "0"):
                yield ev
            return
        kind = request.WhichOneof("input")
        if kind is None:
            raise ValueError("the turn has no input: set audio (a WAV/FLAC file or PCM16) or text")
        if kind == "text" and len(request.text) > self.settings.limits.max_text_chars:
            raise ValueError(f"text of {len(request.text)} characters is over the limit of "
                             f"{self.settings.limits.max_text_chars}")
        turn_id = uuid.uuid4().hex
        sess = self.sessions.begin_turn(request.session_id, turn_id,
                                        is_over=lambda t: turns.is_over(self.bus, t, turns.STALL_TIMEOUT_S))
        t0 = time.time()
        try:
            with start_span("turn", attributes={"session.id": sess.session_id, "turn.id": turn_id}):
                user_seconds = 0.0
                if kind == "audio":
                    codes, user_seconds = await self._tokenize(request.audio)
                    user_part = [Audio(codes)]
                else:
                    user_part = request.text
                spoken = sess.settings.spoken
                if sess.settings.faithful_history:
                    ids, codes = await self._faithful_prompt(sess, user_part, spoken)
                else:
                    ids, codes = self._history_prompt(sess, user_part, spoken)
                req = {"turn_id": turn_id, "session_id": sess.session_id, "mode": "spoken" if spoken else "text",
                       "prompt_ids": ids, "prompt_codes": None if codes is None else codes.numpy(),
                       "greedy": bool(sess.settings.sampling.get("greedy")), "seed": sess.settings.sampling.get("seed"),
                       "sampling": engine_sampling(sess.settings.sampling),
                       "low_latency": sess.settings.low_latency_audio, "trace": inject_context()}
                await self.llm_app.options(multiplexed_model_id=sess.session_id).generate.remote(req)
        except BaseException:
            self.sessions.end_turn(sess, entries=[], tokens=None, codes=None)
            raise
        prompt_codes = codes
        nb = self.cfg.audio.num_codebooks
        merger = ReplyMerger(turn_id, spoken=spoken, started=t0, num_codebooks=nb)
        user_entry = {"role": "user", "text": request.text if kind == "text" else "", "audio_seconds": user_seconds}

        def on_done(outcome):
            if outcome is None:
                self.sessions.end_turn(sess, entries=[user_entry], tokens=None, codes=None)
                return
            entry = {"role": "assistant", "text": outcome.text, "audio_seconds": outcome.audio_seconds,
                     "interrupted": outcome.interrupted}
            if sess.settings.faithful_history and outcome.error is None:
                self._record_faithful(sess, user_part, outcome)
            tokens, all_codes = None, None
            if outcome.tokens is not None and not outcome.interrupted and outcome.error is None:
                tokens = outcome.tokens
                prev = prompt_codes.numpy() if prompt_codes is not None else np.zeros((0, nb), np.int64)
                all_codes = np.concatenate([prev, outcome.generated_codes]).astype(np.int32)
            elif outcome.interrupted:
                # keep only what was delivered: the user turn and the reply text the caller got
                tokens = list(ids) + self.tokenizer.encode(outcome.text, add_special_tokens=False)
                all_codes = (prompt_codes.numpy() if prompt_codes is not None else np.zeros((0, nb))).astype(np.int32)
            self.sessions.end_turn(sess, entries=[user_entry, entry], tokens=tokens, codes=all_codes)

        self._start_producer(turn_id, merger, on_done)
        async for ev in self._stream(turn_id):
            yield ev

    @grpc_errors
    async def Interrupt(self, request, grpc_context=None):
        sess = self.sessions.get(request.session_id)
        turn_id = sess.active_turn
        if not turn_id:
            return pb.InterruptResponse(interrupted=False)
        if turns.is_over(self.bus, turn_id, turns.STALL_TIMEOUT_S):
            return pb.InterruptResponse(interrupted=False, turn_id=turn_id)
        turns.request_interrupt(self.bus, turn_id)     # the producing replica may be another one
        flag = self.interrupts.get(turn_id)
        if flag is not None:
            flag.set()
        await self.llm_app.options(multiplexed_model_id=sess.session_id).cancel.remote(turn_id)
        return pb.InterruptResponse(interrupted=True, turn_id=turn_id)

    # ---------------------------------------------------------------- ASR / TTS
    async def _one_shot(self, req: dict, spoken: bool) -> None:
        """ASR / TTS: no session; the reply is produced into its events stream like a turn."""
        await self.llm_app.generate.remote(req)
        merger = ReplyMerger(req["turn_id"], spoken=spoken, num_codebooks=self.cfg.audio.num_codebooks)
        self._start_producer(req["turn_id"], merger, lambda _outcome: None)

    @grpc_errors
    async def Transcribe(self, request, grpc_context=None):
        codes, seconds = await self._tokenize(request.audio)
        p = self.prompts.asr(codes)
        turn_id = uuid.uuid4().hex
        await self._one_shot({"turn_id": turn_id, "mode": "asr", "prompt_ids": p.ids,
                              "prompt_codes": p.audio_codes.numpy(), "greedy": True}, spoken=False)
        text = ""
        async for ev in self._stream(turn_id):
            if ev.HasField("error"):
                raise RuntimeError(ev.error.message)
            if ev.HasField("end"):
                text = ev.end.text
        return pb.TranscribeResponse(text=text, audio_seconds=seconds)

    @grpc_errors
    async def Synthesize(self, request, grpc_context=None):
        if not request.text.strip():
            raise ValueError("text is empty: nothing to synthesize")
        if len(request.text) > self.settings.limits.max_text_chars:
            raise ValueError(f"text of {len(request.text)} characters is over the limit of "
                             f"{self.settings.limits.max_text_chars}")
        chunks = self.prompts.tts_chunks(request.text)
        turn_id = uuid.uuid4().hex
        sampling = sampling_overrides(request.sampling)
        # the base TTS demo is greedy; a caller may ask for sampling (greedy: false)
        await self._one_shot({"turn_id": turn_id, "mode": "tts", "prompt_ids": chunks[0], "tts_chunks": chunks[1:],
                              "greedy": sampling.get("greedy", True), "seed": sampling.get("seed"),
                              "sampling": engine_sampling(sampling)}, spoken=True)
        async for ev in self._stream(turn_id):
            yield ev

    # ---------------------------------------------------------------- health
    async def Check(self, request, grpc_context=None):
        """grpc.health.v1: SERVING while this replica reaches Redis (sessions and streams live there)."""
        from grpc_health.v1 import health_pb2
        try:
            ok = await asyncio.get_running_loop().run_in_executor(None, self.bus.redis.ping)
        except Exception:  # noqa: BLE001 - any failure means not serving
            ok = False
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)
