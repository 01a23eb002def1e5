"""`baichuan-audio load`: a bounded load generator for a running stack.

N sessions at once, each T turns (or, with a duration, new sessions of T turns until the time
is up), over grpc.aio on one channel. Every turn's events are checked as a client would rely on
them: one turn id, event ids unique and increasing, audio `sequence` 0, 1, 2, ... without a gap
or a repeat, exactly one end (or error) and nothing after it, and as much audio as the end says.
A refusal (RESOURCE_EXHAUSTED: admission control or a quota) is not an error: the session
waits the time the server names, with exponential backoff and jitter, and tries again, as a
well-behaved client does; the refusals are counted. It prints a progress line every few seconds and, at the end, time to first audio
and first text (client side, from sending the request), the real-time factor, refusals and
errors by status code. It stops by itself (`--deadline-s`), talks to loopback addresses only
unless told otherwise (it is load, not a probe of someone else's server), and with `--rss`
reports the resident memory of every Ray actor process (the Serve replicas, proxy and
controller) and of redis-server at the start and the end (a soak's memory check)."""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import random
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from baichuan_audio.v1 import conversation_pb2 as pb
from baichuan_audio.v1 import conversation_pb2_grpc as pb_grpc
from orchestrator.client import RESUMABLE, RESUME_BACKOFF_S
from services.common.errors import Status

SAMPLE = Path(__file__).resolve().parent / "samples" / "question.wav"
REFUSED = grpc.StatusCode.RESOURCE_EXHAUSTED
MAX_BACKOFF = 8      # a refused call waits the server's retry delay x 1, 2, 4, 8, 8, ...
RESUME_WITHIN_S = 120.0   # how long a broken turn is resumed while its replica comes back


def _event_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def check_turn(events: list[pb.TurnEvent], *, spoken: bool) -> list[str]:
    """What is wrong with one turn's event stream as the caller got it (empty: nothing).
    Lost or duplicated audio shows as a gap or repeat in `sequence`, or as audio whose length
    differs from what the end reports."""
    problems: list[str] = []
    if not events:
        return ["no events"]
    if len({e.turn_id for e in events}) != 1 or not events[0].turn_id:
        problems.append(f"turn ids {sorted({e.turn_id for e in events})}")
    ids = [e.event_id for e in events]
    try:
        keys = [_event_key(i) for i in ids]
        if any(b <= a for a, b in zip(keys, keys[1:])):
            problems.append("event ids not strictly increasing (a duplicated or reordered event)")
    except ValueError:
        problems.append(f"malformed event ids {ids[:3]}...")
    ends = [i for i, e in enumerate(events) if e.HasField("end") or e.HasField("error")]
    if len(ends) != 1:
        problems.append(f"{len(ends)} ends (end or error events) instead of 1")
    elif ends[0] != len(events) - 1:
        problems.append(f"{len(events) - 1 - ends[0]} events after the end")
    audio = [e.audio for e in events if e.HasField("audio")]
    seqs = [a.sequence for a in audio]
    if seqs != list(range(len(seqs))):
        missing = sorted(set(range(max(seqs, default=-1) + 1)) - set(seqs))
        dup = sorted(s for s, n in Counter(seqs).items() if n > 1)
        problems.append(f"audio sequence not 0..{len(seqs) - 1}: missing {missing[:5]}, repeated {dup[:5]}")
    last = events[-1]
    if last.HasField("end"):
        if spoken and last.end.reason == "complete" and not audio:
            problems.append("a spoken reply without audio")
        if audio:
            rate = audio[0].sample_rate
            samples = sum(len(a.pcm16) for a in audio) // 2
            if abs(samples - last.end.audio_seconds * rate) > 1:
                problems.append(f"{samples} audio samples received, the end says {last.end.audio_seconds * rate:.0f}")
    return problems


