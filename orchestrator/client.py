"""A small client of the ConversationService, used by the CLI and the demo."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from baichuan_audio.v1 import conversation_pb2 as pb
from baichuan_audio.v1 import conversation_pb2_grpc as pb_grpc
from services.common.audio import wav_bytes

APP_METADATA = (("application", "conversation"),)


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
    def __init__(self, address: str, timeout: float = 300.0, max_message_bytes: int = 64 * 1024 * 1024):
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)])
        self.stub = pb_grpc.ConversationServiceStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def create_session(self, *, text_only: bool = False, voice: str | None = None,
                       low_latency: bool = False) -> str:
        settings = pb.SessionSettings(system_prompt=voice or "", low_latency_audio=low_latency,
                                      reply_mode=pb.REPLY_MODE_TEXT if text_only else pb.REPLY_MODE_SPOKEN)
        return self.stub.CreateSession(pb.CreateSessionRequest(settings=settings), metadata=APP_METADATA,
                                       timeout=30).session_id

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
        req = pb.ConverseRequest(session_id=session_id)
        if text is not None:
            req.text = text
        else:
            req.audio.file = audio
        return self._collect(self.stub.Converse(req, metadata=APP_METADATA, timeout=self.timeout), on_text, on_audio)

    def transcribe(self, audio: bytes) -> pb.TranscribeResponse:
        return self.stub.Transcribe(pb.TranscribeRequest(audio=pb.AudioInput(file=audio)),
                                    metadata=APP_METADATA, timeout=self.timeout)

    def synthesize(self, text: str, on_audio=None) -> Reply:
        return self._collect(self.stub.Synthesize(pb.SynthesizeRequest(text=text), metadata=APP_METADATA,
                                                  timeout=self.timeout), None, on_audio)


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
