"""`baichuan-audio`: the command-line entry point.

Subcommands import their dependencies lazily so that `--help` is instant and the
benchmarks run on machines that have only torch (no Ray, Redis or gRPC)."""
from __future__ import annotations

import argparse
import sys


def _cmd_make_tiny_checkpoint(args: argparse.Namespace) -> int:
    from services.common.checkpoint import Checkpoint
    from services.common.tiny_checkpoint import write_tiny_checkpoint

    out = write_tiny_checkpoint(args.dir, seed=args.seed)
    ckpt = Checkpoint(out)
    shards = sorted(set(ckpt.weight_map.values()))
    print(f"wrote tiny checkpoint to {out}: {len(ckpt.weight_map)} tensors in {len(shards)} shards, "
          f"tokenizer, generation_config.json, {ckpt.hift_path().name}")
    return 0


# benchmarks that are not a stage's own bench.py
BENCHES = {"llm": "services.llm.bench_engine", "gpu": "orchestrator.bench_gpu", "hops": "orchestrator.bench_hops"}


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    # each benchmark owns its options (`baichuan-audio bench llm --help`)
    module = BENCHES.get(args.stage, f"services.{args.stage}.bench")
    importlib.import_module(module).main(args.args)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from orchestrator.serve import serve_main

    return serve_main(args)


def _cmd_serve_config(args: argparse.Namespace) -> int:
    from orchestrator.serve_config import serve_config_main

    return serve_config_main(args.args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.demo import demo_main

    return demo_main(args)


def _cmd_client(args: argparse.Namespace) -> int:
    from orchestrator.client_cli import client_main

    return client_main(args)


def _cmd_eval(args: argparse.Namespace) -> int:
    from orchestrator.evaluation.cli import eval_main

    return eval_main(args)


def _cmd_load(args: argparse.Namespace) -> int:
    from orchestrator.load import load_main

    return load_main(args)


def _load_args(s: argparse.ArgumentParser) -> None:
    """`load`'s options (here: no import of grpc for --help)."""
    s.add_argument("--sessions", type=int, default=50, help="concurrent sessions (default 50)")
    s.add_argument("--turns", type=int, default=3, help="turns per session (default 3)")
    s.add_argument("--input", help="WAV/FLAC user turn (default: the bundled question)")
    s.add_argument("--text", help="send this typed turn instead of audio")
    s.add_argument("--text-only", action="store_true", help="ask for text-only replies")
    s.add_argument("--low-latency", action="store_true", help="sessions with low_latency_audio")
    s.add_argument("--duration-s", type=float, default=0.0,
                   help="keep starting new sessions until this many seconds have passed (a soak)")
    s.add_argument("--deadline-s", type=float, default=900.0, help="stop whatever is left after this (default 900)")
    s.add_argument("--progress-s", type=float, default=5.0, help="seconds between progress lines")
    s.add_argument("--api-key", help="the API key (else --api-key-file, $BAICHUAN_AUDIO_API_KEY or serve's local key)")
    s.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --address")
    s.add_argument("--rss", action="store_true", help="report the resident memory of the stack's processes at start "
                   "and end (Ray actors through the state API of --ray-address, and redis-server at --redis-url)")
    s.add_argument("--rss-every-s", type=float, default=60.0, help="--rss: also sample this often (default 60)")
    s.add_argument("--ray-address", default="auto", help="the Ray cluster, for --rss (default: auto)")
    s.add_argument("--redis-url", help="the stack's Redis, for --rss")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baichuan-audio", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-tiny-checkpoint", help="write a tiny random checkpoint in the real layout")
    s.add_argument("dir", help="output directory")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_make_tiny_checkpoint)

    s = sub.add_parser("serve", help="run the stack on a local or existing Ray cluster")
    s.add_argument("--config", help="settings YAML (see config/example.yaml)")
    s.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    s.add_argument("--detach", action="store_true", help="return after deploying (existing cluster)")
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("serve-config", help="print the Serve config (RayService serveConfigV2) of a settings file")
    s.add_argument("args", nargs=argparse.REMAINDER, help="SETTINGS [--log-encoding JSON] [--no-access-log] "
                   "[--pool-labels] [-o FILE]")
    s.set_defaults(func=_cmd_serve_config)

    s = sub.add_parser("demo", help="start a local stack, run one spoken turn, write reply.wav")
    s.add_argument("--input", help="a WAV/FLAC question (default: the bundled sample)")
    s.add_argument("-o", "--output", default="reply.wav")
    s.set_defaults(func=_cmd_demo)

    def client_args(s: argparse.ArgumentParser) -> None:
        s.add_argument("--address", default="127.0.0.1:9000", help="gRPC address of the server")
        s.add_argument("--timeout", type=float, default=300.0, help="seconds")
        s.add_argument("--api-key-file", help="file with the API key (a bare key, or `name:key` lines: the first); "
                                              "default: $BAICHUAN_AUDIO_API_KEY, else the key `serve` made "
                                              "(~/.config/baichuan-audio/api-keys)")
        s.add_argument("--tls", action="store_true", help="TLS to a gateway that terminates it")
        s.add_argument("--ca-file", help="CA bundle for --tls (default: the system's)")
        s.add_argument("--cert-file", help="client certificate for mutual TLS (with --key-file)")
        s.add_argument("--key-file", help="client private key for mutual TLS")

    s = sub.add_parser("converse", help="one spoken turn against a running server")
    s.add_argument("input", help="WAV/FLAC file with the user's turn")
    s.add_argument("-o", "--output", default="reply.wav")
    s.add_argument("--session", help="continue this session (default: a new one)")
    s.add_argument("--text-only", action="store_true", help="ask for a text-only reply")
    s.add_argument("--voice", help="system prompt selecting the voice")
    client_args(s)
    s.set_defaults(func=_cmd_client, client="converse")

    s = sub.add_parser("transcribe", help="speech recognition (base-model ASR prompt)")
    s.add_argument("input")
    client_args(s)
    s.set_defaults(func=_cmd_client, client="transcribe")

    s = sub.add_parser("synthesize", help="text to speech (base-model TTS prompt)")
    s.add_argument("text")
    s.add_argument("-o", "--output", default="tts.wav")
    client_args(s)
    s.set_defaults(func=_cmd_client, client="synthesize")

    s = sub.add_parser("eval", help="quality and speed of a running server on a benchmark")
    benches = s.add_subparsers(dest="benchmark", required=True)
    b = benches.add_parser("openaudiobench", help="OpenAudioBench (published layout) through the gRPC API: "
                                                  "records, scores, judge, report")
    from orchestrator.evaluation.cli import add_arguments   # no gRPC, judge or scoring imports: --help stays instant
    add_arguments(b)
    client_args(b)
    b.set_defaults(func=_cmd_eval)

    s = sub.add_parser("load", help="a bounded load generator: N concurrent sessions x T turns against a running "
                                    "stack, checking every audio chunk; prints latency figures and errors")
    client_args(s)
    _load_args(s)
    s.set_defaults(func=_cmd_load)

    s = sub.add_parser("bench", help="benchmarks that print figures: tokenizer, llm, decoder, vocoder, "
                                     "gpu (the whole serving path), hops (Ray/Redis transport)", add_help=False)
    s.add_argument("stage", choices=["tokenizer", "llm", "decoder", "vocoder", "gpu", "hops"])
    s.add_argument("args", nargs=argparse.REMAINDER, help="the stage benchmark's own options (--help)")
    s.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
