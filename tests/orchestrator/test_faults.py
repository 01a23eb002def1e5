"""Faults, each on the real stack (Ray Serve, redis-server, gRPC, the tiny checkpoint): a replica
of every kind killed with SIGKILL in the middle of a turn, Redis stopped for 5 s, turns whose
producer died, racing turns, replicas drained by a redeploy. What a caller sees in each case is
README "Faults"; every test checks that each audio chunk reaches the caller exactly once, in
order, and prints how long the turn took to recover."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis

from baichuan_audio.v1 import conversation_pb2 as pb
from tests.orchestrator.test_service import (  # noqa: F401 - fixtures
    META, QUESTION, TIMEOUT, check_turn, converse, direct, long_reply, session, stub,
)

DEPLOYMENTS = {"tokenizer": "Tokenizer", "llm": "LLM", "decoder": "Decoder", "vocoder": "Vocoder",
               "conversation": "Conversation"}


def replica_pids(app: str) -> list[int]:
    """PIDs of the live replicas of `app` (Ray's actor table; the state API needs the dashboard)."""
    import ray._private.state as state

    cls = f"ServeReplica:{app}:{DEPLOYMENTS[app]}"
    return [a["Pid"] for a in state.actors().values() if a["State"] == "ALIVE" and a["ActorClassName"] == cls]


def kill(app: str) -> int:
    (pid,) = replica_pids(app)
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.fixture(scope="module")
def long_settings(direct):
    """Session settings whose typed "Hello" gets a reply seconds long (a sampling seed for which
    the tiny model speaks long, found with the engine here), so there is a middle to kill in."""
    seed, seconds = long_reply(direct, "Hello", {"audio_temperature": 2.0}, min_frames=60)
    return dict(sampling=pb.SamplingOverrides(audio_temperature=2.0, seed=seed)), seconds


class Turn:
    """A Converse call read on a thread: `events` as they come, `error` if the stream failed."""

    def __init__(self, stub, request: pb.ConverseRequest):
        self.events: list[pb.TurnEvent] = []
        self.error: grpc.RpcError | None = None
        self.times: list[float] = []
        self.first = threading.Event()
        self.audio = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(stub, request), daemon=True)
        self.thread.start()

    def _run(self, stub, request):
        try:
            for ev in stub.Converse(request, metadata=META, timeout=TIMEOUT):
                self.events.append(ev)
                self.times.append(time.monotonic())
                self.first.set()
                if ev.HasField("audio"):
                    self.audio.set()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.first.set()
            self.audio.set()

    def join(self) -> "Turn":
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the turn hangs"
        return self

    def ended(self) -> bool:
        return any(e.HasField("end") or e.HasField("error") for e in self.events)


def assert_audio_once(events: list[pb.TurnEvent]) -> bytes:
    """Every audio chunk once and in order: sequences 0..n-1, no chunk's PCM twice."""
    chunks = [e.audio for e in events if e.HasField("audio")]
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    assert len({c.pcm16 for c in chunks}) == len(chunks), "a chunk's audio came twice"
    ids = [e.event_id for e in events]
    assert len(set(ids)) == len(ids)
    return b"".join(c.pcm16 for c in chunks)


def kill_mid_turn(stub, long_settings, app: str, after_audio: bool = True):
    """A long spoken turn, `app`'s replica killed once the turn is under way (after its first
    audio chunk); returns (Turn, seconds from the kill to the next event, pid)."""
    settings, _ = long_settings
    sid = session(stub, **settings)
    turn = Turn(stub, pb.ConverseRequest(session_id=sid, text="Hello"))
    assert (turn.audio if after_audio else turn.first).wait(TIMEOUT)
    assert not turn.ended(), "the reply ended before the kill: it is too short to test a kill in it"
    n, pid, t_kill = len(turn.events), kill(app), time.monotonic()
    turn.join()
    return sid, turn, n, t_kill, pid


