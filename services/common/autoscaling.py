"""Autoscaling of the work-stream stages (decoder, vocoder) on their Redis backlog.

Serve's default policy counts requests that pass through Serve; the decoder and vocoder get
their work from Redis streams, so Serve never sees it. Each of their replicas reports the
stream's backlog (`record_autoscaling_stats`, see stage_worker.WorkStreamReplica) and this
policy asks for enough replicas that each has about `target_ongoing_requests` jobs. Serve
(2.60) wraps a custom policy with the deployment's bounds and delays: the app builder gives
these stages no upscale delay (a backlog is work already waiting: up at once) and
`autoscaling.downscale_delay_s` before a replica goes (orchestrator/app.py). Runs in Serve's
controller: keep it free of heavy imports."""
from __future__ import annotations

import math
from typing import Any

BACKLOG_METRIC = "work_stream_backlog"
POLICY = "services.common.autoscaling:backlog_policy"


def backlog_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Serve custom autoscaling policy: (desired replicas, policy state)."""
    reported = (ctx.aggregated_metrics or {}).get(BACKLOG_METRIC, {})
    backlog = max(reported.values(), default=0.0)       # every replica sees the same stream
    config = getattr(ctx, "config", None)
    target = getattr(config, "target_ongoing_requests", None) or 2.0
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    return min(hi, max(lo, math.ceil(backlog / target))), dict(ctx.policy_state or {})