@dataclass
class LoadReport:
    sessions: int = 0
    turns: int = 0                     # turns that ended (end event) and passed check_turn
    refused: Counter = field(default_factory=Counter)       # call -> RESOURCE_EXHAUSTED answers
    errors: Counter = field(default_factory=Counter)        # status code name -> count
    problems: list[str] = field(default_factory=list)       # check_turn findings (lost/duplicated)
    details: list[str] = field(default_factory=list)        # the first errors' messages
    first_audio_s: list[float] = field(default_factory=list)
    first_text_s: list[float] = field(default_factory=list)
    rtf: list[float] = field(default_factory=list)
    audio_s: float = 0.0
    chunks: int = 0
    wall_s: float = 0.0
    running: int = 0                   # sessions working now (progress)
    resumed: int = 0                   # turns whose stream broke and was resumed
    retried: Counter = field(default_factory=Counter)       # "call STATUS" -> tries again after no answer
    timed_out: bool = False

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> str:
        def pct(xs: list[float], p: float) -> str:
            if not xs:
                return "-"
            s = sorted(xs)
            return f"{s[min(len(s) - 1, math.ceil(p * len(s)) - 1)]:.3f}"
        lines = [
            f"sessions {self.sessions}, turns completed {self.turns} in {self.wall_s:.1f} s"
            f"{' (stopped at the deadline)' if self.timed_out else ''}",
            f"time to first audio  p50 {pct(self.first_audio_s, .5)} s  p95 {pct(self.first_audio_s, .95)} s  "
            f"(n={len(self.first_audio_s)})",
            f"time to first text   p50 {pct(self.first_text_s, .5)} s  p95 {pct(self.first_text_s, .95)} s  "
            f"(n={len(self.first_text_s)})",
            f"real-time factor     p50 {pct(self.rtf, .5)}  p95 {pct(self.rtf, .95)}  "
            f"({self.chunks} audio chunks, {self.audio_s:.1f} s of audio)",
            f"refused (RESOURCE_EXHAUSTED, retried): {dict(self.refused) or 0}",
            f"streams broken mid-turn and resumed: {self.resumed}; calls tried again after "
            f"{'/'.join(c.name for c in RESUMABLE)}: {dict(self.retried) or 0}",
            f"errors by status: {dict(self.errors) or 0}",
        ]
        lines += [f"  {d}" for d in self.details]
        lines += [
            f"lost/duplicated/malformed turn streams: {len(self.problems)}",
        ]
        lines += [f"  {p}" for p in self.problems[:10]]
        return "\n".join(lines)


def retry_after_s(err: grpc.aio.AioRpcError, default: float = 1.0) -> float:
    from orchestrator.client import retry_after
    wait = retry_after(err)
    return default if wait is None else wait


