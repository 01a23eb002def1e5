"""The consumer side of a work stream (`jobs:decoder`, `jobs:vocoder`): claim, run, publish, ack.

`run_worker` is the one loop that serves a stream: it claims new jobs through the consumer
group, re-claims jobs whose consumer died (after the visibility timeout), dead-letters poison
ones, publishes each result once (services/common/bus.py, `put_result_once`) and acks last. It
also outlives what goes wrong around the handler: Redis being away, the stream being deleted,
or a failure of its own, each followed by a retry with backoff, so a replica's worker thread
never dies while the replica lives. services/common/stage_worker.py runs it in a Serve replica.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import redis

from services.common.bus import Bus
from services.common.entries import BusError, Entry, Job, PermanentError
from services.common.telemetry import get_metrics, inject_context, start_span

log = logging.getLogger(__name__)

Result = tuple[str, Entry, str]  # (stream, entry, result key)
Handler = Callable[[Job], Sequence[Result]]
# Batched: all jobs of one claim at once; per job, its results or the exception it failed with.
BatchHandler = Callable[[list[Job]], Sequence["Sequence[Result] | BaseException"]]

MAX_BACKOFF_S = 5.0


def checked_batch(jobs: list[Job], check: Callable[[int, Job], Any], bad_input: type[Exception],
                  run: Callable[[list[Job], list[Any]], Iterable["Sequence[Result]"]]) -> list:
    """A BatchHandler's outcomes where bad input fails only its own job: `check(i, job)` gives
    job i's input or raises `bad_input` (the job is dead-lettered with that message, a
    PermanentError); `run(jobs, inputs)` processes the good jobs as one batch and gives each
    one's results, in order."""
    outcomes: list = [None] * len(jobs)
    good, inputs = [], []
    for i, job in enumerate(jobs):
        try:
            inputs.append(check(i, job))
            good.append(i)
        except bad_input as e:
            outcomes[i] = PermanentError(str(e))
    if good:
        for i, results in zip(good, run([jobs[i] for i in good], inputs), strict=True):
            outcomes[i] = results
    return outcomes


@dataclass
class WorkerStats:
    claimed: int = 0
    reclaimed: int = 0
    completed: int = 0        # jobs whose results were published and that were acked
    duplicates: int = 0       # results not published because a copy already was
    failed: int = 0           # handler raised; left pending for a retry
    dead_lettered: int = 0    # by PermanentError or by reclaim after max_deliveries
    restarts: int = 0         # rounds that failed outside the handler (Redis away, a bug)


def _finish(bus: Bus, job: Job, outcome: "Sequence[Result] | BaseException", stats: WorkerStats,
            dead_lettered: Callable[[Job, str], None]) -> None:
    """Publish a job's results then ack it, or dead-letter / leave it pending on failure."""
    if isinstance(outcome, PermanentError):
        reason = f"{type(outcome).__name__}: {outcome}"
        bus.dead_letter(job, reason)
        dead_lettered(job, reason)
        return
    if isinstance(outcome, BaseException):
        # Left pending: after the visibility timeout some worker (maybe this one) reclaims it,
        # until max_deliveries sends it to the dead-letter stream.
        log.error("%s: handler failed on job %s (delivery %d)", job.stream, job.id, job.deliveries,
                  exc_info=outcome)
        stats.failed += 1
        return
    # Results first, ack last: a crash in between re-delivers the job, and the once-only keys
    # stop its results from being published twice. A result without a trace context continues
    # the current span (single-job mode) or, in a batch, the job's own trace.
    carrier = job.entry.trace_carrier()
    for stream, entry, key in outcome:
        published, _ = bus.put_result_once(key, stream, entry.with_trace(inject_context() or carrier))
        stats.duplicates += not published
    bus.ack(job)
    stats.completed += 1


def _job_attrs(job: Job) -> dict[str, Any]:
    return {"job.stream": job.stream, "job.id": job.id, "job.deliveries": job.deliveries,
            "turn.id": getattr(job.entry, "turn_id", "")}


def _run_jobs(bus: Bus, jobs: list[Job], handler: Callable, batched: bool, stats: WorkerStats,
              stage: str, dead_lettered: Callable[[Job, str], None], metrics: Any = None) -> None:
    metrics = metrics or get_metrics()
    if not batched:
        for job in jobs:
            with start_span(f"{stage}.job", parent_carrier=job.entry.trace_carrier(),
                            attributes=_job_attrs(job)):
                t0 = time.perf_counter()
                try:
                    outcome = handler(job)
                except Exception as e:
                    outcome = e
                metrics.record_stage_latency(stage, (time.perf_counter() - t0) * 1000)
                _finish(bus, job, outcome, stats, dead_lettered)
        return
    # One span for the forward over the batch; each job's results continue that job's trace.
    with start_span(f"{stage}.batch", attributes={"batch.size": len(jobs)}):
        t0 = time.perf_counter()
        try:
            outcomes = list(handler(jobs))
            if len(outcomes) != len(jobs):
                raise BusError(f"batched handler returned {len(outcomes)} outcomes for {len(jobs)} jobs")
        except Exception as e:
            outcomes = [e] * len(jobs)
        ms = (time.perf_counter() - t0) * 1000
        for _ in jobs:  # each job waited for the whole batch
            metrics.record_stage_latency(stage, ms)
    for job, outcome in zip(jobs, outcomes):  # outside the span: results take the job's trace
        _finish(bus, job, outcome, stats, dead_lettered)


