"""The OpenAI Realtime protocol over one WebSocket, bridged to the conversation service.

Plain Python (no Ray, Redis or gRPC): `RealtimeConnection` takes the client's events (JSON
text), keeps the connection's state (session settings, the input audio buffer, the items, the
running response) and sends the server's events through `send`. Everything a turn means runs
in the conversation deployment, which the `Backend` reaches (realtime_deployment.py: Serve
handles); this module only translates: one Realtime response is one `Converse` turn, a
`response.cancel` (or a barge-in) its `Interrupt`, `conversation.item.truncate` its `truncate`.

The subset of the protocol, and where it differs from OpenAI's, is in README "Realtime API".
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import numpy as np
import torch
import torchaudio.functional as AF

from baichuan_audio.v1 import conversation_pb2 as pb
from orchestrator.vad import SpeechDetector

log = logging.getLogger(__name__)

RATE = 24000                       # PCM16 in and out (the vocoder's rate; OpenAI's pcm rate)
MAX_INPUT_RATE, MIN_INPUT_RATE = 192000, 8000
DEFAULT_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
               "create_response": True, "interrupt_response": True}
# A Realtime error type per status code of the conversation service.
ERROR_TYPES = {"INVALID_ARGUMENT": "invalid_request_error", "NOT_FOUND": "invalid_request_error",
               "ALREADY_EXISTS": "invalid_request_error", "UNAUTHENTICATED": "authentication_error",
               "RESOURCE_EXHAUSTED": "rate_limit_error"}


class BackendError(Exception):
    """A call of the conversation service failed: `code` its status name, the message its own."""

    def __init__(self, message: str, code: str = "INTERNAL"):
        super().__init__(message)
        self.code = code


class Backend(Protocol):
    """The conversation service for one caller (the deployment binds the caller's key)."""

    async def open_session(self, session_id: str) -> dict | None: ...            # None: no such session
    async def create_session(self, session_id: str, instructions: str, spoken: bool) -> dict: ...
    def converse(self, session_id: str, *, pcm16: bytes = b"", text: str = "") -> AsyncIterator[pb.TurnEvent]: ...
    async def interrupt(self, session_id: str) -> None: ...
    async def truncate(self, session_id: str, audio_end_ms: int) -> dict: ...
    async def rate_limits(self) -> list[dict]: ...


class ProtocolError(ValueError):
    """A client event the server cannot take: sent back as an `error` event, the connection stays."""

    def __init__(self, message: str, code: str = "invalid_event", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def resample_pcm16(pcm16: bytes, rate: int) -> bytes:
    """Mono PCM16 at `rate` -> 24 kHz (torchaudio's band-limited resampler)."""
    if rate == RATE or not pcm16:
        return pcm16
    x = torch.from_numpy(np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0)
    y = AF.resample(x, rate, RATE).numpy()
    return (np.clip(y, -1.0, 32767 / 32768) * 32768.0).round().astype("<i2").tobytes()


@dataclass
class Response:
    id: str
    item_id: str
    spoken: bool
    task: asyncio.Task | None = None
    text: list[str] = field(default_factory=list)
    audio_bytes: int = 0
    cancelled: bool = False


class RealtimeConnection:
    """One WebSocket: one session. `handle(text)` for each client message; `close()` at the end."""

    def __init__(self, backend: Backend, send: Callable[[dict], Awaitable[None]], *, session_id: str,
                 existing: dict | None = None, vad_model_loader: Callable[[], Any] | None = None,
                 max_audio_seconds: float = 600.0, max_text_chars: int = 4000):
        self.backend = backend
        self._send = send
        self.session_id = session_id
        self.created = existing is not None            # the conversation session exists
        self.vad_model_loader = vad_model_loader
        self.vad_model = None
        self.max_buffer_bytes = int(max_audio_seconds * RATE) * 2
        self.max_text_chars = max_text_chars
        self.session: dict[str, Any] = {
            "type": "realtime", "object": "realtime.session", "id": session_id, "model": "baichuan-audio",
            "instructions": (existing or {}).get("instructions", ""),
            "output_modalities": ["audio" if (existing or {}).get("spoken", True) else "text"],
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": dict(DEFAULT_VAD)},
                      "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": "default"}},
        }
        self.buffer = bytearray()                      # uncommitted input at 24 kHz
        self.buffer_start_ms = 0.0                     # where the buffer starts in the input's timeline
        self.input_ms = 0.0                            # input audio received so far
        self.speech_item: str | None = None            # the item id of speech under way (server VAD)
        self.detector: SpeechDetector | None = None
        self.pending: list[tuple[str, str, Any]] = []  # user items for the next response: (item id, kind, data)
        self.last_item: str | None = None
        self.response: Response | None = None
        self.last_reply: str | None = None             # the assistant item a truncate may name
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ output
    async def send(self, event: dict) -> None:
        event = {"event_id": _id("event"), **event}
        async with self._lock:                          # the response task sends too
            await self._send(event)

    async def error(self, message: str, *, code: str = "invalid_event", type_: str = "invalid_request_error",
                    param: str | None = None, event_id: str | None = None) -> None:
        await self.send({"type": "error", "error": {"type": type_, "code": code, "message": message,
                                                     "param": param, "event_id": event_id}})

    async def backend_error(self, e: BackendError, event_id: str | None = None) -> None:
        await self.error(str(e), code=e.code.lower(), type_=ERROR_TYPES.get(e.code, "server_error"),
                         event_id=event_id)

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        self._configure_vad()
        await self.send({"type": "session.created", "session": self.session})

    async def close(self) -> None:
        """The socket closed: a running response is interrupted (its turn is recorded)."""
        r = self.response
        if r is not None and r.task is not None and not r.task.done():
            try:
                await self.backend.interrupt(self.session_id)
            except BackendError:
                pass
            r.task.cancel()

    async def handle(self, text: str | bytes) -> None:
        """One client message. Anything wrong with it is an `error` event; never an exception."""
        event_id = None
        try:
            try:
                event = json.loads(text)
            except (ValueError, UnicodeDecodeError) as e:
                raise ProtocolError(f"the message is not JSON ({e})", "invalid_json") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ProtocolError("an event is a JSON object with a string `type`", "invalid_event", "type")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            handler = HANDLERS.get(event["type"])
            if handler is None:
                raise ProtocolError(f"unknown or unsupported event type {event['type']!r}; supported: "
                                    + ", ".join(sorted(HANDLERS)), "unknown_event", "type")
            await handler(self, event)
        except ProtocolError as e:
            await self.error(str(e), code=e.code, param=e.param, event_id=event_id)
        except BackendError as e:
            await self.backend_error(e, event_id)

    # ------------------------------------------------------------------ session
    def _configure_vad(self) -> None:
        td = self.session["audio"]["input"]["turn_detection"]
        if td is None:
            self.detector = None
            return
        if self.vad_model is None:
            if self.vad_model_loader is None:
                raise ProtocolError("server_vad is not available on this server", "unsupported")
            self.vad_model = self.vad_model_loader()
        self.detector = SpeechDetector(self.vad_model, threshold=float(td["threshold"]),
                                       silence_ms=float(td["silence_duration_ms"]))

    async def on_session_update(self, event: dict) -> None:
        s = event.get("session")
        if not isinstance(s, dict):
            raise ProtocolError("session.update needs a `session` object", param="session")
        if s.get("type", "realtime") != "realtime":
            raise ProtocolError(f"session.type {s.get('type')!r} is not supported: only 'realtime'", param="session.type")
        new = json.loads(json.dumps(self.session))
        audio = s.get("audio") or {}
        inp, outp = audio.get("input") or {}, audio.get("output") or {}
        if "instructions" in s:
            if not isinstance(s["instructions"], str):
                raise ProtocolError("session.instructions must be a string", param="session.instructions")
            new["instructions"] = s["instructions"]
        mods = s.get("output_modalities", s.get("modalities"))
        if mods is not None:
            if mods not in (["audio"], ["text"], ["text", "audio"], ["audio", "text"]):
                raise ProtocolError(f"output_modalities {mods!r}: use ['audio'] (spoken replies with their "
                                    "transcript) or ['text']", param="session.output_modalities")
            new["output_modalities"] = ["text"] if mods == ["text"] else ["audio"]
        fmt = inp.get("format", s.get("input_audio_format"))
        if fmt is not None:
            new["audio"]["input"]["format"] = {"type": "audio/pcm", "rate": self._input_rate(fmt)}
        ofmt = outp.get("format", s.get("output_audio_format"))
        if ofmt is not None and self._format_rate(ofmt, "session.audio.output.format") != RATE:
            raise ProtocolError(f"output audio is PCM16 at {RATE} Hz only", param="session.audio.output.format")
        if "voice" in outp:
            new["audio"]["output"]["voice"] = str(outp["voice"])
        if "turn_detection" in inp or "turn_detection" in s:
            new["audio"]["input"]["turn_detection"] = self._turn_detection(inp.get("turn_detection", s.get("turn_detection")))
        if self.created and (new["instructions"] != self.session["instructions"]
                             or new["output_modalities"] != self.session["output_modalities"]):
            raise ProtocolError("instructions and output_modalities are the session's system prompt and reply mode, "
                                "fixed once its first turn ran: open a new session (a new connection) to change them",
                                "session_already_started", "session.instructions")
        self.session = new
        self._configure_vad()
        await self.send({"type": "session.updated", "session": self.session})

    @staticmethod
    def _format_rate(fmt: Any, param: str) -> int:
        if fmt == "pcm16":                     # the beta API's name
            return RATE
        if not isinstance(fmt, dict) or fmt.get("type") not in ("audio/pcm", "pcm16"):
            raise ProtocolError(f"audio format {fmt!r} is not supported: only {{'type': 'audio/pcm', 'rate': N}} "
                                "(PCM16 mono little-endian)", "unsupported_audio_format", param)
        rate = fmt.get("rate", RATE)
        if not isinstance(rate, int) or isinstance(rate, bool):
            raise ProtocolError(f"audio format rate {rate!r} is not an integer", "unsupported_audio_format", param)
        return rate

    def _input_rate(self, fmt: Any) -> int:
        rate = self._format_rate(fmt, "session.audio.input.format")
        if not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE:
            raise ProtocolError(f"input rate {rate} Hz is outside [{MIN_INPUT_RATE}, {MAX_INPUT_RATE}]",
                                "unsupported_audio_format", "session.audio.input.format.rate")
        return rate

    @staticmethod
    def _turn_detection(td: Any) -> dict | None:
        if td is None:
            return None
        if not isinstance(td, dict) or td.get("type", "server_vad") != "server_vad":
            raise ProtocolError(f"turn_detection {td!r} is not supported: use null (the client commits) or "
                                "{'type': 'server_vad', ...}", "unsupported_turn_detection", "session.turn_detection")
        out = dict(DEFAULT_VAD)
        for k in ("threshold", "prefix_padding_ms", "silence_duration_ms"):
            if k in td:
                v = td[k]
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                    raise ProtocolError(f"turn_detection.{k}={v!r} is not a non-negative number", param=f"turn_detection.{k}")
                out[k] = v
        if not 0 < out["threshold"] < 1:
            raise ProtocolError(f"turn_detection.threshold={out['threshold']} is not in (0, 1)", param="turn_detection.threshold")
        if out["silence_duration_ms"] <= 0:
            raise ProtocolError("turn_detection.silence_duration_ms must be positive", param="turn_detection.silence_duration_ms")
        for k in ("create_response", "interrupt_response"):
            if k in td:
                out[k] = bool(td[k])
        return out

    # ------------------------------------------------------------------ input audio
    async def on_append(self, event: dict) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ProtocolError("input_audio_buffer.append needs `audio`: base64 PCM16", param="audio")
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("input_audio_buffer.append: `audio` is not valid base64", "invalid_audio", "audio") from None
        if len(raw) % 2:
            raise ProtocolError("input_audio_buffer.append: PCM16 has an even number of bytes", "invalid_audio", "audio")
        pcm = resample_pcm16(raw, self.session["audio"]["input"]["format"]["rate"])
        if len(self.buffer) + len(pcm) > self.max_buffer_bytes:
            raise ProtocolError(f"the input audio buffer would exceed {self.max_buffer_bytes // 2 // RATE} s "
                                "(limits.max_audio_seconds): commit or clear it", "input_audio_buffer_full", "audio")
        self.buffer += pcm
        self.input_ms += len(pcm) / 2 * 1000.0 / RATE
        if self.detector is not None:
            for ev in self.detector.feed(pcm):
                await self._vad_event(ev.kind, ev.ms)
            if self.speech_item is None:       # keep only the prefix padding before speech
                self._trim_to(self.input_ms - self.session["audio"]["input"]["turn_detection"]["prefix_padding_ms"])

    def _trim_to(self, ms: float) -> None:
        drop = int(max(0.0, ms - self.buffer_start_ms) * RATE / 1000.0) * 2
        if drop > 0:
            drop = min(drop, len(self.buffer))
            del self.buffer[:drop]
            self.buffer_start_ms += drop / 2 * 1000.0 / RATE

    async def _vad_event(self, kind: str, ms: float) -> None:
        td = self.session["audio"]["input"]["turn_detection"]
        if kind == "speech_started":
            self.speech_item = _id("item")
            self._trim_to(ms - td["prefix_padding_ms"])
            await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": int(ms),
                             "item_id": self.speech_item})
            r = self.response
            if td["interrupt_response"] and r is not None and r.task is not None and not r.task.done():
                await self._cancel(r)          # barge-in
            return
        item = self.speech_item or _id("item")
        self.speech_item = None
        await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": int(ms), "item_id": item})
        await self._commit(item)
        if td["create_response"]:
            await self._start_response({})

    async def on_commit(self, event: dict) -> None:
        if self.detector is not None and self.speech_item is not None:
            item = self.speech_item
            self.speech_item = None
        else:
            item = _id("item")
        await self._commit(item)

    async def _commit(self, item_id: str) -> None:
        min_bytes = int(0.1 * RATE) * 2          # OpenAI's rule: at least 100 ms
        if len(self.buffer) < min_bytes:
            raise ProtocolError(f"the input audio buffer holds {len(self.buffer) / 2 / RATE * 1000:.0f} ms; "
                                "a commit needs at least 100 ms of audio", "input_audio_buffer_commit_empty")
        pcm = bytes(self.buffer)
        self.buffer.clear()
        self.buffer_start_ms = self.input_ms
        self.pending.append((item_id, "audio", pcm))
        prev, self.last_item = self.last_item, item_id
        await self.send({"type": "input_audio_buffer.committed", "previous_item_id": prev, "item_id": item_id})
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": item})

    async def on_clear(self, event: dict) -> None:
        self.buffer.clear()
        self.buffer_start_ms = self.input_ms
        self.speech_item = None
        if self.detector is not None:
            self._configure_vad()
        await self.send({"type": "input_audio_buffer.cleared"})

    # ------------------------------------------------------------------ items
    async def on_item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise ProtocolError("conversation.item.create takes an item of type 'message'", param="item.type")
        if item.get("role") != "user":
            raise ProtocolError(f"item role {item.get('role')!r} is not supported: only 'user' items (the system "
                                "prompt is session.instructions; assistant items come from responses)", param="item.role")
        parts = item.get("content")
        if not isinstance(parts, list) or not parts:
            raise ProtocolError("item.content must be a non-empty list", param="item.content")
        texts, audio = [], b""
        for p in parts:
            kind = p.get("type") if isinstance(p, dict) else None
            if kind in ("input_text", "text") and isinstance(p.get("text"), str):
                texts.append(p["text"])
            elif kind == "input_audio" and isinstance(p.get("audio"), str):
                try:
                    audio += base64.b64decode(p["audio"], validate=True)
                except (binascii.Error, ValueError):
                    raise ProtocolError("item content audio is not valid base64", "invalid_audio", "item.content") from None
            else:
                raise ProtocolError(f"content part {p!r} is not supported: use input_text with `text` or "
                                    "input_audio with `audio` (base64 PCM16 at the input rate)", param="item.content")
        if texts and audio:
            raise ProtocolError("one item is text or audio, not both", param="item.content")
        text = "\n".join(texts)
        if texts and not text.strip():
            raise ProtocolError("the item's text is empty", param="item.content")
        if len(text) > self.max_text_chars:
            raise ProtocolError(f"text of {len(text)} characters is over the limit of {self.max_text_chars}",
                                "text_too_long", "item.content")
        item_id = item.get("id") if isinstance(item.get("id"), str) and item["id"] else _id("item")
        prev = self.last_item
        if event.get("previous_item_id") not in (None, prev):
            raise ProtocolError("previous_item_id must be the last item (items are appended only)",
                                param="previous_item_id")
        self.pending.append((item_id, "text", text) if texts else
                            (item_id, "audio", resample_pcm16(audio, self.session["audio"]["input"]["format"]["rate"])))
        self.last_item = item_id
        out = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
               "content": [{"type": "input_text", "text": text}] if texts else [{"type": "input_audio", "transcript": None}]}
        await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": out})
        await self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": out})

    async def on_truncate(self, event: dict) -> None:
        item_id, index, end = event.get("item_id"), event.get("content_index", 0), event.get("audio_end_ms")
        if item_id != self.last_reply or item_id is None:
            raise ProtocolError(f"item {item_id!r} cannot be truncated: only the last assistant item "
                                f"({self.last_reply}) can", "item_truncate_invalid_item_id", "item_id")
        if index != 0:
            raise ProtocolError("content_index must be 0 (an assistant item has one audio part)", param="content_index")
        if not isinstance(end, int) or isinstance(end, bool) or end < 0:
            raise ProtocolError("audio_end_ms must be a non-negative integer", param="audio_end_ms")
        r = self.response
        if r is not None and r.task is not None and not r.task.done():
            await self._cancel(r)                 # what was not heard is not played either
            await asyncio.wait({r.task})
        try:
            await self.backend.truncate(self.session_id, end)
        except BackendError as e:
            if e.code == "INVALID_ARGUMENT":
                raise ProtocolError(str(e), "invalid_audio_end_ms", "audio_end_ms") from None
            raise
        await self.send({"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0,
                         "audio_end_ms": end})

    # ------------------------------------------------------------------ responses
    async def on_response_create(self, event: dict) -> None:
        cfg = event.get("response") or {}
        if not isinstance(cfg, dict):
            raise ProtocolError("response must be an object", param="response")
        await self._start_response(cfg)

    async def on_response_cancel(self, event: dict) -> None:
        r = self.response
        if r is None or r.task is None or r.task.done() or \
                (event.get("response_id") not in (None, r.id)):
            raise ProtocolError("there is no active response to cancel", "response_cancel_not_active", "response_id")
        await self._cancel(r)

    async def _cancel(self, r: Response) -> None:
        r.cancelled = True
        await self.backend.interrupt(self.session_id)

    async def _start_response(self, cfg: dict) -> None:
        if self.response is not None and self.response.task is not None and not self.response.task.done():
            raise ProtocolError(f"response {self.response.id} is still in progress: wait for response.done or "
                                "send response.cancel", "conversation_already_has_active_response")
        mods = cfg.get("output_modalities", cfg.get("modalities"))
        spoken = self.session["output_modalities"] == ["audio"]
        if mods is not None and (["text"] if mods == ["text"] else ["audio"]) != self.session["output_modalities"]:
            raise ProtocolError("a response's output_modalities must be the session's (its reply mode)",
                                param="response.output_modalities")
        if cfg.get("instructions") not in (None, self.session["instructions"]):
            raise ProtocolError("per-response instructions are not supported: set session.instructions",
                                param="response.instructions")
        if not self.pending:
            raise ProtocolError("nothing to respond to: commit input audio or create a user item first "
                                "(each response answers new user input)", "response_no_input")
        kinds = {k for _, k, _ in self.pending}
        if len(kinds) > 1 or (kinds == {"audio"} and len(self.pending) > 1):
            audio = b"".join(d for _, k, d in self.pending if k == "audio")
            if kinds != {"audio"}:
                raise ProtocolError("a response answers either text items or audio, not both", "response_mixed_input")
            user = {"pcm16": audio}
        elif kinds == {"text"}:
            user = {"text": "\n".join(d for _, _, d in self.pending)}
        else:
            user = {"pcm16": self.pending[0][2]}
        if not self.created:
            await self.backend.create_session(self.session_id, self.session["instructions"], spoken)
            self.created = True
        self.pending.clear()
        r = Response(_id("resp"), _id("item"), spoken)
        self.response = r
        self.last_reply = r.item_id
        await self.send({"type": "response.created", "response": self._response_obj(r, "in_progress", [])})
        r.task = asyncio.create_task(self._run(r, user))

    def _response_obj(self, r: Response, status: str, output: list, details: dict | None = None) -> dict:
        return {"object": "realtime.response", "id": r.id, "status": status, "status_details": details,
                "output": output, "output_modalities": ["audio" if r.spoken else "text"], "conversation_id": self.session_id,
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": self.session["audio"]["output"]["voice"]}},
                "usage": None, "metadata": None}

    async def _run(self, r: Response, user: dict) -> None:
        """Stream one turn into the response's events; always ends with response.done."""
        ids = {"response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0}
        prev, self.last_item = self.last_item, r.item_id
        item = {"id": r.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        part = {"type": "audio", "transcript": ""} if r.spoken else {"type": "text", "text": ""}
        status, details = "completed", None
        try:
            await self.send({"type": "response.output_item.added", "response_id": r.id, "output_index": 0, "item": item})
            await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
            await self.send({"type": "response.content_part.added", **ids, "part": part})
            async for ev in self.backend.converse(self.session_id, **user):
                which = ev.WhichOneof("event")
                if which == "text" and ev.text.text:
                    r.text.append(ev.text.text)
                    kind = "response.output_audio_transcript.delta" if r.spoken else "response.output_text.delta"
                    await self.send({"type": kind, **ids, "delta": ev.text.text})
                elif which == "audio" and r.spoken and not r.cancelled:
                    r.audio_bytes += len(ev.audio.pcm16)
                    await self.send({"type": "response.output_audio.delta", **ids,
                                     "delta": base64.b64encode(ev.audio.pcm16).decode()})
                elif which == "end":
                    if ev.end.reason == "interrupted":
                        status, details = "cancelled", {"type": "cancelled", "reason": "client_cancelled"}
                    elif ev.end.reason == "length":
                        status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
                elif which == "error":
                    status = "failed"
                    details = {"type": "failed", "error": {"type": "server_error", "code": str(ev.error.code),
                                                           "message": ev.error.message}}
        except BackendError as e:
            status = "failed"
            details = {"type": "failed", "error": {"type": ERROR_TYPES.get(e.code, "server_error"),
                                                   "code": e.code.lower(), "message": str(e)}}
            await self.backend_error(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the response fails, the connection stays
            log.exception("realtime response %s failed", r.id)
            status = "failed"
            details = {"type": "failed", "error": {"type": "server_error", "code": "internal",
                                                   "message": f"internal error ({type(e).__name__}); see the server log"}}
        if r.cancelled and status == "completed":
            status, details = "cancelled", {"type": "cancelled", "reason": "client_cancelled"}
        text = "".join(r.text)
        done_part = {"type": "audio", "transcript": text} if r.spoken else {"type": "text", "text": text}
        item = dict(item, status="completed" if status == "completed" else "incomplete", content=[done_part])
        if r.spoken:
            await self.send({"type": "response.output_audio.done", **ids})
            await self.send({"type": "response.output_audio_transcript.done", **ids, "transcript": text})
        else:
            await self.send({"type": "response.output_text.done", **ids, "text": text})
        await self.send({"type": "response.content_part.done", **ids, "part": done_part})
        await self.send({"type": "response.output_item.done", "response_id": r.id, "output_index": 0, "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": item})
        await self.send({"type": "response.done", "response": self._response_obj(r, status, [item], details)})
        try:
            limits = await self.backend.rate_limits()
            await self.send({"type": "rate_limits.updated", "rate_limits": limits})
        except BackendError as e:
            log.info("rate limits of session %s not read: %s", self.session_id, e)


HANDLERS: dict[str, Callable[[RealtimeConnection, dict], Awaitable[None]]] = {
    "session.update": RealtimeConnection.on_session_update,
    "input_audio_buffer.append": RealtimeConnection.on_append,
    "input_audio_buffer.commit": RealtimeConnection.on_commit,
    "input_audio_buffer.clear": RealtimeConnection.on_clear,
    "conversation.item.create": RealtimeConnection.on_item_create,
    "conversation.item.truncate": RealtimeConnection.on_truncate,
    "response.create": RealtimeConnection.on_response_create,
    "response.cancel": RealtimeConnection.on_response_cancel,
}