class LoadGenerator:
    def __init__(self, stub, metadata, *, audio: bytes | None, text: str | None, spoken: bool = True,
                 low_latency: bool = False, max_refusals: int = 100, turn_timeout_s: float = 300.0,
                 session_settings: dict | None = None):
        self.stub, self.metadata = stub, metadata
        self.session_settings = session_settings or {}     # more SessionSettings fields (sampling, ...)
        self.audio, self.text, self.spoken, self.low_latency = audio, text, spoken, low_latency
        self.max_refusals = max_refusals
        self.turn_timeout_s = turn_timeout_s
        self.report = LoadReport()

    async def _refusable(self, what: str, call):
        """call() until it is not refused (at most max_refusals times); None if it never was.
        A call that fails before any answer with a resumable status (a replica died or is
        restarting) is tried again too, for up to RESUME_WITHIN_S, as a client should."""
        attempt, away_since = 0, None
        while attempt <= self.max_refusals:
            try:
                return await call()
            except grpc.aio.AioRpcError as e:
                if e.code() in RESUMABLE:
                    away_since = away_since or time.monotonic()
                    if time.monotonic() - away_since > RESUME_WITHIN_S:
                        raise
                    self.report.retried[f"{what} {e.code().name}"] += 1
                    await asyncio.sleep(RESUME_BACKOFF_S * random.uniform(1.0, 2.0))
                    continue
                if e.code() != REFUSED:
                    raise
                self.report.refused[what] += 1
                # the server's wait, doubled for each refusal in a row up to 8x (every refusal
                # costs the stack a request) and spread out so the refused do not return at once
                backoff = retry_after_s(e) * min(2 ** attempt, MAX_BACKOFF)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                attempt += 1
        self.report.errors["RESOURCE_EXHAUSTED (refused every retry)"] += 1
        return None

    async def _turn(self, sid: str) -> None:
        req = pb.ConverseRequest(session_id=sid)
        if self.text is not None:
            req.text = self.text
        else:
            req.audio.file = self.audio
        r = self.report

        async def one():
            events: list[pb.TurnEvent] = []
            t0 = time.perf_counter()
            marks: dict[str, float] = {}
            call = self.stub.Converse(req, metadata=self.metadata, timeout=self.turn_timeout_s)
            try:
                async for ev in call:
                    kind = ev.WhichOneof("event")
                    if kind in ("audio", "text") and kind not in marks:
                        marks[kind] = time.perf_counter() - t0
                    events.append(ev)
            except grpc.aio.AioRpcError as e:
                if not events:
                    raise
                if e.code() not in RESUMABLE:     # a failure mid-turn (a refusal too) is an error
                    return events, marks, e
                # the replica streaming the turn died: resume as a client does (orchestrator.client)
                failed = await self._resume(sid, events, marks, t0)
                return events, marks, failed
            return events, marks, None

        got = await self._refusable("Converse", one)
        if got is None:
            return
        events, marks, failed = got
        if failed is not None:
            r.errors[f"{failed.code().name} (after {len(events)} events)"] += 1
            if len(r.details) < 10:
                r.details.append(f"{failed.code().name}: {failed.details()}")
            return
        problems = check_turn(events, spoken=self.spoken)
        last = events[-1] if events else None
        if last is not None and last.HasField("error"):
            try:
                name = Status(last.error.code).name
            except ValueError:
                name = str(last.error.code)
            r.errors[f"{name} (turn error event)"] += 1
            if len(r.details) < 10:
                r.details.append(f"{name}: {last.error.message}")
            return
        if problems:
            r.problems.extend(f"turn {events[0].turn_id if events else '?'}: {p}" for p in problems)
            return
        r.turns += 1
        if "audio" in marks:
            r.first_audio_s.append(marks["audio"])
        if "text" in marks:
            r.first_text_s.append(marks["text"])
        if last.end.audio_seconds:
            r.rtf.append(last.end.real_time_factor)
        r.audio_s += last.end.audio_seconds
        r.chunks += sum(e.HasField("audio") for e in events)

    async def _resume(self, sid: str, events: list, marks: dict, t0: float):
        """Converse with resume_turn_id after the last event got, again while the stream breaks
        with a resumable status (the replica restarting) for up to RESUME_WITHIN_S; the events
        join `events` (check_turn then sees any chunk lost or sent twice). The failure, or None."""
        self.report.resumed += 1
        deadline = time.monotonic() + RESUME_WITHIN_S
        while True:
            req = pb.ConverseRequest(session_id=sid, resume_turn_id=events[-1].turn_id,
                                     after_event_id=events[-1].event_id)
            try:
                async for ev in self.stub.Converse(req, metadata=self.metadata, timeout=self.turn_timeout_s):
                    kind = ev.WhichOneof("event")
                    if kind in ("audio", "text") and kind not in marks:
                        marks[kind] = time.perf_counter() - t0
                    events.append(ev)
                return None
            except grpc.aio.AioRpcError as e:
                if e.code() not in RESUMABLE or time.monotonic() > deadline:
                    return e
                await asyncio.sleep(RESUME_BACKOFF_S)

    async def session(self, turns: int) -> None:
        r = self.report
        settings = pb.SessionSettings(low_latency_audio=self.low_latency,
                                      reply_mode=pb.REPLY_MODE_SPOKEN if self.spoken else pb.REPLY_MODE_TEXT,
                                      **self.session_settings)
        r.running += 1
        try:
            sess = await self._refusable("CreateSession", lambda: self.stub.CreateSession(
                pb.CreateSessionRequest(settings=settings), metadata=self.metadata, timeout=30))
            if sess is None:
                return
            r.sessions += 1
            for _ in range(turns):
                await self._turn(sess.session_id)
            tries = sum(r.retried.values())
            try:
                await self._refusable("DeleteSession", lambda: self.stub.DeleteSession(
                    pb.DeleteSessionRequest(session_id=sess.session_id), metadata=self.metadata, timeout=30))
            except grpc.aio.AioRpcError as e:     # NOT_FOUND after a try that got no answer: it did it
                if e.code() != grpc.StatusCode.NOT_FOUND or sum(r.retried.values()) == tries:
                    raise
        except grpc.aio.AioRpcError as e:
            r.errors[e.code().name] += 1
            if len(r.details) < 10:
                r.details.append(f"{e.code().name}: {e.details()}")
        finally:
            r.running -= 1


