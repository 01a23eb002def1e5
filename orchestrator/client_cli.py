"""`baichuan-audio converse | transcribe | synthesize` against a running server."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from orchestrator.client import (
    Client, audio_progress, channel_credentials, find_api_key, print_reply_summary, timed,
)


def connect(args: argparse.Namespace) -> Client:
    """A client from the common options (address, key, TLS); OSError or ValueError when a file
    named there cannot be read."""
    key = find_api_key(args.api_key_file)
    tls = args.tls or args.ca_file or args.cert_file or args.key_file
    creds = channel_credentials(args.ca_file, args.cert_file, args.key_file) if tls else None
    return Client(args.address, timeout=args.timeout, api_key=key, credentials=creds)


def client_main(args: argparse.Namespace) -> int:
    try:
        client = connect(args)
    except (OSError, ValueError) as e:        # KeyRingError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        if args.client == "converse":
            sid = args.session or client.create_session(text_only=args.text_only, voice=args.voice)
            print(f"session {sid}", file=sys.stderr)
            reply, wall = timed(client.converse, sid, audio=Path(args.input).read_bytes(),
                                on_text=lambda t: print(t, end="", flush=True), on_audio=audio_progress)
            print()
            if reply.pcm16:
                Path(args.output).write_bytes(reply.wav())
                print(f"wrote {args.output} ({reply.seconds:.2f} s)", file=sys.stderr)
            print_reply_summary(reply, wall)
        elif args.client == "transcribe":
            r = client.transcribe(Path(args.input).read_bytes())
            print(r.text)
        elif args.client == "synthesize":
            reply, wall = timed(client.synthesize, args.text, on_audio=audio_progress)
            Path(args.output).write_bytes(reply.wav())
            print(f"\nwrote {args.output} ({reply.seconds:.2f} s)", file=sys.stderr)
        return 0
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
