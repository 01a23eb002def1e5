"""`make demo`: the whole stack on this machine, one spoken turn, reply.wav.

Starts its own redis-server and a local Ray cluster, deploys the five applications on the
tiny random checkpoint (or MODEL_PATH), sends the bundled spoken question, streams the reply
(text as it arrives, a progress line for audio), prints time to first audio and the real-time
factor, writes the reply, and shuts everything down, also on Ctrl-C."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent / "samples" / "question.wav"

# A 2-core machine runs all five applications: small CPU shares each.
DEMO_SETTINGS = """
stages:
  tokenizer:    {num_cpus: 0.1}
  llm:          {num_cpus: 0.1}
  decoder:      {num_cpus: 0.1}
  vocoder:      {num_cpus: 0.1}
  orchestrator: {num_cpus: 0.1}
"""


def demo_main(args: argparse.Namespace) -> int:
    from services.common.auth import write_key_file
    from services.common.redis_server import free_port, redis_server

    question = Path(args.input) if args.input else SAMPLE
    audio = question.read_bytes()
    model = os.environ.get("MODEL_PATH", "")
    print(f"model: {model or 'tiny random checkpoint (set MODEL_PATH for a real one)'}")
    t_start = time.monotonic()
    try:
        with redis_server() as redis_url, tempfile.TemporaryDirectory(prefix="baichuan-demo-") as tmp:
            cfg = Path(tmp) / "settings.yaml"
            keys = Path(tmp) / "api-keys"
            key = write_key_file(keys, name="demo")     # this run's own key; the client sends it
            cfg.write_text(DEMO_SETTINGS + f"auth:\n  api_keys_file: {json.dumps(str(keys))}\n")
            print(f"redis: {redis_url}")
            return _run(cfg, redis_url, audio, question, Path(args.output), t_start, free_port(), key)
    except KeyboardInterrupt:
        print("\ninterrupted: stack stopped", file=sys.stderr)
        return 130


def _run(cfg: Path, redis_url: str, audio: bytes, question: Path, output: Path, t_start: float, port: int,
         api_key: str) -> int:
    import ray

    from orchestrator.client import Client, audio_progress, print_reply_summary, timed
    from orchestrator.serve import start_stack
    from services.common.redis_server import free_port

    env = {"REDIS_URL": redis_url}
    if os.environ.get("MODEL_PATH"):
        env["MODEL_PATH"] = os.environ["MODEL_PATH"]
    try:
        print("starting the local stack (Ray + five Serve applications) ...")
        start_stack(str(cfg), grpc_port=port, http_port=free_port(), env=env)
        print(f"stack up in {time.monotonic() - t_start:.1f} s; gRPC on 127.0.0.1:{port}")
        client = Client(f"127.0.0.1:{port}", api_key=api_key)
        try:
            sid = client.create_session()
            print(f"\nuser: {question.name} ({len(audio) / 1024:.0f} KiB)\nassistant: ", end="", flush=True)
            reply, wall = timed(client.converse, sid, audio=audio,
                                on_text=lambda t: print(t, end="", flush=True), on_audio=audio_progress)
            print()
            output.write_bytes(reply.wav())
            print_reply_summary(reply, wall)
            print(f"wrote {output} ({reply.seconds:.2f} s of 24 kHz audio)")
        finally:
            client.close()
        return 0
    finally:
        print("shutting down ...", file=sys.stderr)
        ray.shutdown()