async def run_load(address: str, *, sessions: int, turns: int, api_key: str | None, audio: bytes | None = None,
                   text: str | None = None, spoken: bool = True, low_latency: bool = False,
                   duration_s: float = 0.0, deadline_s: float = 600.0, progress_s: float = 5.0,
                   credentials: grpc.ChannelCredentials | None = None, turn_timeout_s: float = 300.0,
                   session_settings: dict | None = None, out=sys.stderr) -> LoadReport:
    """Hold `sessions` concurrent sessions of `turns` turns each (with duration_s > 0: start a
    new session whenever one finishes until duration_s has passed); stop at deadline_s whatever
    is left. Progress lines go to `out` (None: silent)."""
    if audio is None and text is None:
        audio = SAMPLE.read_bytes()
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channel = (grpc.aio.secure_channel(address, credentials, options=options) if credentials is not None
               else grpc.aio.insecure_channel(address, options=options))
    md = (("application", "conversation"),) + ((("authorization", f"Bearer {api_key}"),) if api_key else ())
    gen = LoadGenerator(pb_grpc.ConversationServiceStub(channel), md, audio=audio, text=text, spoken=spoken,
                        low_latency=low_latency, turn_timeout_s=turn_timeout_s, session_settings=session_settings)
    r = gen.report
    t0 = time.monotonic()

    async def worker() -> None:
        await gen.session(turns)
        while duration_s and time.monotonic() - t0 < duration_s:
            await gen.session(turns)

    async def progress() -> None:
        while True:
            await asyncio.sleep(progress_s)
            print(f"[{time.monotonic() - t0:6.1f} s] sessions running {r.running}, started {r.sessions}; "
                  f"turns completed {r.turns}; refused {sum(r.refused.values())}; errors {r.error_count}; "
                  f"bad streams {len(r.problems)}", file=out, flush=True)

    ticker = asyncio.create_task(progress()) if out is not None and progress_s > 0 else None
    try:
        async with channel:
            tasks = [asyncio.create_task(worker()) for _ in range(sessions)]
            done, pending = await asyncio.wait(tasks, timeout=deadline_s)
            if pending:
                r.timed_out = True
                r.errors["stopped at --deadline-s"] += len(pending)
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            for t in done:
                if t.exception() is not None:
                    r.errors[f"load generator: {type(t.exception()).__name__}"] += 1
                    r.details.append(repr(t.exception()))
    finally:
        if ticker is not None:
            ticker.cancel()
        r.wall_s = time.monotonic() - t0
    return r