def after_kill(turn: Turn, n: int, t_kill: float, what) -> tuple[int, float]:
    """How many events matching `what` came after the kill (the first n came before), and how
    long after the kill the first of them came (nan: none)."""
    later = [t for ev, t in zip(turn.events[n:], turn.times[n:]) if what(ev)]
    return len(later), (later[0] - t_kill if later else float("nan"))


@pytest.mark.parametrize("app", ["decoder", "vocoder"])
def test_a_work_stream_replica_killed_mid_turn_loses_nothing(stub, long_settings, app):
    sid, turn, n, t_kill, pid = kill_mid_turn(stub, long_settings, app)
    assert turn.error is None, turn.error
    end, pcm = check_turn(turn.events)
    assert end.reason == "complete"
    assert_audio_once(turn.events)
    chunks, gap = after_kill(turn, n, t_kill, lambda ev: ev.HasField("audio"))
    assert chunks > 0, "no audio was left to do after the kill"
    print(f"\n{app} {pid} killed: {chunks} audio chunks after it, the first {gap:.1f} s after the kill; "
          f"the turn completed {turn.times[-1] - t_kill:.1f} s after the kill with {end.audio_seconds:.2f} s of audio")
    assert pid not in replica_pids(app)


class LeaseWatch:
    """When the turn's LLM lease (turn:{id}:lease:llm) is seen held, gone, and held again."""

    def __init__(self, url: str, turn: Turn):
        self.r = redis.Redis.from_url(url)
        self.turn = turn
        self.gone: float | None = None
        self.back: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        assert self.turn.first.wait(TIMEOUT)
        key = f"turn:{self.turn.events[0].turn_id}:lease:llm"
        while not self.stop.is_set() and self.back is None:
            held = bool(self.r.exists(key))
            if not held and self.gone is None:
                self.gone = time.monotonic()
            elif held and self.gone is not None:
                self.back = time.monotonic()
            time.sleep(0.02)


@pytest.mark.parametrize("low_latency", [False, True], ids=["faithful", "low_latency"])
def test_an_llm_replica_killed_mid_turn_is_continued_by_another(stub, serve_stack, long_settings, direct, low_latency):
    """Another LLM replica (the one Serve restarts) continues the reply after what the caller was
    sent: the turn completes without an error, every audio chunk once and in order, the
    session's history holds the whole reply (text, and a code row per audio frame heard before
    and after the kill), and the session takes the next turn. Low-latency audio: the first
    segment, cut into decode chunks, is likely killed half sent; its chunks continue."""
    settings, _ = long_settings
    sid = session(stub, low_latency_audio=low_latency, **settings)
    turn = Turn(stub, pb.ConverseRequest(session_id=sid, text="Hello"))
    watch = LeaseWatch(serve_stack.redis_url, turn)
    assert turn.audio.wait(TIMEOUT)
    assert not turn.ended(), "the reply ended before the kill: it is too short to test a kill in it"
    n, pid, t_kill = len(turn.events), kill("llm"), time.monotonic()
    turn.join()
    watch.stop.set()
    assert turn.error is None, turn.error
    assert not any(e.HasField("error") for e in turn.events), turn.events[-1]
    end, _ = check_turn(turn.events)
    assert end.reason == "complete"
    assert_audio_once(turn.events)
    assert watch.gone is not None and watch.back is not None, "no LLM replica took the turn over"
    chunks, gap = after_kill(turn, n, t_kill, lambda ev: ev.HasField("audio"))
    later = [ev for ev, t in zip(turn.events, turn.times) if t >= watch.back and (ev.HasField("audio") or ev.HasField("text"))]
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=META, timeout=30)
    assert [h.role for h in s.history] == ["user", "assistant"] and s.history[1].text == end.text
    assert s.history[1].audio_seconds == pytest.approx(end.audio_seconds, abs=1e-3)
    # the model history: one code row per frame of every audio segment, before and after the kill
    # (a segment cut at its frame cap leaves its last frame out, §11.2 e)
    cap = direct.engine.protocol_config.spoken_audio.max_new
    frames = [e.segment.audio_frames for e in turn.events
              if e.HasField("segment") and e.segment.kind == pb.SegmentBoundary.AUDIO_END]
    raw = redis.Redis.from_url(serve_stack.redis_url).hget(f"session:alice:{sid}", "codes")
    rows = len(raw) // (4 * direct.cfg.audio.num_codebooks)
    assert rows == sum(frames) - sum(f == cap for f in frames) and rows > 0
    t0 = time.monotonic()
    check_turn(converse(stub, sid, text="Hello"))
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=META, timeout=30)
    assert [h.role for h in s.history] == ["user", "assistant"] * 2
    print(f"\nllm {pid} killed ({'low-latency' if low_latency else 'faithful'} audio): its lease lapsed {watch.gone - t_kill:.1f} s later, another replica continued the "
          f"turn {watch.back - t_kill:.1f} s after the kill ({len(later)} text and audio events after that); {chunks} audio chunks after it (the first "
          f"{gap:.1f} s after the kill), the turn completed {turn.times[-1] - t_kill:.1f} s after the kill with "
          f"{end.audio_seconds:.2f} s of audio; the next turn took {time.monotonic() - t0:.1f} s")


