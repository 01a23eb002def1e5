"""Autoscaling of the work-stream stages (decoder, vocoder) on their Redis backlog.

Serve's default policy counts requests that pass through Serve; the decoder and vocoder get
their work from Redis streams, so Serve never sees it. Each of their replicas reports the
stream's backlog (`record_autoscaling_stats`, see stage_worker.WorkStreamReplica) and this
policy sizes the deployment so every replica has about `target_ongoing_requests` jobs,
within the configured bounds: up at once, down only after `downscale_delay_s` of lower
demand. Runs in Serve's controller: keep it free of heavy imports."""
from __future__ import annotations

import math
import time
from typing import Any

BACKLOG_METRIC = "work_stream_backlog"
POLICY = "services.common.autoscaling:backlog_policy"


def backlog_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Serve custom autoscaling policy: (desired replicas, policy state)."""
    state = dict(ctx.policy_state or {})
    reported = (ctx.aggregated_metrics or {}).get(BACKLOG_METRIC, {})
    backlog = max(reported.values(), default=0.0)       # every replica sees the same stream
    config = getattr(ctx, "config", None)
    target = getattr(config, "target_ongoing_requests", None) or 2.0
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    desired = min(hi, max(lo, math.ceil(backlog / target)))
    current = ctx.target_num_replicas
    now = ctx.current_time if ctx.current_time is not None else time.time()
    if desired >= current:
        state.pop("lower_since", None)
        return desired, state
    since = state.setdefault("lower_since", now)
    if now - since >= getattr(config, "downscale_delay_s", 600.0):
        state.pop("lower_since", None)
        return desired, state
    return current, state