# ------------------------------------------------------------------ memory of the stack's processes
def rss_bytes(pid: int) -> int | None:
    """Resident memory of a local process (Linux /proc), None if it is gone or not ours to read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def stack_processes(ray_address: str = "auto", redis_url: str | None = None) -> dict[str, int]:
    """name -> pid of the stack's processes on this machine: every live Ray actor (Serve
    replicas, proxy, controller) and redis-server (its INFO). Actors come from Ray's state API,
    which needs the dashboard; a cluster started without one (`serve`, the tests) is asked
    through its GCS actor table instead (Ray is pinned, so that table's shape is known)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, logging_level="ERROR", log_to_driver=False)
    out: dict[str, int] = {}
    try:
        from ray.util.state import list_actors
        actors = [(a.name or a.class_name, a.pid) for a in list_actors(
            address=ray_address, filters=[("state", "=", "ALIVE")], limit=1000)]
    except Exception:  # noqa: BLE001 - no dashboard: the GCS table
        from ray._private import state
        actors = [(a.get("Name") or a.get("ActorClassName"), a.get("Pid")) for a in state.actors().values()
                  if a.get("State") == "ALIVE"]
    for name, pid in actors:
        if pid:
            out[f"{name} (pid {pid})"] = int(pid)
    if redis_url:
        import redis
        client = redis.Redis.from_url(redis_url)
        pid = int(client.info("server")["process_id"])
        client.close()
        out[f"redis-server (pid {pid})"] = pid
    return out


def rss_table(pids: dict[str, int]) -> dict[str, int | None]:
    return {name: rss_bytes(pid) for name, pid in pids.items()}


def rss_report(samples: list[tuple[float, dict]]) -> str:
    """Resident memory (MiB) of each process at every sample: the start, every --rss-every-s
    (the first turns allocate what a process keeps: compare the later columns) and the end."""
    fmt = lambda v: "gone" if v is None else f"{v / 2**20:.0f}"   # noqa: E731
    lines = ["resident memory (MiB) at " + " / ".join(f"{t:.0f}" for t, _ in samples) + " s:"]
    for name in sorted(samples[0][1]):
        lines.append(f"  {name[:60]:62s} " + " ".join(f"{fmt(m.get(name)):>5}" for _, m in samples))
    return "\n".join(lines)


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def load_main(args: argparse.Namespace) -> int:
    from orchestrator.client import channel_credentials, find_api_key

    if not args.allow_remote and not _is_loopback(args.address):
        print(f"error: {args.address} is not a loopback address; the load generator talks to a stack on this "
              "machine unless --allow-remote is given (only load a server you run)", file=sys.stderr)
        return 2
    try:
        key = args.api_key or find_api_key(args.api_key_file)
        tls = args.tls or args.ca_file or args.cert_file or args.key_file
        creds = channel_credentials(args.ca_file, args.cert_file, args.key_file) if tls else None
        audio = None if args.text is not None else Path(args.input or SAMPLE).read_bytes()
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    samples: list[tuple[float, dict]] = []
    sampler = None
    if args.rss:   # memory at the start, then every --rss-every-s on a thread, and at the end
        import threading
        pids = stack_processes(args.ray_address, args.redis_url)
        stop = threading.Event()
        t0 = time.monotonic()
        samples.append((0.0, rss_table(pids)))

        def sample() -> None:
            while not stop.wait(args.rss_every_s):
                samples.append((time.monotonic() - t0, rss_table(pids)))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    print(f"load: {args.sessions} sessions x {args.turns} turns against {args.address}"
          f"{f' for {args.duration_s:.0f} s' if args.duration_s else ''}", file=sys.stderr)
    report = asyncio.run(run_load(args.address, sessions=args.sessions, turns=args.turns, api_key=key, audio=audio,
                                  text=args.text, spoken=not args.text_only, low_latency=args.low_latency,
                                  duration_s=args.duration_s, deadline_s=args.deadline_s,
                                  progress_s=args.progress_s, credentials=creds, turn_timeout_s=args.timeout))
    print(report.summary())
    if sampler is not None:
        stop.set()
        samples.append((time.monotonic() - t0, rss_table(pids)))
        print(rss_report(samples))
    return 0 if report.error_count == 0 and not report.problems else 1
