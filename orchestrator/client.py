"""A small client of the ConversationService, used by the CLI and the demo."""
from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from baichuan_audio.v1 import conversation_pb2 as pb
from baichuan_audio.v1 import conversation_pb2_grpc as pb_grpc
from services.common.audio import wav_bytes

APP_METADATA = (("application", "conversation"),)
API_KEY_ENV = "BAICHUAN_AUDIO_API_KEY"


def local_key_file() -> Path:
    """Where `baichuan-audio serve` writes the key it makes when none is configured."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "baichuan-audio" / "api-keys"


def find_api_key(key_file: str | None = None) -> str | None:
    """The key to send: from `key_file`, else $BAICHUAN_AUDIO_API_KEY, else the local key file
    that `serve` made (None if there is none)."""
    from services.common.auth import read_client_key

    if key_file:
        return read_client_key(Path(key_file))
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV].strip()
    local = local_key_file()
    return read_client_key(local) if local.is_file() else None


def channel_credentials(ca_file: str | None = None, cert_file: str | None = None,
                        key_file: str | None = None) -> grpc.ChannelCredentials:
    """TLS to a gateway that terminates it (the system's roots unless `ca_file`); with a client
    certificate and key for mutual TLS."""
    def read(p: str | None) -> bytes | None:
        return Path(p).read_bytes() if p else None
    if bool(cert_file) != bool(key_file):   # gRPC would abort the process on half a pair
        raise ValueError("a client certificate and its key go together (--cert-file and --key-file)")
    return grpc.ssl_channel_credentials(root_certificates=read(ca_file), private_key=read(key_file),
                                        certificate_chain=read(cert_file))


@dataclass
class Reply:
    turn_id: str = ""
    text: str = ""
    pcm16: bytearray = field(default_factory=bytearray)
    sample_rate: int = 24000
    end: pb.EndOfTurn | None = None
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return len(self.pcm16) / 2 / self.sample_rate

    def wav(self) -> bytes:
        return wav_bytes(bytes(self.pcm16), self.sample_rate)


class Client:
    """api_key: sent as `authorization: Bearer <key>` on every call. credentials: TLS
    (channel_credentials) for a gateway that terminates it; None: plaintext (loopback, or
    inside the cluster)."""

    def __init__(self, address: str, timeout: float = 300.0, max_message_bytes: int = 64 * 1024 * 1024,
                 api_key: str | None = None, credentials: grpc.ChannelCredentials | None = None):
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self.channel = (grpc.secure_channel(address, credentials, options=options) if credentials is not None
                        else grpc.insecure_channel(address, options=options))
        self.stub = pb_grpc.ConversationServiceStub(self.channel)
        self.timeout = timeout
        self.metadata = APP_METADATA + ((("authorization", f"Bearer {api_key}"),) if api_key else ())

    def close(self) -> None:
        self.channel.close()

    def create_session(self, *, text_only: bool = False, voice: str | None = None,
                       low_latency: bool = False) -> str:
        settings = pb.SessionSettings(system_prompt=voice or "", low_latency_audio=low_latency,
                                      reply_mode=pb.REPLY_MODE_TEXT if text_only else pb.REPLY_MODE_SPOKEN)
        return self.stub.CreateSession(pb.CreateSessionRequest(settings=settings), metadata=self.metadata,
                                       timeout=30).session_id

    def delete_session(self, session_id: str) -> bool:
        return self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), metadata=self.metadata,
                                       timeout=30).deleted

    def _collect(self, events, on_text: Callable[[str], None] | None,
                 on_audio: Callable[[Reply], None] | None) -> Reply:
        reply = Reply()
        for ev in events:
            reply.turn_id = ev.turn_id
            kind = ev.WhichOneof("event")
            if kind == "text":
                reply.text += ev.text.text
                if on_text:
                    on_text(ev.text.text)
            elif kind == "audio":
                reply.pcm16.extend(ev.audio.pcm16)
                reply.sample_rate = ev.audio.sample_rate
                if on_audio:
                    on_audio(reply)
            elif kind == "timing":
                reply.marks[ev.timing.name] = ev.timing.ms_since_turn_start
            elif kind == "end":
                reply.end = ev.end
            elif kind == "error":
                raise RuntimeError(f"the turn failed: {ev.error.message}")
        return reply

    def converse(self, session_id: str, audio: bytes | None = None, text: str | None = None,
                 on_text=None, on_audio=None) -> Reply:
        """One turn; a stream that breaks mid-turn (a replica died) is resumed (`resume`)."""
        req = pb.ConverseRequest(session_id=session_id)
        if text is not None:
            req.text = text
        else:
            req.audio.file = audio
        return self._collect(self.turn_events(req), on_text, on_audio)

    def turn_events(self, req: pb.ConverseRequest):
        """The events of a Converse call; if the stream breaks after the turn began, the rest
        comes from `resume`, so every event arrives once."""
        turn_id = last = ""
        try:
            for ev in self.stub.Converse(req, metadata=self.metadata, timeout=self.timeout):
                turn_id, last = ev.turn_id, ev.event_id
                yield ev
        except grpc.RpcError as e:
            if not turn_id or e.code() not in RESUMABLE:
                raise
            yield from self.resume(req.session_id, turn_id, last)

    def resume(self, session_id: str, turn_id: str, after_event_id: str, within_s: float = 120.0):
        """The events of turn `turn_id` after `after_event_id`, calling Converse with
        resume_turn_id again while the stream breaks with UNAVAILABLE or Serve's INTERNAL for a
        dead replica (a replica restarting refuses calls for a while), for up to `within_s`."""
        deadline = time.monotonic() + within_s
        while True:
            try:
                req = pb.ConverseRequest(session_id=session_id, resume_turn_id=turn_id, after_event_id=after_event_id)
                for ev in self.stub.Converse(req, metadata=self.metadata, timeout=self.timeout):
                    after_event_id = ev.event_id
                    yield ev
                return
            except grpc.RpcError as e:
                if e.code() not in RESUMABLE or time.monotonic() > deadline:
                    raise
                time.sleep(RESUME_BACKOFF_S)

    def transcribe(self, audio: bytes) -> pb.TranscribeResponse:
        return self.stub.Transcribe(pb.TranscribeRequest(audio=pb.AudioInput(file=audio)),
                                    metadata=self.metadata, timeout=self.timeout)

    def synthesize(self, text: str, on_audio=None) -> Reply:
        return self._collect(self.stub.Synthesize(pb.SynthesizeRequest(text=text), metadata=self.metadata,
                                                  timeout=self.timeout), None, on_audio)


# A Converse stream that broke with these is resumed: UNAVAILABLE (a replica or Redis away),
# INTERNAL (what Serve's proxy says when the replica streaming the call dies).
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
RESUME_BACKOFF_S = 0.5

_RETRY_IN_TEXT = re.compile(r"retry after ([0-9.]+) s")


def retry_after(err: grpc.RpcError) -> float | None:
    """Seconds to wait before retrying a RESOURCE_EXHAUSTED call: the `retry-after` trailing
    metadata where the server could send it (unary calls), else the `retry after N s` that
    ends every quota message (streaming calls); None if the error says nothing."""
    for key, value in (err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else ():
        if key == "retry-after":
            return float(value)
    m = _RETRY_IN_TEXT.search(err.details() or "")
    return float(m.group(1)) if m else None


def audio_progress(reply: Reply) -> None:
    """A one-line progress indicator for streamed audio (on its own line, below the text)."""
    if not getattr(reply, "_progress_started", False):
        reply._progress_started = True  # type: ignore[attr-defined]
        sys.stderr.write("\n")
    sys.stderr.write(f"\r  audio: {reply.seconds:6.2f} s received")
    sys.stderr.flush()


def print_reply_summary(reply: Reply, wall_s: float) -> None:
    sys.stderr.write("\n")
    end = reply.end
    if "first_audio" in reply.marks:
        print(f"time to first audio: {reply.marks['first_audio']:.0f} ms")
    if "first_text" in reply.marks:
        print(f"time to first text:  {reply.marks['first_text']:.0f} ms")
    if end is not None and end.audio_seconds:
        print(f"reply audio: {end.audio_seconds:.2f} s, real-time factor {end.real_time_factor:.2f} "
              f"(turn wall time / audio time; below 1 is faster than real time)")
    print(f"turn finished in {wall_s:.2f} s ({end.reason if end else 'no end event'})")


def timed(fn, *a, **kw):
    t = time.monotonic()
    r = fn(*a, **kw)
    return r, time.monotonic() - t
