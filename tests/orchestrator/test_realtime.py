"""The Realtime API (/v1/realtime) through the real stack, driven by clients nobody here wrote:
the official `openai` SDK's realtime client and a plain `websockets` client. One Serve stack
(the session's), the tiny checkpoint, the bundled spoken question."""
from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
import websockets

from baichuan_audio.v1 import conversation_pb2 as pb
from baichuan_audio.v1 import conversation_pb2_grpc as pb_grpc
from tests.conftest import TEST_KEYS, metadata
from tests.orchestrator.test_service import direct, long_reply  # noqa: F401 - the fixture

QUESTION = Path(__file__).resolve().parents[2] / "orchestrator" / "samples" / "question.wav"
RATE = 24000
TIMEOUT = 180
KEY = TEST_KEYS["alice"]


@pytest.fixture(scope="module")
def realtime(serve_stack):
    for app in ("tokenizer", "llm", "decoder", "vocoder", "conversation", "realtime"):
        serve_stack.deploy(app)
    return serve_stack


@pytest.fixture(scope="module")
def stub(realtime):
    channel = grpc.insecure_channel(realtime.address)
    yield pb_grpc.ConversationServiceStub(channel)
    channel.close()


def question_pcm(rate: int = RATE) -> bytes:
    """The spoken sample as mono PCM16 at `rate`."""
    x, sr = sf.read(QUESTION, dtype="float32")
    y = AF.resample(torch.from_numpy(x), sr, rate).numpy() if sr != rate else x
    return (np.clip(y, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def until(conn, kind: str, timeout: float = TIMEOUT) -> list:
    """The events up to and including the first of type `kind` (objects or dicts)."""
    out = []
    async with asyncio.timeout(timeout):
        while True:
            ev = await conn.recv()
            ev = json.loads(ev) if isinstance(ev, (str, bytes)) else ev
            out.append(ev)
            if (ev["type"] if isinstance(ev, dict) else ev.type) == kind:
                return out


def openai_client(http: str):
    from openai import AsyncOpenAI

    return AsyncOpenAI(api_key=KEY, base_url=f"http://{http}/v1", websocket_base_url=f"ws://{http}/v1")


def test_openai_sdk_spoken_typed_truncate(realtime, stub):
    """The official SDK: a spoken turn from the sample (client commits), a typed turn, then the
    reply truncated: the history keeps the heard part only."""
    async def main():
        client = openai_client(realtime.http)
        async with client.realtime.connect(model="baichuan-audio") as conn:
            created = await conn.recv()
            assert created.type == "session.created"
            sid = created.session.id
            await conn.session.update(session={"type": "realtime", "instructions": "",
                                               "audio": {"input": {"turn_detection": None}}})
            assert (await conn.recv()).type == "session.updated"
            pcm = question_pcm()
            for i in range(0, len(pcm), 9600):                  # 200 ms appends, as a microphone sends
                await conn.input_audio_buffer.append(audio=b64(pcm[i:i + 9600]))
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            spoken = await until(conn, "response.done")
            types = [e.type for e in spoken]
            assert "input_audio_buffer.committed" in types and "response.created" in types
            done = spoken[-1].response
            assert done.status == "completed", done.status_details
            audio = b"".join(base64.b64decode(e.delta) for e in spoken if e.type == "response.output_audio.delta")
            transcript = "".join(e.delta for e in spoken if e.type == "response.output_audio_transcript.delta")
            assert audio and len(audio) % 2 == 0
            assert done.output[0].content[0].transcript == transcript
            limits = await until(conn, "rate_limits.updated")
            assert {r.name for r in limits[-1].rate_limits} == {"requests", "audio_seconds"}

            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Hello"}]})
            await conn.response.create()
            typed = await until(conn, "response.done")
            assert typed[-1].response.status == "completed"
            item_id = typed[-1].response.output[0].id
            reply = b"".join(base64.b64decode(e.delta) for e in typed if e.type == "response.output_audio.delta")
            await until(conn, "rate_limits.updated")
            heard_ms = int(len(reply) / 2 / RATE * 1000) // 2
            await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=heard_ms)
            truncated = (await until(conn, "conversation.item.truncated"))[-1]
            assert truncated.item_id == item_id and truncated.audio_end_ms == heard_ms
            return sid, len(reply) / 2 / RATE, heard_ms

    sid, reply_s, heard_ms = asyncio.run(main())
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=metadata("alice"), timeout=30)
    assert [h.role for h in s.history] == ["user", "assistant"] * 2
    # the truncated reply keeps the audio heard, to a frame (80 ms), not the whole reply
    assert abs(s.history[-1].audio_seconds - heard_ms / 1000) < 0.08 + 1e-6, (s.history[-1].audio_seconds, heard_ms)
    assert s.history[-1].audio_seconds < reply_s