def test_a_tokenizer_replica_killed_under_a_request_is_retried(stub):
    """Tokenizing has no side effects: the conversation replica sends it again, and the turn
    completes. The kill comes once the tokenizer's process is busy with the request."""
    import numpy as np
    import soundfile as sf
    import io

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    sf.write(buf, (rng.standard_normal(16000 * 60) * 0.1).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    (pid,) = replica_pids("tokenizer")

    def cpu() -> int:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])     # utime + stime, clock ticks

    sid = session(stub, reply_mode=pb.REPLY_MODE_TEXT)
    before = cpu()
    req = pb.ConverseRequest(session_id=sid)
    req.audio.file = buf.getvalue()
    turn = Turn(stub, req)
    while cpu() < before + 10 and not turn.first.is_set():     # 0.1 s of CPU: it is tokenizing
        time.sleep(0.01)
    assert not turn.first.is_set(), "the turn got an event before the tokenizer was killed"
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    turn.join()
    assert turn.error is None, turn.error
    end, _ = check_turn(turn.events, spoken=False)
    print(f"\ntokenizer {pid} killed under a request: the turn completed {time.monotonic() - t0:.1f} s later")
    assert pid not in replica_pids("tokenizer")


def test_a_conversation_replica_killed_mid_turn_resumes_without_loss(stub, serve_stack, long_settings):
    """The caller's stream breaks (Serve's proxy reports the dead replica); Converse with
    resume_turn_id and after_event_id on the restarted replica takes the turn over and sends the
    rest: together every event and chunk once, the turn recorded once in the history."""
    sid, turn, _, _, pid = kill_mid_turn(stub, long_settings, "conversation")
    assert turn.error is not None and not turn.ended()
    assert turn.error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), turn.error
    t0 = time.monotonic()
    got = turn.events
    # what orchestrator.client does for a stream that breaks: resume, again while the replica restarts
    from orchestrator.client import Client
    from tests.conftest import TEST_KEYS
    client = Client(serve_stack.address, timeout=TIMEOUT, api_key=TEST_KEYS["alice"])
    rest = list(client.resume(sid, got[-1].turn_id, got[-1].event_id))
    client.close()
    end, _ = check_turn(got + rest)
    assert end.reason == "complete"
    assert_audio_once(got + rest)
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=META, timeout=30)
    assert [h.role for h in s.history] == ["user", "assistant"] and s.history[1].text == end.text
    print(f"\nconversation {pid} killed: {len(got)} events before, {len(rest)} resumed; the rest came "
          f"{time.monotonic() - t0:.1f} s after the break")


