"""Backlog-driven autoscaling of the work-stream stages (decoder, vocoder)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from services.common.autoscaling import BACKLOG_METRIC, backlog_policy
from services.common.bus import Bus
from services.common.entries import DecodeJob
from services.common.settings import Settings
from services.common.stage_worker import WorkStreamReplica


def context(backlog: float, target: int, state=None, now: float = 1000.0, lo: int = 1, hi: int = 8):
    cfg = AutoscalingConfig(min_replicas=lo, max_replicas=hi, target_ongoing_requests=4, downscale_delay_s=30)
    return AutoscalingContext(
        deployment_id=None, deployment_name="Decoder", app_name="decoder", current_num_replicas=target,
        target_num_replicas=target, running_replicas=[], total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics={BACKLOG_METRIC: {"r1": backlog, "r2": backlog}}, raw_metrics=None,
        capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi, policy_state=state or {},
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=cfg)


def test_scales_up_at_once_to_the_backlog_within_bounds():
    assert backlog_policy(context(backlog=13, target=1))[0] == 4          # ceil(13 / 4)
    assert backlog_policy(context(backlog=1000, target=1))[0] == 8        # max_replicas
    assert backlog_policy(context(backlog=0, target=1))[0] == 1           # min_replicas


def test_scales_down_only_after_the_delay():
    n, state = backlog_policy(context(backlog=0, target=6, now=1000.0))
    assert n == 6 and "lower_since" in state                             # not yet
    n, state = backlog_policy(context(backlog=0, target=6, state=state, now=1020.0))
    assert n == 6
    n, state = backlog_policy(context(backlog=0, target=6, state=state, now=1031.0))
    assert n == 1 and "lower_since" not in state
    # demand coming back resets the clock
    n, state = backlog_policy(context(backlog=0, target=6, now=1000.0))
    n, state = backlog_policy(context(backlog=30, target=6, state=state, now=1010.0))
    assert n == 8 and "lower_since" not in state


def test_replicas_report_the_stream_backlog(redis_url):
    class Replica(WorkStreamReplica):
        pass

    settings = Settings.load(env={"REDIS_URL": redis_url, "BAICHUAN_AUDIO__BUS__BLOCK_MS": "100"})
    stream = f"jobs:test-autoscale-{np.random.randint(1 << 30)}"
    release = threading.Event()

    def handler(jobs):                       # holds the jobs until released
        release.wait(10)
        return [[] for _ in jobs]

    r = Replica()
    assert r.record_autoscaling_stats() == {BACKLOG_METRIC: 0.0}
    bus = Bus(redis_url)
    for i in range(5):
        bus.submit(stream, DecodeJob.from_codes("t", i, 0, np.zeros((1, 8), np.int32)))
    r.start_worker(settings, stream, "decoder", handler, batch_size=2)
    try:
        assert r.record_autoscaling_stats() == {BACKLOG_METRIC: 5.0}     # waiting + running
        r.check_health()
        release.set()
        for _ in range(100):
            if r.record_autoscaling_stats()[BACKLOG_METRIC] == 0.0:
                break
            threading.Event().wait(0.05)
        assert r.record_autoscaling_stats() == {BACKLOG_METRIC: 0.0}     # acked jobs leave the stream
    finally:
        r.worker.stop()
    with pytest.raises(RuntimeError, match="not running"):
        r.check_health()
