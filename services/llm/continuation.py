"""Continuing a reply whose LLM replica died, from what its caller was already sent.

The LLM stage records, with every text delta, decode job and segment boundary it publishes (in
the same Redis transaction, so the record holds exactly what was published), one item of the
reply so far (`TurnPublisher` makes them; the list `turn:{id}:reply` keeps them, with the
turn's TTL):

    {"k": "t",  "s": segment, "ids": [...]}                 a text delta: the token ids it shows
    {"k": "te", "s": segment, "ids": [...], "r": reason}    a text segment's end: all its ids
    {"k": "a",  "s": segment, "c": chunk, "f": [[...]]}     a decode job: the frames it adds
    {"k": "ae", "s": segment, "n": frames, "r": reason, "e": [...]}   an audio segment's end (and
                                                            its end-of-audio frame, if any)

`decisions` turns them back into the decisions that made them: text tokens, audio frames, and
the end-of-audio frames that close a segment (also one of an audio round that made no frame,
between two text segments), which leave no code in the history. A continuation replays them on
the turn's original prompt (protocol.Sequence._replay), which lays the reply out exactly as the
dead replica had it (§11.2: the host writes over segment ends included) and leaves the sequence
in the state after the last published item; it decides anew from there. Replaying also yields
the replayed decisions' events again: the publisher skips the first `items` of them, those
already published, and publishes the rest (a segment end that the dead replica decided but did
not get out, say). Decisions made but never published are made anew.

Plain Python: no Redis, no model.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence


def item(kind: str, segment: int, **fields) -> bytes:
    return json.dumps({"k": kind, "s": segment, **fields}, separators=(",", ":")).encode()


def decode_items(raw: Sequence[bytes]) -> list[dict]:
    return [json.loads(r) for r in raw]


def continuation_seed(turn_id: str, seed: Optional[int], n: int) -> int:
    """The sampler seed of the turn's n-th continuation (n >= 1): derived from the request's seed
    when it had one (a reproducible turn stays reproducible), else from the turn id; another
    for each continuation, so a reply does not repeat what its dead replica was about to say."""
    base = f"{seed}" if seed is not None else turn_id
    return int.from_bytes(hashlib.sha256(f"{base}:continue:{n}".encode()).digest()[:6], "little")


@dataclass
class Continuation:
    """What to replay, and how many recorded items its events publish again (to skip)."""

    decisions: list[tuple[str, object]] = field(default_factory=list)
    items: int = 0


def decisions(items: Iterable[dict], eoa: int, num_codebooks: int) -> Continuation:
    """The decisions behind the recorded items, in publication order (module docstring).
    eoa: codebook 0's end-of-audio class: an audio round of no frame left no record of its
    end-of-audio frame, and any codes after that class will do (they leave no trace)."""
    end = (eoa,) + (0,) * (num_codebooks - 1)
    out: list[tuple[str, object]] = []
    n = 0
    in_text = 0          # ids of the open text segment replayed so far
    audio_due = False    # a text segment ended and no frame came yet: an audio round is open
    for it in items:
        n += 1
        k = it["k"]
        if k in ("t", "te"):
            if audio_due:                        # that round made no frame (correction 12)
                out.append(("audio", end))
                audio_due = False
            ids = it["ids"][in_text:] if k == "te" else it["ids"]
            out += [("text", int(t)) for t in ids]
            in_text = 0 if k == "te" else in_text + len(ids)
            audio_due = k == "te"
        elif k == "a":
            if not audio_due and not (out and out[-1][0] == "audio"):   # neither a new round nor its rest
                raise ValueError(f"the reply record has audio segment {it['s']} without a text segment before it")
            audio_due = False
            out += [("audio", tuple(int(c) for c in f)) for f in it["f"]]
        elif k == "ae":
            if it["r"] == "eos":                 # ended by its end-of-audio frame
                out.append(("audio", tuple(it.get("e") or end)))
        else:
            raise ValueError(f"unknown item in the reply record: {it}")
    return Continuation(out, n)