def test_load_through_a_conversation_replica_kill_loses_no_turn(stub, serve_stack, long_settings):
    """`baichuan-audio load` while the conversation replica streaming its turns is killed: the
    broken streams are resumed (as orchestrator.client does) and calls that got no answer while
    the replica restarted are tried again, so every turn completes with every chunk once."""
    import asyncio

    from orchestrator.load import run_load
    from orchestrator.quotas import RUNNING_KEY
    from tests.conftest import TEST_KEYS

    settings, _ = long_settings
    r = redis.Redis.from_url(serve_stack.redis_url)
    out: dict = {}
    load = threading.Thread(daemon=True, target=lambda: out.update(report=asyncio.run(run_load(
        serve_stack.address, sessions=3, turns=1, api_key=TEST_KEYS["bob"], text="Hello",
        session_settings=settings, deadline_s=240, out=None))))
    load.start()
    deadline = time.monotonic() + 120            # until a turn is well under way
    while not any(r.xlen(f"turn:{t.decode()}:events") >= 3 for t in r.zrange(RUNNING_KEY, 0, -1)):
        assert time.monotonic() < deadline and load.is_alive(), \
            f"no turn got under way: {out['report'].summary() if 'report' in out else 'load still running'}"
        time.sleep(0.05)
    pid = kill("conversation")
    load.join(300)
    report = out["report"]
    print(f"\nconversation {pid} killed under load:\n{report.summary()}")
    assert report.error_count == 0 and report.problems == [], report.summary()
    assert report.turns == 3 and report.resumed >= 1, report.summary()


