"""Runs benchmark items through the public gRPC API (orchestrator.client) with bounded
concurrency and writes one JSONL record per item; a re-run skips the items already done."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Iterable

import grpc
from tqdm import tqdm

from orchestrator.client import Client, Reply, retry_after
from orchestrator.evaluation.dataset import MODES, Item
from orchestrator.evaluation.records import RECORDS, latest_records

MAX_WAITS = 30            # RESOURCE_EXHAUSTED retries per call (quota waits) before the item fails
MAX_WAIT_S = 30.0         # the longest single wait taken on a quota's word


def _with_quota_waits(call, *a, **kw):
    """Call, waiting out RESOURCE_EXHAUSTED answers that say how long to wait (per-identity
    quotas: running turns, requests per minute); any other error goes to the caller."""
    for _ in range(MAX_WAITS):
        try:
            return call(*a, **kw)
        except grpc.RpcError as e:
            wait = retry_after(e) if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
            if wait is None:
                raise
            time.sleep(min(max(wait, 0.2), MAX_WAIT_S))
    return call(*a, **kw)


def _error(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


def run_item(client: Client, item: Item, mode: str, out_dir: Path, transcribe: bool = True) -> dict:
    """One question as a new session's first turn; the record of what happened, never raises.

    Times are from the client's clock, from sending the request (the whole question file is in
    it) to the first text delta and the first audio chunk; the server's marks (from the turn's
    start) and its real-time factor come from the turn's own events."""
    rec: dict = {"id": item.id, "subset": item.subset, "index": item.index, "mode": mode,
                 "audio_file": item.audio_path.name}
    if not item.audio_path.is_file():
        rec["error"] = f"audio file missing: {item.audio_path.name}"
        return rec
    try:
        question = item.wav()
    except Exception as e:          # noqa: BLE001 - any undecodable file is this item's error
        rec["error"] = f"cannot decode {item.audio_path.name} as audio: {e}"
        return rec
    sid = None
    try:
        sid = _with_quota_waits(client.create_session, text_only=(mode == "s2t"))
        firsts: dict[str, float] = {}

        def mark(name: str):
            return lambda *_: firsts.setdefault(name, time.monotonic())

        def attempt() -> Reply:
            # the clock starts again with each attempt: a wait for a quota is not the turn's latency
            firsts.clear()
            firsts["start"] = time.monotonic()
            return client.converse(sid, audio=question, on_text=mark("text"), on_audio=mark("audio"))
        reply = _with_quota_waits(attempt)
        t0 = firsts["start"]
        wall = time.monotonic() - t0
        end = reply.end
        rec.update({
            "turn_id": reply.turn_id, "reply_text": reply.text,
            "ttft_ms": round((firsts["text"] - t0) * 1000, 1) if "text" in firsts else None,
            "ttfa_ms": round((firsts["audio"] - t0) * 1000, 1) if "audio" in firsts else None,
            "server_first_text_ms": reply.marks.get("first_text"),
            "server_first_audio_ms": reply.marks.get("first_audio"),
            "audio_seconds": round(reply.seconds, 4),
            "rtf": round(end.real_time_factor, 4) if end is not None and reply.pcm16 else None,
            "wall_s": round(wall, 3), "reason": end.reason if end is not None else None,
        })
        if mode == "s2s":
            if not reply.pcm16:
                raise RuntimeError("a spoken reply without audio")
            path = out_dir / "audio" / item.subset / f"{item.index}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(reply.wav())
            rec["reply_audio"] = str(path.relative_to(out_dir))
            if transcribe:
                # the stack's own ASR on its spoken reply: how well the speech says the text
                rec["asr_text"] = _with_quota_waits(client.transcribe, reply.wav()).text
    except Exception as e:          # noqa: BLE001 - recorded; the run goes on with the next item
        rec["error"] = _error(e)
    finally:
        if sid is not None:
            try:                    # quotas count live sessions: a long run must not pile them up
                client.delete_session(sid)
            except grpc.RpcError:
                pass                # it expires on its own
    return rec


def run(client: Client, items: Iterable[Item], mode: str, out_dir: Path, concurrency: int = 1,
        transcribe: bool = True, progress: bool | None = None) -> tuple[int, int]:
    """Runs the items not yet done (no record, or only failed ones) and appends their records.
    Returns (items run now, of them failed). progress None: a bar on a terminal only."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {k for k, r in latest_records(out_dir).items() if not r.get("error")}
    todo = [it for it in items if f"{mode}:{it.id}" not in done]
    failed = 0
    with (out_dir / RECORDS).open("a", encoding="utf-8") as f, \
            tqdm(total=len(todo), unit="item", desc=f"openaudiobench {mode}", disable=None if progress is None else not progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(run_item, client, it, mode, out_dir, transcribe) for it in todo]
        for fut in as_completed(futures):
            rec = fut.result()
            failed += bool(rec.get("error"))
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")   # written here only: one writer
            f.flush()
            bar.update(1)
            bar.set_postfix(failed=failed)
    return len(todo), failed
