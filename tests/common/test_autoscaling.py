"""Backlog-driven autoscaling of the work-stream stages (decoder, vocoder)."""
from __future__ import annotations

import threading
import time

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


def test_asks_for_the_backlog_over_the_target_within_bounds():
    assert backlog_policy(context(backlog=13, target=1))[0] == 4          # ceil(13 / 4)
    assert backlog_policy(context(backlog=1000, target=1))[0] == 8        # max_replicas
    assert backlog_policy(context(backlog=0, target=6))[0] == 1           # min_replicas


DOWN_DELAY_S = 0.5


def served(backlog: float, target: int, state=None) -> tuple[int, dict]:
    """The policy as Serve runs it: wrapped with the deployment's bounds and delays (on the
    clock), here the work-stream stages' (no upscale delay) with a short downscale delay."""
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    ctx = context(backlog, target, state)
    ctx.config.upscale_delay_s, ctx.config.downscale_delay_s = 0.0, DOWN_DELAY_S
    return _apply_autoscaling_config(backlog_policy)(ctx)


def test_serve_scales_up_at_once_and_down_only_after_the_delay():
    assert served(backlog=13, target=1)[0] == 4                          # at once
    n, state = served(backlog=0, target=6)
    assert n == 6                                                        # not yet
    time.sleep(DOWN_DELAY_S / 2)
    n, state = served(backlog=0, target=6, state=state)
    assert n == 6
    time.sleep(DOWN_DELAY_S / 2 + 0.1)
    n, state = served(backlog=0, target=6, state=state)
    assert n == 1
    # demand coming back resets the clock
    n, state = served(backlog=0, target=6)
    n, state = served(backlog=30, target=6, state=state)
    assert n == 8
    n, state = served(backlog=0, target=8, state=state)
    time.sleep(DOWN_DELAY_S / 2 + 0.1)
    assert served(backlog=0, target=8, state=state)[0] == 8


def test_the_work_stream_stages_get_no_upscale_delay():
    from orchestrator.app import APPS, deployment_options
    from services.common.settings import Settings

    s = Settings(stages={"decoder": {"max_replicas": 4}, "tokenizer": {"max_replicas": 4}},
                 autoscaling={"metrics_interval_s": 0.5})
    work = deployment_options(s.stages.decoder, APPS["decoder"], s.autoscaling)["autoscaling_config"]
    assert work["upscale_delay_s"] == 0 and work["metrics_interval_s"] == 0.5
    assert work["policy"] == {"policy_function": "services.common.autoscaling:backlog_policy"}
    served_requests = deployment_options(s.stages.tokenizer, APPS["tokenizer"], s.autoscaling)["autoscaling_config"]
    assert "upscale_delay_s" not in served_requests and "policy" not in served_requests
