"""The Realtime API (`/v1/realtime`, WebSocket) and the browser voice page (`/`) as a Ray Serve
HTTP ingress deployment (FastAPI).

Thin glue: the caller's key is checked here (services/common/auth.py, the same API keys as the
gRPC API: `Authorization: Bearer <key>`, or the browser's WebSocket subprotocol
`openai-insecure-api-key.<key>`), then every call goes to the conversation deployment through
its Serve handle with that key (so its identity, sessions, quotas and turn logic are the gRPC
API's own); realtime.py translates the protocol."""
# no `from __future__ import annotations`: FastAPI must see the WebSocket annotation as a class

import logging
import uuid
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, Response
from ray import serve

from baichuan_audio.v1 import conversation_pb2 as pb
from orchestrator.realtime import BackendError, RealtimeConnection
from orchestrator.sessions import ID_RE
from orchestrator.vad import load_model
from services.common.auth import Authenticator
from services.common.errors import Unauthenticated
from services.common.runtime import start_replica

log = logging.getLogger(__name__)

SUBPROTOCOL_KEY = "openai-insecure-api-key."   # what OpenAI's browser clients send the key in
POLICY_VIOLATION = 1008                         # WebSocket close codes (RFC 6455)
INTERNAL_ERROR = 1011
WEB_FILES = {"index.html": "text/html", "app.js": "text/javascript", "player.js": "text/javascript",
             "recorder.js": "text/javascript"}

app = FastAPI(title="baichuan-audio realtime", docs_url=None, redoc_url=None, openapi_url=None)


class KeyContext:
    """What the conversation deployment's methods read from a gRPC context: the caller's
    metadata (its key, checked there again) and the status they set (unused here: the
    status comes back on the StatusError)."""

    def __init__(self, key: str):
        self._md = (("authorization", f"Bearer {key}"),) if key else ()

    def invocation_metadata(self):
        return self._md

    def set_code(self, code) -> None: ...
    def set_details(self, details) -> None: ...
    def set_trailing_metadata(self, md) -> None: ...


def _backend_error(e: BaseException) -> BackendError:
    """The conversation service's status (StatusError, through Ray's wrapper) as a BackendError."""
    from services.common.grpc_status import status_for, unwrap

    inner = unwrap(e)
    code = getattr(inner, "code", "")
    if isinstance(code, str) and code:
        return BackendError(str(inner), code)
    status, msg = status_for(inner)
    return BackendError(msg, status.name)


class HandleBackend:
    """realtime.Backend over the conversation app's Serve handle, for one caller's key."""

    def __init__(self, handle, key: str):
        self.handle = handle
        self.ctx = KeyContext(key)

    async def _call(self, method: str, request: Any):
        try:
            return await getattr(self.handle, method).remote(request, grpc_context=self.ctx)
        except Exception as e:  # noqa: BLE001 - a status for the client
            raise _backend_error(e) from None

    async def open_session(self, session_id: str) -> dict | None:
        try:
            s = await self._call("GetSession", pb.GetSessionRequest(session_id=session_id))
        except BackendError as e:
            if e.code == "NOT_FOUND":
                return None
            raise
        return {"instructions": s.settings.system_prompt, "spoken": s.settings.reply_mode != pb.REPLY_MODE_TEXT}

    async def create_session(self, session_id: str, instructions: str, spoken: bool) -> dict:
        settings = pb.SessionSettings(system_prompt=instructions,
                                      reply_mode=pb.REPLY_MODE_SPOKEN if spoken else pb.REPLY_MODE_TEXT)
        await self._call("CreateSession", pb.CreateSessionRequest(session_id=session_id, settings=settings))
        return {}

    async def converse(self, session_id: str, *, pcm16: bytes = b"", text: str = "") -> AsyncIterator[pb.TurnEvent]:
        req = pb.ConverseRequest(session_id=session_id)
        if pcm16:
            req.audio.pcm16.CopyFrom(pb.RawPcm16(data=pcm16, sample_rate=24000, channels=1))
        else:
            req.text = text
        try:
            async for ev in self.handle.options(stream=True).Converse.remote(req, grpc_context=self.ctx):
                yield ev
        except Exception as e:  # noqa: BLE001
            raise _backend_error(e) from None

    async def interrupt(self, session_id: str) -> None:
        await self._call("Interrupt", pb.InterruptRequest(session_id=session_id))

    async def truncate(self, session_id: str, audio_end_ms: int) -> dict:
        return await self._call("truncate", {"session_id": session_id, "audio_end_ms": audio_end_ms})

    async def rate_limits(self) -> list[dict]:
        return await self._call("rate_limits", {})