def test_resume_after_the_end_or_with_a_bad_event_id_answers_at_once(stub):
    sid = session(stub)
    events = converse(stub, sid, text="Hello")
    tid, last = events[-1].turn_id, events[-1].event_id
    ms, seq = last.split("-")
    for after in (last, f"{int(ms) + 10**6}-0"):       # at the end, and after it
        t0 = time.monotonic()
        rest = list(stub.Converse(pb.ConverseRequest(session_id=sid, resume_turn_id=tid, after_event_id=after),
                                  metadata=META, timeout=30))
        assert rest == []
        print(f"\nresume after {after}: answered in {time.monotonic() - t0:.2f} s")
    for bad in ("abc", "1-2-3", "99999999999999999999-0", "1-99999999999999999999", "-1-0"):
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Converse(pb.ConverseRequest(session_id=sid, resume_turn_id=tid, after_event_id=bad),
                               metadata=META, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "after_event_id" in e.value.details(), bad
    # from the middle: the rest, once
    rest = list(stub.Converse(pb.ConverseRequest(session_id=sid, resume_turn_id=tid,
                                                 after_event_id=events[1].event_id), metadata=META, timeout=30))
    check_turn(events[:2] + rest)


def test_a_turn_whose_producer_died_before_its_first_event(stub, serve_stack, long_settings):
    """A turn marked running whose producer is gone (no lease) and left nothing: the session
    takes the next turn at once, and a resume of it says UNAVAILABLE instead of waiting."""
    sid = session(stub)
    r = redis.Redis.from_url(serve_stack.redis_url)
    ghost = "0" * 31 + "1"
    r.hset(f"session:alice:{sid}", "active_turn", ghost)
    r.set(f"turn:{ghost}:session", f"alice:{sid}", ex=60)
    # set up (what Converse writes before asking the LLM), then its replica died
    r.set(f"turn:{ghost}:setup", json.dumps({"owner": "alice", "session_id": sid, "started": time.time(),
                                             "user": {"text": "Hello", "audio_seconds": 0.0}}), ex=60)
    t0 = time.monotonic()
    rest = list(stub.Converse(pb.ConverseRequest(session_id=sid, resume_turn_id=ghost), metadata=META, timeout=60))
    assert len(rest) == 1 and rest[0].HasField("error"), rest
    assert rest[0].error.code == grpc.StatusCode.UNAVAILABLE.value[0] and "again" in rest[0].error.message
    print(f"\nresume of a dead turn: UNAVAILABLE after {time.monotonic() - t0:.1f} s")
    check_turn(converse(stub, sid, text="Hello"))


def redis_pid(url: str) -> int:
    return int(redis.Redis.from_url(url).info("server")["process_id"])


def test_redis_stopped_for_5_s_fails_calls_fast_and_recovers(stub, serve_stack, long_settings):
    """SIGSTOP the redis-server for 5 s (it answers nothing; connections hang rather than fail):
    calls end with UNAVAILABLE while it is stopped (the first within redis.socket_timeout_s, the
    next at once), the health check says NOT_SERVING, a turn running meanwhile ends (completed,
    or UNAVAILABLE) with every chunk once, and afterwards the sessions take turns with nothing
    restarted."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from orchestrator.client import Client
    from tests.conftest import TEST_KEYS

    sid = session(stub)
    check_turn(converse(stub, sid, text="Hello"))
    long_sid = session(stub, **long_settings[0])
    running = Turn(stub, pb.ConverseRequest(session_id=long_sid, text="Hello"))
    assert running.audio.wait(TIMEOUT) and not running.ended()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(serve_stack.address))
    pid = redis_pid(serve_stack.redis_url)
    results: dict[str, object] = {}

    def call(name, fn):
        t0 = time.monotonic()
        try:
            results[name] = fn()
        except grpc.RpcError as e:
            results[name] = e
        results[name + " s"] = time.monotonic() - t0

    os.kill(pid, signal.SIGSTOP)
    try:
        t_stop = time.monotonic()
        calls = {
            "create": lambda: stub.CreateSession(pb.CreateSessionRequest(), metadata=META, timeout=30),
            "converse": lambda: list(stub.Converse(pb.ConverseRequest(session_id=sid, text="Hello"),
                                                   metadata=META, timeout=30)),
            "health": lambda: health.Check(health_pb2.HealthCheckRequest(), metadata=(("application", "conversation"),),
                                           timeout=30),
        }
        threads = [threading.Thread(target=call, args=kv) for kv in calls.items()]
        for t in threads:
            t.start()
        for t in threads:                    # Redis stays stopped 5 s whatever the calls do
            t.join(max(0.0, 5.0 - (time.monotonic() - t_stop)))
        time.sleep(max(0.0, 5.0 - (time.monotonic() - t_stop)))
    finally:
        os.kill(pid, signal.SIGCONT)
    t_back = time.monotonic()
    for t in threads:
        t.join(30)
    print("\nwhile Redis was stopped:", {k: (v if isinstance(v, float) else getattr(v, "code", lambda: v)())
                                         for k, v in results.items()})
    for name in ("create", "converse"):
        assert isinstance(results[name], grpc.RpcError), (name, results[name])
        assert results[name].code() == grpc.StatusCode.UNAVAILABLE, (name, results[name])
        assert "Redis" in results[name].details()
        assert results[name + " s"] < 5.0, f"{name} waited for Redis to come back instead of failing"
    assert results["health"].status == health_pb2.HealthCheckResponse.NOT_SERVING
    # recovered by itself: the same session, a new turn (once the failed one's lease lapsed)
    turn_succeeds(stub, sid, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
    print(f"a turn succeeded {time.monotonic() - t_back:.1f} s after Redis came back")
    # the turn that ran meanwhile: its stream ended (resumed if it broke), every chunk once
    running.join()
    events = running.events
    if running.error is not None:
        assert running.error.code() == grpc.StatusCode.UNAVAILABLE, running.error
        client = Client(serve_stack.address, timeout=TIMEOUT, api_key=TEST_KEYS["alice"])
        events = events + list(client.resume(long_sid, events[-1].turn_id, events[-1].event_id))
        client.close()
    assert_audio_once(events)
    last = events[-1]
    if last.HasField("error"):
        assert last.error.code == grpc.StatusCode.UNAVAILABLE.value[0], last
    else:
        check_turn(events)
    print("the turn running during the outage:", "broke and was resumed," if running.error else "streamed on,",
          "ended with", last.error.message if last.HasField("error") else last.end.reason)
    turn_succeeds(stub, long_sid, grpc.StatusCode.RESOURCE_EXHAUSTED)


def turn_succeeds(stub, sid: str, *meanwhile: grpc.StatusCode, within_s: float = 60.0) -> None:
    """A typed turn on `sid` completes within `within_s`; until then only `meanwhile` refusals."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            check_turn(converse(stub, sid, text="Hello"))
            return
        except grpc.RpcError as e:
            assert e.code() in meanwhile and time.monotonic() < deadline, e
            time.sleep(0.5)


def test_racing_turns_on_one_session_one_wins(stub):
    sid = session(stub, reply_mode=pb.REPLY_MODE_TEXT)

    def one(_):
        try:
            return converse(stub, sid, text="Hello")
        except grpc.RpcError as e:
            return e

    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(one, range(4)))
    won = [o for o in out if not isinstance(o, grpc.RpcError)]
    lost = [o for o in out if isinstance(o, grpc.RpcError)]
    assert all(o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "running turn" in o.details() for o in lost), lost
    assert len(won) >= 1
    for w in won:
        check_turn(w, spoken=False)
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=META, timeout=30)
    assert s.turns == len(won) and len(s.history) == 2 * len(won)


