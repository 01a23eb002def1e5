"""Serve itself adds a decoder replica when the decoder's work stream backs up: the deployed
decoder app with autoscaling settings, its replicas reporting the Redis backlog, the backlog
policy in Serve's controller, a real local Ray cluster (services/common/autoscaling.py)."""
from __future__ import annotations

import time

import numpy as np
import yaml

from services.common.bus import Bus
from services.common.entries import DECODER_JOBS, VOCODER_JOBS, DecodeJob

# what the test stack's settings change: the decoder may grow to 2 replicas, and Serve looks
# at the backlog every half second (its defaults: 10 s reports averaged over 30 s)
AUTOSCALING = {"stages": {"decoder": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2}},
               "autoscaling": {"metrics_interval_s": 0.5, "look_back_period_s": 1.0}}
JOBS, FRAMES = 200, 50          # about 20 s of work for one replica on this machine


def running_replicas() -> int:
    from ray import serve
    return serve.status().applications["decoder"].deployments["Decoder"].replica_states.get("RUNNING", 0)


def drop_jobs(bus: Bus, turn: str) -> None:
    """Delete the test's jobs still waiting in the work streams (no one wants their audio)."""
    for stream in (DECODER_JOBS, VOCODER_JOBS):
        ids = [eid for eid, f in bus.redis.xrange(stream) if f.get(b"turn_id") == turn.encode()]
        if ids:
            bus.redis.xdel(stream, *ids)


def test_serve_adds_a_decoder_replica_when_the_backlog_grows(serve_stack, tmp_path):
    from ray import serve

    from orchestrator.app import decoder_app
    from services.common.model_config import ModelConfig

    serve_stack.deploy("decoder")
    settings = yaml.safe_load(serve_stack.settings_path.read_text())
    settings["stages"]["decoder"].update(AUTOSCALING["stages"]["decoder"])
    settings["autoscaling"] = AUTOSCALING["autoscaling"]
    cfg_path = tmp_path / "autoscaling.yaml"
    cfg_path.write_text(yaml.safe_dump(settings))
    sizes = ModelConfig.from_file(serve_stack.checkpoint).audio.codebook_sizes
    rng = np.random.default_rng(0)
    bus = Bus(serve_stack.redis_url)
    turn = f"autoscale-{time.time_ns()}"
    try:
        serve.run(decoder_app({"config": str(cfg_path)}), name="decoder", route_prefix="/decoder")
        assert running_replicas() == 1                                   # nothing waits: min_replicas
        t0 = time.monotonic()
        for i in range(JOBS):
            codes = np.stack([rng.integers(0, k, FRAMES) for k in sizes], axis=1).astype(np.int32)
            bus.submit(DECODER_JOBS, DecodeJob.from_codes(turn, i, 0, codes, seed=i))
        while running_replicas() < 2 and time.monotonic() - t0 < 50:
            time.sleep(0.25)
        took = time.monotonic() - t0
        backlog = bus.redis.xlen(DECODER_JOBS)
        assert running_replicas() == 2, f"still one decoder replica {took:.0f} s after {JOBS} jobs were queued"
        assert backlog > 0, "the backlog drained before Serve added a replica: the test proves nothing"
    finally:
        drop_jobs(bus, turn)
        serve.run(decoder_app({"config": str(serve_stack.settings_path)}), name="decoder", route_prefix="/decoder")
        drop_jobs(bus, turn)
        bus.redis.close()
    assert running_replicas() == 1