def _key_and_subprotocol(ws: WebSocket) -> tuple[str, str | None]:
    """The key (Authorization header, else the subprotocol) and the subprotocol to accept."""
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    key = ""
    auth = ws.headers.get("authorization", "")
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() == "bearer":
        key = token.strip()
    for p in offered:
        if p.startswith(SUBPROTOCOL_KEY) and not key:
            key = p[len(SUBPROTOCOL_KEY):]
    chosen = "realtime" if "realtime" in offered else None
    return key, chosen


@serve.deployment(name="Realtime")
@serve.ingress(app)
class RealtimeDeployment:
    def __init__(self, config: Any = None):
        self.settings = start_replica(config)
        self.auth = Authenticator.public(self.settings.auth)
        self.conversation = serve.get_app_handle("conversation")

    @app.get("/", response_class=HTMLResponse)
    async def index(self) -> Response:
        return await self.web("index.html")

    @app.get("/web/{name}")
    async def web(self, name: str) -> Response:
        if name not in WEB_FILES:
            return Response("not found", status_code=404, media_type="text/plain")
        body = resources.files("orchestrator").joinpath("web", name).read_bytes()
        return Response(body, media_type=WEB_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.websocket("/v1/realtime")
    async def realtime(self, ws: WebSocket) -> None:
        key, subprotocol = _key_and_subprotocol(ws)
        await ws.accept(subprotocol=subprotocol)
        try:
            self.auth.identity((("authorization", f"Bearer {key}"),) if key else ())
        except Unauthenticated as e:
            msg = str(e).replace("metadata 'authorization: Bearer <API key>'",
                                 "header 'Authorization: Bearer <API key>' (or the WebSocket subprotocol "
                                 f"'{SUBPROTOCOL_KEY}<API key>')")
            await ws.send_json({"type": "error", "event_id": f"event_{uuid.uuid4().hex[:20]}",
                                "error": {"type": "authentication_error", "code": "unauthenticated",
                                          "message": msg, "param": None, "event_id": None}})
            await ws.close(POLICY_VIOLATION, "unauthenticated: send a valid API key")
            return
        backend = HandleBackend(self.conversation, key)
        sid = ws.query_params.get("session_id", "")
        conn = None
        try:
            if sid and not ID_RE.fullmatch(sid):
                await ws.close(POLICY_VIOLATION, "session_id: use 1-64 of A-Z a-z 0-9 _ -")
                return
            existing = await backend.open_session(sid) if sid else None
            conn = RealtimeConnection(backend, ws.send_json, session_id=sid or uuid.uuid4().hex, existing=existing,
                                      vad_model_loader=load_model,   # its own: silero keeps state
                                      max_audio_seconds=self.settings.limits.max_audio_seconds,
                                      max_text_chars=self.settings.limits.max_text_chars)
            await conn.start()
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                await conn.handle(msg.get("text") if msg.get("text") is not None else msg.get("bytes") or b"")
        except WebSocketDisconnect:
            pass
        except BackendError as e:
            await _close(ws, POLICY_VIOLATION if e.code != "INTERNAL" else INTERNAL_ERROR, f"{e.code.lower()}: {e}")
        except Exception:  # noqa: BLE001 - a bug: the client gets a reason, the log the trace
            log.exception("realtime connection failed")
            await _close(ws, INTERNAL_ERROR, "internal error; see the server log")
        finally:
            if conn is not None:
                await conn.close()


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    """Close with a reason (at most 123 bytes, RFC 6455), ignoring a socket already gone."""
    data = reason.encode()[:123]
    while data:
        try:
            reason = data.decode()
            break
        except UnicodeDecodeError:
            data = data[:-1]
    try:
        await ws.close(code, reason)
    except (RuntimeError, WebSocketDisconnect):
        pass
