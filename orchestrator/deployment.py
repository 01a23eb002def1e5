"""The public `ConversationService` as a Ray Serve deployment.

Thin glue: protobuf to and from the plain types of conversation.py (which decides what a turn
means: input checks, prompts, history rules, the LLM request), sessions in Redis (sessions.py),
calls to the tokenizer and LLM applications through Serve handles (the LLM session-affine
through the multiplexed model id), and the turn producer (turns.py) that merges the stage
streams for the caller.

Every call but the health check first names its caller (services/common/auth.py: the API key
in the `authorization` metadata; UNAUTHENTICATED otherwise) and charges it one request
(quotas.py); sessions belong to that identity (sessions.py)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any

import torch
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from baichuan_audio.v1 import conversation_pb2 as pb
from services.common.auth import Authenticator
from services.common.bus import Bus
from services.common.errors import NotFound, ResourceExhausted, Unavailable
from services.common.grpc_status import REDIS_UNREACHABLE, grpc_errors
from services.common.leases import Leases
from services.common.runtime import open_checkpoint, start_replica
from services.common.telemetry import inject_context, start_span
from services.common.text_tokenizer import DEFAULT_SYSTEM_PROMPT, load_text_tokenizer
from services.llm.prompts import PromptBuilder, ProtocolTokens
from orchestrator import turns
from orchestrator.conversation import Conversation, HistoryLimits, Turn, UserTurn, sampling_overrides
from orchestrator.merge import ReplyMerger
from orchestrator.quotas import Quotas
from orchestrator.sessions import SessionSettingsRecord, SessionStore, uid as session_uid

log = logging.getLogger(__name__)
TRUNCATE_WAIT_S = 10.0     # a truncate right after a cancel waits this long for the turn's record

TOKENIZE_ATTEMPTS = 3   # a tokenizer call whose replica died is sent again (it has no side effects)


def _sampling(msg: pb.SamplingOverrides) -> dict:
    """The sampling fields the caller set, validated (conversation.sampling_overrides)."""
    return sampling_overrides({f.name: v for f, v in msg.ListFields()})


def _settings_record(s: pb.SessionSettings) -> SessionSettingsRecord:
    return SessionSettingsRecord(
        system_prompt=s.system_prompt, spoken=s.reply_mode != pb.REPLY_MODE_TEXT,
        faithful_history=s.faithful_history, low_latency_audio=s.low_latency_audio,
        ttl_seconds=s.ttl_seconds, sampling=_sampling(s.sampling))


@serve.deployment(name="Conversation")
class ConversationDeployment:
    def __init__(self, config: Any, max_ongoing_requests: int):
        """max_ongoing_requests: Serve's cap on this replica's open calls (orchestrator/app.py
        passes its own option), which sizes the stream readers' thread pool."""
        self.settings = start_replica(config)
        ckpt = open_checkpoint(self.settings)
        text_tokenizer = load_text_tokenizer(ckpt.path)
        cfg = ckpt.config
        tokens = ProtocolTokens.from_tokenizer(text_tokenizer, cfg, ckpt.generation_config())
        context = self.settings.llm.context_tokens(cfg.llm.max_position_embeddings)
        self.conversation = Conversation(PromptBuilder(text_tokenizer, tokens, cfg.audio.num_codebooks),
                                         max_text_chars=self.settings.limits.max_text_chars,
                                         history=HistoryLimits.from_settings(self.settings.limits, context))
        self.auth = Authenticator.public(self.settings.auth)
        self.bus = Bus.from_settings(self.settings)
        self.leases = Leases(self.bus)     # the producer leases of the turns this replica produces
        quotas = self.settings.quotas
        client = self.bus.redis
        self.sessions = SessionStore(client, default_ttl_s=self.settings.limits.session_ttl_s,
                                     max_sessions=self.settings.limits.max_sessions,
                                     num_codebooks=cfg.audio.num_codebooks,
                                     max_per_owner=lambda owner: quotas.of(owner).sessions)
        self.quotas = Quotas(client, quotas, turn_ttl_s=self.settings.limits.session_ttl_s,
                             max_running_turns=self.settings.limits.max_running_turns)
        self.tokenizer_app = serve.get_app_handle("tokenizer")
        self.llm_app = serve.get_app_handle("llm")
        self.interrupts: dict[str, threading.Event] = {}   # turn_id -> set by Interrupt
        self.producers: set[asyncio.Task] = set()
        self.threads = turns.TurnThreads(producers=max(max_ongoing_requests, self.settings.limits.max_running_turns),
                                         readers=max_ongoing_requests)

    def _caller(self, grpc_context) -> str:
        """The caller's identity (UNAUTHENTICATED without a valid key), charged one request."""
        who = self.auth.caller(grpc_context)
        if self.bus.health.down:        # fail at once, not after a socket timeout each
            raise Unavailable(REDIS_UNREACHABLE)
        self.quotas.request(who)
        return who

    def _is_over(self, turn_id: str) -> bool:
        return turns.is_over(self.bus, turn_id)

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
        who = self._caller(grpc_context)
        settings = _settings_record(request.settings)
        self.conversation.check_settings(settings)
        sess = self.sessions.create(who, settings, request.session_id)
        return self._session_proto(sess)

    @grpc_errors
    async def GetSession(self, request, grpc_context=None):
        who = self._caller(grpc_context)
        return self._session_proto(self.sessions.get(who, request.session_id), history=True)

    @grpc_errors
    async def DeleteSession(self, request, grpc_context=None):
        who = self._caller(grpc_context)
        self.sessions.delete(who, request.session_id)
        uid = session_uid(who, request.session_id)
        try:
            await self.llm_app.options(multiplexed_model_id=uid).close_session.remote(uid)
        except Exception:  # noqa: BLE001 - the session is gone either way; the cache ages out
            log.warning("could not release the LLM cache of session %s", uid)
        return pb.DeleteSessionResponse(deleted=True)

    # ---------------------------------------------------------------- helpers
    async def _tokenize(self, audio: pb.AudioInput) -> tuple[torch.Tensor, float]:
        """The tokenizer's codes. Tokenizing has no side effects, so a replica that dies under
        the call is no reason to fail the turn: the call goes again (Serve routes it to another
        replica, or waits for the one it restarts), TOKENIZE_ATTEMPTS times in all."""
        for attempt in range(1, TOKENIZE_ATTEMPTS + 1):
            try:
                codes, seconds, _ = await self.tokenizer_app.tokenize.remote(audio)
                return codes, seconds
            except (RayActorError, ActorUnavailableError):
                if attempt == TOKENIZE_ATTEMPTS:
                    raise
                log.warning("the tokenizer replica died under a request (attempt %d); sending it again", attempt)
        raise AssertionError("unreachable")

    async def _reencode(self, pcm16: bytes) -> torch.Tensor:
        """A faithful history's assistant audio (24 kHz mono PCM16) through the tokenizer."""
        codes, _ = await self._tokenize(pb.AudioInput(pcm16=pb.RawPcm16(data=pcm16, sample_rate=24000, channels=1)))
        return codes

    async def _user_turn(self, request) -> UserTurn:
        if request.WhichOneof("input") == "audio":
            codes, seconds = await self._tokenize(request.audio)
            return UserTurn(codes=codes, audio_seconds=seconds)
        return UserTurn(text=request.text)

    async def _prompt(self, sess, user: UserTurn):
        if not sess.settings.faithful_history:
            return self.conversation.history_prompt(sess, user)
        past = self.sessions.faithful_turns(sess)
        prompt, changed = await self.conversation.faithful_prompt(sess, past, user, self._reencode)
        if changed:
            self.sessions.save_faithful_turns(sess, past)
        return prompt

    def _record(self, turn: Turn, outcome: "turns.TurnOutcome | None") -> None:
        rec = self.conversation.finish(turn, outcome)
        recorded = self.sessions.end_turn(turn.session, entries=rec.entries, tokens=rec.tokens, codes=rec.codes,
                                          turn_starts=rec.turn_starts, keep_entries=rec.keep_entries,
                                          turn_id=turn.turn_id)
        if recorded and rec.faithful is not None:   # not twice, nor for an abandoned turn
            past = self.sessions.faithful_turns(turn.session)
            self.sessions.save_faithful_turns(turn.session, past + [rec.faithful])

    @contextmanager
    def _admitting(self, who: str, turn_id: str):
        """A turn being set up holds its producer lease (a replica that dies meanwhile frees the
        session and the caller's running-turn count within bus.lease_ttl_s) and its place among
        `who`'s running turns and the stack's; if the set-up fails, both are given back."""
        self.leases.hold(turn_id, turns.PRODUCER)
        try:
            self.quotas.begin_turn(who, turn_id, self._is_over)
        except BaseException:
            self.leases.release(turn_id, turns.PRODUCER)
            raise
        try:
            yield
        except BaseException:
            self.quotas.end_turn(who, turn_id)
            self.leases.release(turn_id, turns.PRODUCER)
            raise

    def _continuer(self, turn: Turn, loop) -> "turns.ContinueLLM":
        """continue_llm for the producer of `turn` (a thread): the turn's own request, sent to
        an LLM replica as its n-th continuation (services/llm/continuation.py)."""
        async def call(n: int) -> None:
            await self.llm_app.options(multiplexed_model_id=turn.session.uid).generate.remote(
                turn.request, low_latency=turn.session.settings.low_latency_audio, continuation=n)

        def continue_llm(n: int) -> None:
            fut = asyncio.run_coroutine_threadsafe(call(n), loop)
            try:
                fut.result(turns.CONTINUE_WITHIN_S)
            except concurrent.futures.TimeoutError:
                fut.cancel()       # not asked again: a late answer must not make two continuations
                raise ValueError(f"no LLM replica answered within {turns.CONTINUE_WITHIN_S:.0f} s") from None
        return continue_llm

    def _start_producer(self, who: str, turn_id: str, merger: ReplyMerger, on_done,
                        sent: "turns.Sent | None" = None, continue_llm: "turns.ContinueLLM | None" = None) -> None:
        """Produce the turn's events on a thread; on_done(outcome) records it (history, the
        reply's audio charged to `who`) before the caller hears the end. The producer lease
        is held already (Converse, or a take-over) and released when the turn has ended.
        continue_llm: how the turn's reply goes on if its LLM replica dies (None: it cannot)."""
        flag = self.interrupts.setdefault(turn_id, threading.Event())

        def interrupted() -> bool:  # this replica's Interrupt, or one that reached another replica
            return flag.is_set() or turns.interrupt_requested(self.bus, turn_id)

        def record(outcome) -> None:
            try:
                on_done(outcome)            # the history first, then the caller hears the end
            finally:
                self.interrupts.pop(turn_id, None)
                try:   # before the end goes out: the caller's next turn must find it ended
                    self.quotas.end_turn(who, turn_id)
                except Exception:  # noqa: BLE001 - the count heals: is_over() sees the end
                    log.warning("could not end turn %s in %s's running turns", turn_id, who)

        def produce() -> None:
            try:
                turns.run(self.bus, merger, turn_id, interrupted=interrupted, record=record, sent=sent,
                          owns=lambda: self.leases.keep(turn_id, turns.PRODUCER), continue_llm=continue_llm,
                          max_continuations=self.settings.bus.llm_continuations)
            finally:
                self.leases.release(turn_id, turns.PRODUCER)

        task = self.threads.produce(produce)
        self.producers.add(task)
        task.add_done_callback(self.producers.discard)

    def _watch(self, turn_id: str, loop) -> "Any":
        """The `idle` check of a caller stream: a turn nobody produces (its replica died) is
        taken over by this replica (turns are produced into Redis, so any replica can); what
        cannot be taken over ends with UNAVAILABLE."""
        def idle() -> None:
            if turns.ended_at(self.bus, turn_id) is None and not self.bus.holds_lease(turn_id, turns.PRODUCER):
                asyncio.run_coroutine_threadsafe(self._take_over(turn_id), loop).result()
        return idle

    async def _take_over(self, turn_id: str) -> None:
        """Produce a turn whose producer died: rebuild what it began with (the session as it
        was, the user's turn kept in turn:{id}:setup, the same prompt), replay the stage
        streams through a new merger and send only what the caller stream lacks. One replica
        wins the lease; the others just read."""
        if not self.leases.take(turn_id, turns.PRODUCER):
            return
        setup = None
        try:
            setup = turns.load_setup(self.bus, turn_id)
            if setup is None:
                raise Unavailable("the replica producing this reply stopped before it was set up")
            sess = self.sessions.get(setup["owner"], setup["session_id"])
            user = turns.user_from_setup(setup)
            turn = self.conversation.turn(turn_id, sess, user, await self._prompt(sess, user))
            sent, final = await asyncio.get_running_loop().run_in_executor(None, turns.sent_events, self.bus, turn_id)
            if final:
                self.leases.release(turn_id, turns.PRODUCER)
                return
            log.warning("turn %s: its producer died; taking it over (%d events were sent)", turn_id, len(sent))
            merger = ReplyMerger(turn_id, spoken=sess.settings.spoken, started=setup["started"])
            self._start_producer(setup["owner"], turn_id, merger, self._on_done(setup["owner"], turn),
                                 sent=turns.Sent(sent), continue_llm=self._continuer(turn, asyncio.get_running_loop()))
        except Exception as e:  # noqa: BLE001 - the callers hear why instead of waiting
            log.warning("turn %s: cannot take it over: %s", turn_id, e)
            try:
                turns.abandon(self.bus, turn_id, f"the replica producing this reply stopped and the reply "
                                                 f"cannot be continued ({e}); send the request again")
                if setup is not None:
                    self.quotas.end_turn(setup["owner"], turn_id)
                    self.sessions.end_turn(self.sessions.get(setup["owner"], setup["session_id"]), entries=[],
                                           tokens=None, codes=None, turn_id=turn_id)
            except Exception:  # noqa: BLE001 - e.g. the session was deleted: nothing to free there
                log.warning("turn %s: could not end it cleanly", turn_id, exc_info=True)
            finally:
                self.leases.release(turn_id, turns.PRODUCER)

    def _on_done(self, who: str, turn: Turn):
        def done(outcome):
            self._record(turn, outcome)
            if outcome is not None:
                self.quotas.charge_audio(who, outcome.audio_seconds, force=True)
        return done

    async def _stream(self, turn_id: str, after: str = "0"):
        idle = self._watch(turn_id, asyncio.get_running_loop())
        async for _, ev in self.threads.stream(turns.events(self.bus, turn_id, after, idle=idle)):
            yield ev

    # ---------------------------------------------------------------- turns
    @grpc_errors
    async def Converse(self, request, grpc_context=None):
        who = self._caller(grpc_context)
        if request.resume_turn_id:
            sess = self.sessions.get(who, request.session_id)
            self.sessions.turn_of(sess, request.resume_turn_id)
            after = turns.check_event_id(request.after_event_id)
            if not turns.is_known(self.bus, request.resume_turn_id):
                raise NotFound(f"turn {request.resume_turn_id} of session {sess.session_id} is not known "
                               "(finished too long ago, or never started)")
            async for ev in self._stream(request.resume_turn_id, after):
                yield ev
            return
        self.conversation.check_input(request.WhichOneof("input"), request.text)
        self.quotas.check_audio(who)
        turn_id = uuid.uuid4().hex
        with self._admitting(who, turn_id):
            sess = self.sessions.begin_turn(who, request.session_id, turn_id, is_over=self._is_over)
        t0 = time.time()
        try:
            with start_span("turn", attributes={"session.id": sess.uid, "turn.id": turn_id, "identity": who}):
                user = await self._user_turn(request)
                self.quotas.charge_audio(who, user.audio_seconds)
                turn = self.conversation.turn(turn_id, sess, user, await self._prompt(sess, user))
                turns.save_setup(self.bus, turn_id, who, sess.session_id, user, started=t0)   # for a take-over
                await self.llm_app.options(multiplexed_model_id=sess.uid).generate.remote(
                    turn.request, low_latency=sess.settings.low_latency_audio, trace=inject_context())
        except BaseException:
            try:
                self.sessions.end_turn(sess, entries=[], tokens=None, codes=None, turn_id=turn_id)
                self.quotas.end_turn(who, turn_id)
            finally:
                self.leases.release(turn_id, turns.PRODUCER)
            raise

        merger = ReplyMerger(turn_id, spoken=sess.settings.spoken, started=t0)
        self._start_producer(who, turn_id, merger, self._on_done(who, turn),
                             continue_llm=self._continuer(turn, asyncio.get_running_loop()))
        async for ev in self._stream(turn_id):
            yield ev

    @grpc_errors
    async def Interrupt(self, request, grpc_context=None):
        who = self._caller(grpc_context)
        sess = self.sessions.get(who, request.session_id)
        turn_id = sess.active_turn
        if not turn_id:
            return pb.InterruptResponse(interrupted=False)
        if self._is_over(turn_id):
            return pb.InterruptResponse(interrupted=False, turn_id=turn_id)
        turns.request_interrupt(self.bus, turn_id)     # the producing replica may be another one
        flag = self.interrupts.get(turn_id)
        if flag is not None:
            flag.set()
        await self.llm_app.options(multiplexed_model_id=sess.uid).cancel.remote(turn_id)
        return pb.InterruptResponse(interrupted=True, turn_id=turn_id)

    @grpc_errors
    async def truncate(self, request: dict, grpc_context=None) -> dict:
        """Cut the session's last reply to what the caller heard, its first `audio_end_ms`
        (conversation.truncate); a handle call of the Realtime ingress (its
        conversation.item.truncate). A turn still being recorded (just interrupted) is waited for."""
        who = self._caller(grpc_context)
        sess = self.sessions.get(who, request["session_id"])
        deadline = time.monotonic() + TRUNCATE_WAIT_S
        while sess.active_turn and not self._is_over(sess.active_turn):
            if time.monotonic() > deadline:
                raise ResourceExhausted(f"session {sess.session_id} has a running turn; truncate its reply after "
                                        "it ends (or cancel it first)")
            await asyncio.sleep(0.05)
            sess = self.sessions.get(who, request["session_id"])
        rec = self.conversation.truncate(sess, float(request["audio_end_ms"]))
        self.sessions.rewrite(sess, history=rec.entries, tokens=rec.tokens, codes=rec.codes,
                              turn_starts=rec.turn_starts)
        last = rec.entries[-1]
        return {"text": last["text"], "audio_seconds": last["audio_seconds"]}

    @grpc_errors
    async def rate_limits(self, request: dict | None = None, grpc_context=None) -> list[dict]:
        """The caller's quotas left (Quotas.remaining; not charged as a request): a handle call
        of the Realtime ingress (its rate_limits.updated)."""
        return self.quotas.remaining(self.auth.caller(grpc_context))

    # ---------------------------------------------------------------- ASR / TTS
    async def _one_shot(self, who: str, make_request, spoken: bool) -> str:
        """ASR / TTS: no session; counted as one of `who`'s turns; the reply is produced into
        its events stream like a turn. make_request(id) builds the LLM request (awaitable)."""
        self.quotas.check_audio(who)
        rid = uuid.uuid4().hex
        with self._admitting(who, rid):
            req = await make_request(rid)
            await self.llm_app.generate.remote(req)

        def done(outcome):
            if outcome is not None and spoken:
                self.quotas.charge_audio(who, outcome.audio_seconds, force=True)

        self._start_producer(who, rid, ReplyMerger(rid, spoken=spoken), done)
        return rid

    @grpc_errors
    async def Transcribe(self, request, grpc_context=None):
        who = self._caller(grpc_context)
        heard = {}

        async def make(rid):
            codes, heard["seconds"] = await self._tokenize(request.audio)
            self.quotas.charge_audio(who, heard["seconds"])
            return self.conversation.transcribe_request(rid, codes)

        rid = await self._one_shot(who, make, spoken=False)
        text = ""
        async for ev in self._stream(rid):
            if ev.HasField("error"):
                raise RuntimeError(ev.error.message)
            if ev.HasField("end"):
                text = ev.end.text
        return pb.TranscribeResponse(text=text, audio_seconds=heard["seconds"])

    @grpc_errors
    async def Synthesize(self, request, grpc_context=None):
        who = self._caller(grpc_context)
        sampling = _sampling(request.sampling)

        async def make(rid):
            return self.conversation.synthesize_request(rid, request.text, sampling)

        rid = await self._one_shot(who, make, spoken=True)
        async for ev in self._stream(rid):
            yield ev

    # ---------------------------------------------------------------- health
    async def Check(self, request, grpc_context=None):
        """grpc.health.v1: SERVING while this replica reaches Redis (sessions and streams live there)."""
        from grpc_health.v1 import health_pb2
        try:
            ok = not self.bus.health.down and await asyncio.get_running_loop().run_in_executor(None, self.bus.redis.ping)
        except Exception:  # noqa: BLE001 - any failure means not serving
            ok = False
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)
