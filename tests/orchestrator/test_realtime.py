"""The Realtime API (/v1/realtime) and its voice page (/) through the real stack, driven by
clients nobody here wrote: the official `openai` SDK's realtime client, a plain `websockets`
client, and Debian's chromium (headless, driven by Playwright, a fake microphone playing the
bundled spoken sample). One Serve stack (the session's), the tiny checkpoint. A screenshot of the
page after a turn is kept under pytest's temporary folder (the path is printed)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import wave
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
from tests.orchestrator.test_service import LONG_REPLIES, direct, long_reply  # noqa: F401 - the fixture

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


@pytest.fixture(scope="module")
def long_session(stub, request):
    """A new gRPC session whose typed "Hello" gets a long spoken reply from the tiny model (a
    sampling seed found with the engine, test_service's, once per test session), and that
    reply's length in seconds."""
    sampling = {"audio_temperature": 2.0}
    key = ("Hello", tuple(sorted(sampling.items())), 40)
    seed, full_s = LONG_REPLIES.get(key) or long_reply(request.getfixturevalue("direct"), "Hello", sampling)

    def make() -> str:
        return stub.CreateSession(pb.CreateSessionRequest(settings=pb.SessionSettings(
            sampling=pb.SamplingOverrides(audio_temperature=2.0, seed=seed))), metadata=metadata("alice"),
            timeout=30).session_id
    return make, full_s


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
            t0 = time.perf_counter()
            await conn.response.create()
            spoken = await until(conn, "response.output_audio.delta")
            first_audio_ms = (time.perf_counter() - t0) * 1000
            spoken += await until(conn, "response.done")
            print(f"realtime spoken turn: time to first audio {first_audio_ms:.0f} ms after response.create "
                  "(tiny model; the client's view through the WebSocket)")
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


def test_openai_sdk_cancel_and_reconnect(realtime, stub, long_session):
    """A session made over gRPC (sampled so the tiny model speaks long) resumed over the
    Realtime API (?session_id=), its response cancelled after the first audio (response.done
    says cancelled, before the whole reply), then truncated to half of what was played: the
    history marks it interrupted and keeps only that."""
    make, full_s = long_session
    sid = make()

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


def speech_with_silence(before_s: float = 0.5, after_s: float = 1.0) -> bytes:
    silence = lambda s: b"\0\0" * int(s * RATE)  # noqa: E731
    return silence(before_s) + question_pcm() + silence(after_s)


async def append_all(ws, pcm: bytes, piece_s: float = 0.1) -> None:
    n = int(piece_s * RATE) * 2
    for i in range(0, len(pcm), n):
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(pcm[i:i + n])}))


def test_server_vad_turn(realtime):
    """server_vad (the default): the spoken sample between silences is detected, committed and
    answered without any client commit or response.create."""
    async def main():
        ws = await _ws(realtime.http)
        created = json.loads(await ws.recv())
        assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
            "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 200, "silence_duration_ms": 600}}}}}))
        await until(ws, "session.updated")
        await append_all(ws, speech_with_silence())
        events = await until(ws, "response.done")
        kinds = [e["type"] for e in events]
        for k in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                  "input_audio_buffer.committed", "response.created"):
            assert k in kinds, kinds
        started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
        stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
        speech_ms = len(question_pcm()) / 2 / RATE * 1000
        assert 500 <= started["audio_start_ms"] < 500 + speech_ms
        assert started["audio_start_ms"] + 600 <= stopped["audio_end_ms"] <= 500 + speech_ms + 1000
        assert stopped["item_id"] == started["item_id"] == next(
            e for e in events if e["type"] == "input_audio_buffer.committed")["item_id"]
        assert events[-1]["response"]["status"] == "completed"
        await ws.close()

    asyncio.run(main())