def run_worker(
    bus: Bus,
    stream: "str | Sequence[str]",
    group: str,
    consumer: str,
    handler: "Handler | BatchHandler",
    stop_event: threading.Event,
    visibility_timeout_ms: int = 30000,
    block_ms: int = 1000,
    count: int = 1,
    reclaim_interval_ms: int = 5000,
    max_deliveries: int | None = None,
    on_dead_letter: Callable[[Job, str], None] | None = None,
    stage: str | None = None,
    batched: bool = False,
    stats: WorkerStats | None = None,
) -> WorkerStats:
    """Serve a work stream until `stop_event` is set; returns what it did (`stats`, updated
    while it runs, or a new WorkerStats). Several streams are lanes in priority order
    (entries.lanes: the urgent lane first): reclaims and claims take the first lane's jobs
    before the next's.

    Each round: every `reclaim_interval_ms`, jobs idle for `visibility_timeout_ms` are
    reclaimed (and poison ones dead-lettered), else up to `count` new jobs are claimed, waiting
    at most `block_ms` (the stop check period). A claim returns at once with whatever is
    waiting, so batches fill up under load without adding latency when idle.

    `handler(job)` returns the job's results as (stream, entry, result_key); with
    `batched=True`, `handler(jobs)` gets all claimed jobs and returns, per job in order, its
    results or the exception it failed with. Results are published once each, then the job is
    acked. A handler exception leaves the job pending for a retry; a PermanentError
    dead-letters it at once. `on_dead_letter(job, reason)` runs for every dead-lettered job
    (e.g. to tell the turn that a chunk is lost).

    A round that fails outside the handler (Redis unreachable, an unexpected reply, a bug) is
    logged and retried after a backoff of 0.1 s doubling up to 5 s; jobs it held stay pending
    and are reclaimed. The consumer group is (re)created when missing.

    `visibility_timeout_ms` must exceed the longest handler run, or a slow job is also run by
    a second worker (harmless for the client thanks to the once-only results, wasted work).
    `worker_options(settings)` gives these timings from the settings.
    """
    streams = [stream] if isinstance(stream, str) else list(stream)
    name = streams[-1]
    stage = stage or name.split(":")[-1]
    stats = WorkerStats() if stats is None else stats
    metrics = bus.metrics or get_metrics()

    def dead_lettered(job: Job, reason: str) -> None:
        stats.dead_lettered += 1
        metrics.record_dead_lettered(stage)
        if on_dead_letter is not None:
            on_dead_letter(job, reason)

    has_group = False
    next_reclaim = 0.0
    backoff = 0.1
    while not stop_event.is_set():
        try:
            if not has_group:
                for s in streams:
                    bus.ensure_group(s, group)
                has_group = True
            jobs: list[Job] = []
            now = time.monotonic()
            if now >= next_reclaim:
                next_reclaim = now + reclaim_interval_ms / 1000.0
                for s in streams:
                    if len(jobs) < count:
                        jobs += bus.reclaim_stale(s, group, consumer, visibility_timeout_ms,
                                                  count=count - len(jobs), max_deliveries=max_deliveries,
                                                  on_dead_letter=dead_lettered)
                stats.reclaimed += len(jobs)
            if not jobs:
                jobs = bus.claim_next(streams, group, consumer, block_ms=block_ms, count=count)
                stats.claimed += len(jobs)
                for job in jobs:
                    metrics.record_queue_lag(stage, job.lag_ms)
            for i in range(0, len(jobs), count):   # a wait that woke on several lanes: batches of count
                batch = jobs[i:i + count]
                try:
                    _run_jobs(bus, batch, handler, batched, stats, stage, dead_lettered, metrics)
                except (redis.ConnectionError, redis.TimeoutError):
                    raise
                except Exception:  # publishing failed: the jobs stay pending for a retry
                    log.exception("%s: could not publish the results of jobs %s", name,
                                  [j.id for j in batch])
                    stats.failed += 1
            backoff = 0.1
        except Exception as e:  # noqa: BLE001 - the worker must outlive any failed round
            if isinstance(e, redis.ResponseError) and "NOGROUP" in str(e):
                has_group = False  # the stream was deleted (e.g. FLUSHALL): recreate, go on
                continue
            stats.restarts += 1
            if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
                log.warning("%s: redis unavailable (%s); retrying in %.1f s", name, e, backoff)
            else:
                log.exception("%s: worker round failed; retrying in %.1f s", name, backoff)
            stop_event.wait(backoff)
            backoff = min(MAX_BACKOFF_S, backoff * 2)
    return stats


def worker_options(settings: Any) -> dict[str, int]:
    """run_worker's timing keywords from `Settings.bus`."""
    b = settings.bus
    return {"visibility_timeout_ms": b.visibility_timeout_ms, "block_ms": b.block_ms,
            "reclaim_interval_ms": b.reclaim_interval_ms, "max_deliveries": b.max_deliveries}


def start_worker(bus: Bus, stream: "str | Sequence[str]", group: str, consumer: str, handler: "Handler | BatchHandler",
                 stop_event: threading.Event, **kw: Any) -> threading.Thread:
    """`run_worker` on a daemon thread named after the consumer; `thread.stats` is its
    WorkerStats, updated while it runs."""
    stats = WorkerStats()
    thread = threading.Thread(target=run_worker, args=(bus, stream, group, consumer, handler, stop_event),
                              kwargs={**kw, "stats": stats}, name=f"worker-{consumer}", daemon=True)
    thread.stats = stats  # type: ignore[attr-defined]
    thread.start()
    return thread
