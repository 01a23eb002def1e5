"""`baichuan-audio bench hops`: what the transport between the stages costs per turn (CPU).

`bench gpu` runs the stages in one process; in the served stack they talk through Serve
handles and Redis streams. This measures those hops on this machine with the stack's own
code: a private redis-server and the Bus (a turn-stream entry from `publish` to a blocked
`read`; a work-stream job from `submit` to a blocked `claim_next`, then `put_result_once` and
`ack`), and a real local Ray cluster with a Serve deployment (a handle call and its reply).
It then adds them up along the path to a turn's first audio:

    conversation -> tokenizer (handle) -> conversation -> llm (handle)
    llm -> jobs:decoder (job) -> decoder -> jobs:vocoder (job) -> vocoder
        -> turn:{id}:audio (entry) -> conversation -> turn:{id}:events (entry) -> caller's reader
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import numpy as np


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def redis_hops(url: str, n: int = 200) -> dict[str, list[float]]:
    """Seconds per hop: turn-stream entry (publish -> read) and job (submit -> claim -> ack)."""
    from services.common import entries as E
    from services.common.bus import Bus

    bus = Bus(url)
    out: dict[str, list[float]] = {"stream entry": [], "work job": []}
    turn = f"hops-{time.time_ns()}"
    stream = bus.turn_stream(turn, "llm")
    last = "0"
    for i in range(n):
        got = {}

        def reader():
            got["m"] = bus.read({stream: last}, block_ms=2000)
            got["t"] = time.perf_counter()

        th = threading.Thread(target=reader)
        th.start()
        time.sleep(0.002)                                   # the reader is blocked in XREAD
        t0 = time.perf_counter()
        bus.publish(turn, "llm", E.TextDelta(turn_id=turn, segment=0, text="x"))
        th.join()
        out["stream entry"].append(got["t"] - t0)
        last = got["m"][-1].id
    jobs = f"jobs:hops-{time.time_ns()}"
    bus.ensure_group(jobs, "g")
    codes = np.zeros((8, 8), dtype=np.int32)
    for i in range(n):
        got = {}

        def worker():
            js = bus.claim_next(jobs, "g", "w", block_ms=2000)
            bus.put_result_once(Bus.result_key("hops", turn, i, 0), bus.turn_stream(turn, "audio"),
                                E.TextDelta(turn_id=turn, segment=i, text="r"))
            bus.ack(js[0])
            got["t"] = time.perf_counter()

        th = threading.Thread(target=worker)
        th.start()
        time.sleep(0.002)
        t0 = time.perf_counter()
        bus.submit(jobs, E.DecodeJob.from_codes(turn, i, 0, codes, seed=1))
        th.join()
        out["work job"].append(got["t"] - t0)
    bus.delete_turn(turn)
    bus.redis.delete(jobs)
    return out


def serve_hops(n: int = 200) -> list[float]:
    """Seconds per Serve handle call (request and reply) to a trivial local deployment."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Echo:
        async def call(self, payload: dict) -> dict:
            return payload

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    try:
        handle = serve.run(Echo.bind(), name="hops", route_prefix=None)
        payload = {"turn_id": "t", "prompt_ids": list(range(200)), "codes": np.zeros((60, 8), np.int64)}
        for _ in range(10):
            handle.call.remote(payload).result()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            handle.call.remote(payload).result()
            times.append(time.perf_counter() - t0)
        return times
    finally:
        serve.shutdown()
        ray.shutdown()


def bench_hops(n: int = 200, print_fn=print) -> dict:
    from services.common.redis_server import redis_server

    with redis_server() as url:
        r = redis_hops(url, n)
    s = serve_hops(n)
    rows = {"Serve handle call": s, **r}
    print_fn(f"# hops on this machine ({os.cpu_count()} CPUs): {n} of each, seconds from send to receipt")
    for name, xs in rows.items():
        print_fn(f"{name:>18}: p50 {_pct(xs, 0.5) * 1e3:7.2f} ms  p95 {_pct(xs, 0.95) * 1e3:7.2f} ms  "
                 f"mean {statistics.fmean(xs) * 1e3:7.2f} ms")
    p50 = {k: _pct(v, 0.5) for k, v in rows.items()}
    path = 2 * p50["Serve handle call"] + 2 * p50["work job"] + 2 * p50["stream entry"]
    print_fn(f"# path to a turn's first audio: 2 handle calls + 2 jobs + 2 stream entries = "
             f"{path * 1e3:.1f} ms at p50 (on top of the compute that bench gpu measures)")
    return {"p50": p50, "first_audio_path_s": path}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=200, help="hops of each kind")
    bench_hops(p.parse_args(argv).n)


if __name__ == "__main__":
    main()
