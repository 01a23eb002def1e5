"""The work-stream side of a stage replica: a thread that serves `jobs:{stage}` and its urgent
lane (worker.run_worker, entries.lanes).

Used by the decoder and vocoder deployments: each replica is one consumer of the stage's
consumer group, so replicas share the work, and a replica that dies leaves its jobs to be
re-claimed by the others after the visibility timeout."""
from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import Callable

from services.common.autoscaling import BACKLOG_METRIC
from services.common.bus import Bus
from services.common.entries import Job, TurnError, lanes
from services.common.errors import Status
from services.common.telemetry import get_metrics
from services.common.settings import Settings
from services.common.worker import WorkerStats, start_worker, worker_options

GROUP = "stage-workers"

log = logging.getLogger(__name__)


def consumer_name(stage: str) -> str:
    return f"{stage}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class StageWorker:
    """Start with `start()`, stop with `stop()`; `handler(jobs) -> per-job results or exception`."""

    def __init__(self, settings: Settings, stream: str, stage: str,
                 handler: Callable[[list[Job]], list], batch_size: int):
        self.bus = Bus.from_settings(settings)
        self.stream, self.stage = stream, stage
        self.consumer = consumer_name(stage)
        self._stop = threading.Event()
        self._kw = dict(worker_options(settings), count=batch_size, stage=stage, batched=True,
                        on_dead_letter=self._dead_letter)
        self._handler = handler
        self._thread: threading.Thread | None = None

    def _dead_letter(self, job: Job, reason: str) -> None:
        # the turn must hear that a piece of its audio is lost instead of waiting for it
        e = job.entry
        self.bus.publish(e.turn_id, "audio", TurnError(
            turn_id=e.turn_id, stage=self.stage, code=Status.INTERNAL, segment=e.segment, chunk=e.chunk,
            message=f"{self.stage} could not process segment {e.segment} chunk {e.chunk}: {reason}"))

    def start(self) -> "StageWorker":
        # run_worker retries whatever fails around the handler, so the thread lives until stop()
        self._thread = start_worker(self.bus, lanes(self.stream), GROUP, self.consumer, self._handler,
                                    self._stop, **self._kw)
        return self

    @property
    def stats(self) -> WorkerStats | None:
        return None if self._thread is None else self._thread.stats  # type: ignore[attr-defined]

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful drain: the worker finishes the jobs it runs (results published, acked) and
        claims no more; whatever it still holds after `timeout` is handed back to the group at
        once (Bus.hand_back), not left for the visibility timeout."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            n = sum(self.bus.hand_back(s, GROUP, self.consumer, self._kw["visibility_timeout_ms"])
                    for s in lanes(self.stream))
            if n:
                log.warning("%s: stopping with %d jobs unfinished; handed back to the other replicas", self.consumer, n)
        except Exception:  # noqa: BLE001 - Redis away: the jobs are reclaimed after the visibility timeout
            log.warning("%s: could not hand back its jobs; they are reclaimed after the visibility timeout",
                        self.consumer)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class WorkStreamReplica:
    """Mixin for a Serve deployment whose replicas also serve a work stream: starts the
    worker thread, reports it in Serve's health check, stops it when the replica goes."""

    worker: StageWorker | None = None

    def start_worker(self, settings: Settings, stream: str, stage: str,
                     handler: Callable[[list[Job]], list], batch_size: int) -> None:
        self.worker = StageWorker(settings, stream, stage, handler, batch_size).start()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this on every replica; the backlog drives autoscaling.backlog_policy
        (acked jobs are deleted, so the lanes' lengths are what waits or runs)."""
        if self.worker is None:
            return {BACKLOG_METRIC: 0.0}
        pipe = self.worker.bus.redis.pipeline(transaction=False)
        for s in lanes(self.worker.stream):
            pipe.xlen(s)
        backlog = float(sum(pipe.execute()))
        (self.worker.bus.metrics or get_metrics()).record_backlog(self.worker.stage, backlog)
        return {BACKLOG_METRIC: backlog}

    def check_health(self) -> None:
        if self.worker is None or not self.worker.alive:
            raise RuntimeError("the work-stream thread of this replica is not running")

    def __del__(self):
        if self.worker is not None:
            self.worker.stop()