def test_barge_in_cancels_the_reply(realtime, stub, long_session):
    """Speech while a long reply plays cancels it (server_vad's interrupt_response): the reply
    ends cancelled, and after the client's truncate the history keeps what it played."""
    make, full_s = long_session
    sid = make()

    async def main():
        ws = await _ws(realtime.http, query=f"?session_id={sid}")
        await until(ws, "session.created")
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
            "type": "server_vad", "silence_duration_ms": 400, "create_response": False}}}}}))
        await until(ws, "session.updated")
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}}))
        await ws.send(json.dumps({"type": "response.create"}))
        events = await until(ws, "response.output_audio.delta")
        await append_all(ws, speech_with_silence(0.2, 0.0))      # the user speaks over the reply
        events += await until(ws, "response.done")
        kinds = [e["type"] for e in events]
        assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.done")
        done = events[-1]["response"]
        assert done["status"] == "cancelled"
        played = sum(len(base64.b64decode(e["delta"])) for e in events if e["type"] == "response.output_audio.delta")
        assert played / 2 / RATE < full_s
        await ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": done["output"][0]["id"],
                                  "content_index": 0, "audio_end_ms": int(played / 2 / RATE * 1000)}))
        await until(ws, "conversation.item.truncated")
        await ws.close()
        return played / 2 / RATE

    played_s = asyncio.run(main())
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=metadata("alice"), timeout=30)
    assert s.history[-1].interrupted and abs(s.history[-1].audio_seconds - played_s) < 1e-3


# ---------------------------------------------------------------- the voice page in chromium

CHROMIUM = "/usr/bin/chromium"       # Debian's package (make system-deps); Playwright downloads nothing
WAIT_MS = 180_000


@pytest.fixture(scope="module")
def mic_file(tmp_path_factory):
    """The spoken sample then 1 s of silence, as the fake microphone's WAV (chromium loops it)."""
    path = tmp_path_factory.mktemp("mic") / "question.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(question_pcm() + b"\0\0" * RATE)
    return path


@pytest.fixture(scope="module")
def browser(mic_file):
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: run `make system-deps` as root (Debian's chromium package)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic_file}", "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


def open_page(browser, realtime, query: str = ""):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://{realtime.http}/{query}")
    page.fill("#key", KEY)
    page.click("#connect")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=60_000)
    return page, errors


def test_press_to_talk_turn_streams_text_and_plays(browser, realtime, tmp_path):
    page, errors = open_page(browser, realtime)
    page.hover("#talk")
    page.mouse.down()
    page.wait_for_timeout(len(question_pcm()) / 2 / RATE * 1000 + 300)      # hold while the sample plays
    page.mouse.up()
    page.wait_for_function("window.voice.reply && window.voice.reply.done", timeout=WAIT_MS)
    page.wait_for_function("window.voice.reply.firstPlayAt > 0", timeout=30_000)        # playback started
    reply = page.evaluate("window.voice.reply.text")
    assert reply and page.locator(".turn .text").last.inner_text() == reply
    assert page.locator(".ttfa").count() == 1 and "first audio" in page.locator(".ttfa").inner_text()
    print(f"voice page, press to talk: {page.locator('.ttfa').inner_text()} after the button's release")
    shot = tmp_path / "voice-page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot of the voice page after a turn: {shot}")
    assert shot.stat().st_size > 0 and not errors, errors
    page.close()


def test_speaking_over_the_reply_stops_it(browser, realtime, long_session):
    """A typed turn with a long reply; while it plays, hands-free mode opens the (fake)
    microphone: the server hears speech, the page stops playback and the reply is cancelled."""
    make, full_s = long_session
    page, errors = open_page(browser, realtime, f"?session_id={make()}")
    page.fill("#typed", "Hello")
    page.press("#typed", "Enter")
    page.wait_for_function("window.voice.playing === true", timeout=WAIT_MS)
    page.check("input[value=vad]")
    page.wait_for_function("window.voice.reply.done && window.voice.reply.cancelled && !window.voice.playing",
                           timeout=60_000)
    assert page.locator("#status").get_attribute("data-playing") == "false"
    assert page.locator("#status").inner_text().startswith("interrupted")
    played_s = page.evaluate("window.voice.reply.playedSamples") / RATE
    assert 0 < played_s < full_s
    assert not errors, errors
    page.close()