def test_openai_sdk_cancel_and_reconnect(realtime, stub, direct):  # noqa: F811
    """A session made over gRPC (sampled so the tiny model speaks long) resumed over the
    Realtime API (?session_id=), its response cancelled after the first audio (response.done
    says cancelled, before the whole reply), then truncated to half of what was played: the
    history marks it interrupted and keeps only that."""
    seed, full_s = long_reply(direct, "Hello", {"audio_temperature": 2.0})
    sid = stub.CreateSession(pb.CreateSessionRequest(settings=pb.SessionSettings(
        sampling=pb.SamplingOverrides(audio_temperature=2.0, seed=seed))), metadata=metadata("alice"),
        timeout=30).session_id

    async def main():
        client = openai_client(realtime.http)
        async with client.realtime.connect(model="baichuan-audio", extra_query={"session_id": sid}) as conn:
            created = await conn.recv()
            assert created.session.id == sid
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Hello"}]})
            await conn.response.create()
            events = await until(conn, "response.output_audio.delta")
            await conn.response.cancel()
            events += await until(conn, "response.done")
            done = events[-1].response
            assert done.status == "cancelled"
            played = sum(len(base64.b64decode(e.delta)) for e in events if e.type == "response.output_audio.delta")
            assert 0 < played / 2 / RATE < full_s
            heard_ms = int(played / 2 / RATE * 1000) // 2
            await conn.conversation.item.truncate(item_id=done.output[0].id, content_index=0, audio_end_ms=heard_ms)
            assert (await until(conn, "conversation.item.truncated"))[-1].audio_end_ms == heard_ms
            return heard_ms

    heard_ms = asyncio.run(main())
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=metadata("alice"), timeout=30)
    assert s.history[-1].interrupted
    assert abs(s.history[-1].audio_seconds - heard_ms / 1000) < 1e-3


async def _ws(http: str, *, key: str | None = KEY, subprotocols=None, query: str = ""):
    headers = {"Authorization": f"Bearer {key}"} if key and not subprotocols else {}
    return await websockets.connect(f"ws://{http}/v1/realtime{query}", additional_headers=headers,
                                    subprotocols=subprotocols, max_size=None)


def test_protocol_errors_keep_the_connection(realtime):
    """Malformed, unknown and out-of-order events each get an `error` event naming the problem;
    the connection stays and serves the next event."""
    async def main():
        ws = await _ws(realtime.http)
        assert json.loads(await ws.recv())["type"] == "session.created"
        cases = [
            ("{not json", "invalid_json"),
            (json.dumps([1, 2]), "invalid_event"),
            (json.dumps({"type": "no.such.event"}), "unknown_event"),
            (json.dumps({"type": "input_audio_buffer.commit", "event_id": "c1"}), "input_audio_buffer_commit_empty"),
            (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
            (json.dumps({"type": "response.create"}), "response_no_input"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}), "invalid_audio"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": b64(b"\x00")}), "invalid_audio"),
            (json.dumps({"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": 5}),
             "item_truncate_invalid_item_id"),
            (json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}),
             "unsupported_audio_format"),
            (json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection":
                                                                                     {"type": "semantic_vad"}}}}}),
             "unsupported_turn_detection"),
            (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "system",
                                                                        "content": [{"type": "input_text", "text": "x"}]}}),
             "invalid_event"),
        ]
        for raw, code in cases:
            await ws.send(raw)
            ev = json.loads(await ws.recv())
            assert ev["type"] == "error" and ev["error"]["code"] == code, (raw, ev)
            assert ev["error"]["message"]
        # the commit's client event id comes back
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c2"}))
        assert json.loads(await ws.recv())["error"]["event_id"] == "c2"
        # still serving: an 8 kHz input (resampled to 24 kHz), committed by the client
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 8000}, "turn_detection": None}}}}))
        upd = json.loads(await ws.recv())
        assert upd["type"] == "session.updated" and upd["session"]["audio"]["input"]["format"]["rate"] == 8000
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(question_pcm(8000))}))
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert json.loads(await ws.recv())["type"] == "input_audio_buffer.cleared"
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        assert json.loads(await ws.recv())["error"]["code"] == "input_audio_buffer_commit_empty"
        await ws.close()

    asyncio.run(main())


def test_auth_as_the_grpc_api(realtime):
    """No key or a wrong key: an error event and a close with a reason (1008); the browser's
    subprotocol key works and the 'realtime' subprotocol is accepted."""
    async def main():
        for key in (None, "not-a-key-0123456789abcdef"):
            ws = await _ws(realtime.http, key=key)
            ev = json.loads(await ws.recv())
            assert ev["type"] == "error" and ev["error"]["code"] == "unauthenticated"
            assert "API key" in ev["error"]["message"]
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1008 and closed.value.rcvd.reason
        ws = await _ws(realtime.http, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"])
        assert ws.subprotocol == "realtime"
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.close()
        # another identity cannot resume alice's session: a new one of that id is its own
        ws = await _ws(realtime.http, key=TEST_KEYS["bob"], query="?session_id=bad/id")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 1008 and "session_id" in closed.value.rcvd.reason

    asyncio.run(main())