def redeploy(serve_stack, app: str) -> None:
    """Deploy `app` again with a changed actor option: Serve starts a new replica and stops the
    old one gracefully (as a rolling upgrade or a scale-down does)."""
    from ray import serve

    from orchestrator.app import APPS, deployment_options
    from services.common.settings import Settings

    spec = APPS[app]
    settings = Settings.load(str(serve_stack.settings_path))
    opts = deployment_options(getattr(settings.stages, spec.stage), spec, settings.autoscaling)
    opts["ray_actor_options"]["num_cpus"] += 0.01
    deployment = {"llm": "services.llm.deployment:LLMDeployment",
                  "decoder": "services.decoder.deployment:DecoderDeployment"}[app]
    module, cls = deployment.split(":")
    import importlib
    target = getattr(importlib.import_module(module), cls)
    serve.run(target.options(**opts).bind(str(serve_stack.settings_path)), name=app, route_prefix=f"/{app}")


@pytest.mark.parametrize("app", ["llm", "decoder"])
def test_a_replica_drained_by_a_redeploy_finishes_its_turn(stub, serve_stack, long_settings, app):
    """Serve stops the old replica gracefully: the LLM lets its running turns end before its
    engine stops; a decoder's worker finishes the jobs it holds and hands back the rest. The
    turn completes with every chunk once."""
    settings, _ = long_settings
    sid = session(stub, **settings)
    (old,) = replica_pids(app)
    turn = Turn(stub, pb.ConverseRequest(session_id=sid, text="Hello"))
    assert turn.audio.wait(TIMEOUT)
    assert not turn.ended(), "the reply ended before the redeploy"
    t0 = time.monotonic()
    redeploying = threading.Thread(target=redeploy, args=(serve_stack, app))
    redeploying.start()
    turn.join()
    redeploying.join(TIMEOUT)
    assert turn.error is None, turn.error
    end, _ = check_turn(turn.events)
    assert end.reason == "complete"
    assert_audio_once(turn.events)
    deadline = time.monotonic() + 60
    while old in replica_pids(app) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert old not in replica_pids(app), "the old replica was not stopped"
    print(f"\n{app} redeployed mid-turn: the turn completed {time.monotonic() - t0:.1f} s later")
