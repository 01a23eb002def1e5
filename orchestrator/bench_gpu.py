"""`baichuan-audio bench gpu`: spoken conversations through the serving path on one or more devices.

Every stage runs in its own process, as its deployment's replicas do, with the code that
deployment runs, at the chosen dimensions with random weights: the tokenizer runner (batched
like the tokenizer deployment) and the prompt builder, the LLM engine (decode steps as CUDA
graphs on a GPU, captured at start) with the turn publisher that cuts audio into decode jobs,
the decoder's `decode_pieces` (CFM solves captured at start) and the vocoder runner with each
job's seed and left context, each taking a turn's first audio from its urgent lane first as
their workers do. `--placement` puts each stage on its device (any number of GPUs,
as Ray gives each replica its card in serving); processes on one GPU share the card. Only the
transport differs: multiprocessing queues instead of Serve handles and Redis streams (that hop
is measured on the CPU by `bench hops`).

Conversations arrive as a Poisson process; each is one spoken turn: a question of
`--question-s` seconds, then a reply on a fixed schedule (random weights decide nothing useful:
`--reply` text tokens and audio frames, alternating), in low-latency mode (small first decode
chunk). For each concurrency level it prints:
  engine step times by kind (p50/p95), time to first text and first audio from the end of the
  request (p50/p95) and where the first audio's time goes, each stream's speed against real
  time, the worst playback underrun a real-time player would hear, and the GPU memory each
  stage holds;
and, for the ratio, the reference-style decode loop's audio-frame step in the LLM's process.

Imports only model, runner and engine code (the GPU machine has no Ray, Redis or soundfile).

    python -m orchestrator.bench_gpu --size tiny --concurrency 1,2          # CPU smoke run
    python -m orchestrator.bench_gpu --size real --device cuda --concurrency 1,8,32,64,128,256,512
    python -m orchestrator.bench_gpu --size real --concurrency 64,128,256,512 \\
        --placement gpus=1 --placement gpus=2         # one card against the LLM on its own card
"""
from __future__ import annotations

import argparse
import queue
import random
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from orchestrator.bench_stages import MAX_JOBS, STAGES, Stack, reply_schedule


# ---------------------------------------------------------------------------- placement
def spread(n_gpus: int) -> dict[str, str]:
    """The production layout on n GPUs: the LLM alone on the first card (it is memory-bandwidth
    bound and its step time sets every stream's pace); the decoder, vocoder and tokenizer share
    the others, the decoder (the heaviest of them) first."""
    if n_gpus < 1:
        raise ValueError("--gpus must be at least 1")
    rest = [f"cuda:{i}" for i in range(1, n_gpus)] or ["cuda:0"]
    return {"llm": "cuda:0", **{s: rest[i % len(rest)] for i, s in enumerate(("decoder", "vocoder", "tokenizer"))}}


def placement(spec: str, default: str = "cpu") -> dict[str, str]:
    """'llm=cuda:0,decoder+vocoder+tokenizer=cuda:1' (stages not named run on `default`), or
    'gpus=N' for `spread(N)`. Checks stage names and that each device exists here."""
    spec = spec.strip()
    if spec.startswith("gpus="):
        try:
            out = spread(int(spec[5:]))
        except ValueError as e:
            raise ValueError(f"placement {spec!r}: {e if 'least' in str(e) else 'gpus=N wants a whole number'}") from None
    else:
        out = {s: default for s in STAGES}
        for part in filter(None, (x.strip() for x in spec.split(","))):
            names, eq, dev = part.partition("=")
            if not eq or not dev.strip():
                raise ValueError(f"placement {spec!r}: {part!r} is not STAGE[+STAGE...]=DEVICE")
            for n in names.split("+"):
                if n.strip() not in STAGES:
                    raise ValueError(f"placement {spec!r}: unknown stage {n.strip()!r} (stages: {', '.join(STAGES)})")
                out[n.strip()] = dev.strip()
    for dev in set(out.values()):
        d = torch.device(dev)                        # raises on a malformed device string
        if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"placement {spec!r}: {dev} does not exist here "
                             f"({torch.cuda.device_count()} CUDA device(s) visible)")
    return out


def describe(devices: dict[str, str]) -> str:
    """'llm cuda:0; tokenizer, decoder, vocoder cuda:1' (or 'all on cpu')."""
    by_dev: dict[str, list[str]] = {}
    for s in STAGES:
        by_dev.setdefault(devices[s], []).append(s)
    if len(by_dev) == 1:
        return f"all on {next(iter(by_dev))}"
    return "; ".join(f"{', '.join(by_dev[k])} {k}" for k in sorted(by_dev))


# ---------------------------------------------------------------------------- one conversation
@dataclass
class Turn:
    id: str
    arrival: float                       # the end of the request (the question fully received)
    question: np.ndarray | None
    prompted: float | None = None        # tokenized, prompt submitted to the engine
    first_text: float | None = None      # the engine decided the first text token
    first_job: float | None = None       # the first decode job left the LLM stage
    first_mel: float | None = None       # ... and came out of the decoder
    first_audio: float | None = None
    audio: list[tuple[float, float]] = field(default_factory=list)   # (arrival time, seconds) per PCM piece
    finals: int = 0                      # audio segments whose last piece arrived

    def mark(self, name: str, t: float) -> None:
        if getattr(self, name) is None:
            setattr(self, name, t)

    def underrun(self) -> float:
        """The worst deficit of a player that starts at the first piece and plays in real time:
        when piece k arrives at t_k it should already be playing second t_k - t_0."""
        if not self.audio:
            return 0.0
        t0, have, worst = self.audio[0][0], 0.0, 0.0
        for t, s in self.audio:
            worst = max(worst, (t - t0) - have)
            have += s
        return worst

    def speed(self) -> float:
        """Audio seconds delivered per second of wall time from the first piece to the last."""
        if len(self.audio) < 2:
            return float("inf")
        return sum(s for _, s in self.audio) / max(1e-9, self.audio[-1][0] - self.audio[0][0])


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else float("nan")


def run_level(stack: Stack, C: int, rate: float, question_s: float, reply: str, seed: int = 0,
              timeout_s: float = 600.0) -> dict:
    """C conversations arriving at `rate` per second; returns the measurements."""
    rng = random.Random(seed)
    audio_segments = sum(1 for k, _ in reply_schedule(reply) if k == "audio")
    sr = stack.info["tokenizer"]["sampling_rate"]
    g = np.random.default_rng(seed)
    turns, t = [], 0.0
    for i in range(C):
        q = (0.1 * g.standard_normal((1, int(question_s * sr)))).astype(np.float32)
        turns.append(Turn(f"c{C}s{seed}t{i}", t, q))
        t += rng.expovariate(rate) if rate > 0 else 0.0
    by_id = {tr.id: tr for tr in turns}
    # the audio goes to the tokenizer's process ahead of time: a question's arrival sends only its
    # id. Sent at arrival (320 KB each through a pipe), the driver's GIL-bound queue feeder, not
    # the tokenizer, set the pace above ~40 arrivals per second (bench hops measures transport)
    for tr in turns:
        stack.inboxes["tokenizer"].put(("question", tr.id, tr.question))
    stack.inboxes["tokenizer"].put("staged")
    stack.wait_for("staged", time.perf_counter() + 120)
    t0 = time.perf_counter() + 0.2
    for tr in turns:
        tr.arrival += t0
    deadline = time.perf_counter() + timeout_s
    pending, finished = deque(enumerate(turns)), 0
    while finished < C:
        now = time.perf_counter()
        while pending and pending[0][1].arrival <= now:   # the request ends: the client's question is in
            i, tr = pending.popleft()
            stack.inboxes["tokenizer"].put((tr.id, seed * 100_003 + i))
            tr.arrival = time.perf_counter()
        try:
            m = stack.marks.get(timeout=max(0.0005, min(0.01, pending[0][1].arrival - now)) if pending else 0.05)
        except queue.Empty:
            if time.perf_counter() > deadline:
                break
            continue
        if m[0] == "error":
            raise RuntimeError(f"bench gpu: the {m[1]} stage failed:\n{m[2]}")
        tr = by_id.get(m[1]) if len(m) > 1 else None
        if tr is None:
            continue
        if m[0] == "audio":
            tr.mark("first_audio", m[2])
            tr.audio.append((m[2], m[3]))
            tr.finals += m[4]
            finished += tr.finals == audio_segments and m[4]
        else:
            tr.mark(m[0], m[2])
    st = stack.stats(("llm", "tokenizer", "decoder", "vocoder"), time.perf_counter() + 60)
    done = [tr for tr in turns if tr.finals == audio_segments]
    by_kind = {}
    for k in ("audio", "text", "mixed", "prefill"):
        ts = [x for kk, x, _ in st["llm"]["steps"] if kk == k]
        if ts:
            by_kind[k] = (_pct(ts, 0.5), _pct(ts, 0.95), len(ts))
    marks = {name: _pct([getattr(tr, name) - tr.arrival for tr in done if getattr(tr, name) is not None], 0.5)
             for name in ("prompted", "first_text", "first_job", "first_mel", "first_audio")}
    ttfa = [tr.first_audio - tr.arrival for tr in done]
    ttft = [tr.first_text - tr.arrival for tr in done if tr.first_text is not None]
    return {"C": C, "completed": len(done), "steps": by_kind, "marks": marks,
            "ttft": (_pct(ttft, 0.5), _pct(ttft, 0.95)), "ttfa": (_pct(ttfa, 0.5), _pct(ttfa, 0.95)),
            "speed": (_pct([tr.speed() for tr in done], 0.5), min((tr.speed() for tr in done), default=float("nan"))),
            "underrun": max((tr.underrun() for tr in done), default=float("nan")),
            "max_rows": max((r for *_, r in st["llm"]["steps"]), default=0),
            "stages": {n: stage_load(st[n]["batches"], time.perf_counter() - t0)
                       for n in ("tokenizer", "decoder", "vocoder")},
            "captures": {"llm": st["llm"]["captures"], "decoder": st["decoder"]["captures"]}}


def stage_load(batches: list[tuple], wall_s: float) -> dict:
    """A work stage's batches during a level: how many, their mean size, p50 time and the
    share of the level's wall time the stage was busy (near 1: the stage is the queue)."""
    busy = [sum(b[1:]) for b in batches]
    out = {"batches": len(batches), "mean_rows": sum(b[0] for b in batches) / max(1, len(batches)),
           "p50_ms": _pct(busy, 0.5) * 1e3 if busy else float("nan"), "busy": sum(busy) / max(wall_s, 1e-9)}
    if batches and len(batches[0]) == 3:             # the tokenizer: the prompts' share, per turn
        out["prompt_ms_per_row"] = 1e3 * sum(b[2] for b in batches) / max(1, sum(b[0] for b in batches))
    return out


# ---------------------------------------------------------------------------- report
def bench_gpu(size: str = "tiny", device: str = "cpu", concurrency=(1, 2), rate: float = 0.0,
              question_s: float = 5.0, reply: str = "8,60,4,40", attn: str | None = None,
              reference: bool = True, max_batch: int = 512, placements: list[dict[str, str]] | None = None,
              compile_backend: str | None = None, work_batch: int = MAX_JOBS, print_fn=print) -> list[dict]:
    """Runs every concurrency level once per placement (stage -> device; default: every stage on
    `device`) and, with several placements, prints them side by side. Returns the rows, each
    with its placement."""
    placements = placements or [{s: device for s in STAGES}]
    sched = reply_schedule(reply)
    audio_s = 0.08 * sum(n for k, n in sched if k == "audio")
    print_fn(f"# bench gpu: {size} dimensions, random weights; one process per stage")
    print_fn(f"# each conversation: a {question_s:g} s spoken question, then a forced reply {sched} "
             f"({audio_s:.1f} s of audio), low-latency decoding; arrivals Poisson at "
             f"{'C/2' if rate <= 0 else rate} per second; decode and vocode batches of up to {work_batch} jobs")
    runs = [_bench_placement(devices, size, concurrency, rate, question_s, reply, attn, reference, max_batch,
                             compile_backend, work_batch, print_fn) for devices in placements]
    if len(runs) > 1:
        print_fn("# side by side: first audio p50/p95 s, speed p50/min x, underrun s")
        print_fn(f"{'C':>4} | " + " | ".join(f"{describe(d):>40}" for d in placements))
        for i, C in enumerate(concurrency):
            print_fn(f"{C:>4} | " + " | ".join(f"{side_by_side(run[i]):>40}" for run in runs))
    return [r for run in runs for r in run]


def side_by_side(r: dict) -> str:
    return f"{r['ttfa'][0]:6.3f}/{r['ttfa'][1]:6.3f} {r['speed'][0]:5.2f}/{r['speed'][1]:5.2f}x {r['underrun']:6.3f}"


def _bench_placement(devices, size, concurrency, rate, question_s, reply, attn, reference, max_batch,
                     compile_backend, work_batch, print_fn) -> list[dict]:
    llm_dev = torch.device(devices["llm"])
    attn = attn or ("sdpa" if llm_dev.type == "cuda" else "math")
    cards = {d: (torch.cuda.get_device_name(torch.device(d)) if torch.device(d).type == "cuda" else "CPU")
             for d in dict.fromkeys(devices.values())}
    print_fn(f"## placement: {describe(devices)} ({', '.join(f'{d} {n}' for d, n in cards.items())}); "
             f"LLM attention {attn}")
    t = time.perf_counter()
    stack = Stack({"size": size, "devices": devices, "attn": attn, "slots": max(concurrency), "max_batch": max_batch,
                   "question_s": question_s, "reply": reply, "compile": compile_backend, "work_batch": work_batch})
    try:
        llm, dec = stack.info["llm"], stack.info["decoder"]
        print_fn(f"# stages up in {time.perf_counter() - t:.1f} s; LLM engine: {llm['slots']} KV slots of "
                 f"{llm['max_len']} tokens ({llm['kv_gib']:.2f} GiB), batch ladder {llm['ladder']}, KV ladder "
                 f"{llm['kv_ladder']}, warm-up {llm['start_s']:.1f} s; decoder: {dec['shapes']} CFM solve shapes "
                 f"captured in {dec['start_s']:.1f} s")
        if any(torch.device(d).type == "cuda" for d in devices.values()):
            print_fn("# GPU memory: " + ", ".join(f"{k} {v:.2f} GiB ({devices[k.split()[0]]})"
                                                  for k, v in stack.memory.items()))
        # one untimed turn first: allocator pools, lazy initialisations
        run_level(stack, min(2, max(concurrency)), 10.0, question_s, reply, seed=99)
        print_fn(f"{'C':>4} {'done':>4} | {'audio step p50/p95 ms':>21} {'text step':>15} | "
                 f"{'first text p50/p95 s':>20} {'first audio p50/p95 s':>21} | {'speed p50/min':>13} | "
                 f"{'underrun s':>10}")
        rows = []
        for C in concurrency:
            r = run_level(stack, C, rate if rate > 0 else max(1.0, C / 2.0), question_s, reply)
            r["placement"] = devices
            rows.append(r)
            st = r["steps"]

            def ms(k):
                return f"{st[k][0] * 1e3:7.2f}/{st[k][1] * 1e3:7.2f}" if k in st else f"{'-':>15}"
            print_fn(f"{C:>4} {r['completed']:>4} | {ms('audio'):>21} {ms('text'):>15} | "
                     f"{r['ttft'][0]:9.3f}/{r['ttft'][1]:9.3f} {r['ttfa'][0]:10.3f}/{r['ttfa'][1]:9.3f} | "
                     f"{r['speed'][0]:6.2f}/{r['speed'][1]:5.2f}x | {r['underrun']:10.3f}")
            print_fn("       p50 s after the request: " + ", ".join(f"{k} {v:.3f}" for k, v in r["marks"].items())
                     + f"; largest step {r['max_rows']} rows; graph captures during the level: {r['captures']}")
            print_fn("       stages: " + ", ".join(
                f"{n} {v['batches']} batches of {v['mean_rows']:.1f}, p50 {v['p50_ms']:.1f} ms, busy {v['busy']:.0%}"
                + (f" (prompt {v['prompt_ms_per_row']:.1f} ms/turn)" if "prompt_ms_per_row" in v else "")
                for n, v in r["stages"].items()))
        if reference:
            ref = stack.stats(("reference",), time.perf_counter() + 600)["reference"]
            ours = rows[0]["steps"].get("audio", (float("nan"),))[0]
            print_fn(f"# reference-style loop (per-layer torch.cat cache, full audio-head re-run per codebook, "
                     f"host sampling), batch 1, 512 cached: audio frame {ref['ref_audio_s'] * 1e3:.1f} ms; "
                     f"the serving engine at C={rows[0]['C']}: {ours * 1e3:.2f} ms "
                     f"({ref['ref_audio_s'] / ours:.1f}x)")
    finally:
        stack.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "real"], default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", default="1,2", help="comma-separated conversation counts")
    p.add_argument("--rate", type=float, default=0.0, help="arrivals per second (default C/2)")
    p.add_argument("--question-s", type=float, default=5.0)
    p.add_argument("--reply", default="8,60,4,40", help="text tokens, audio frames, ... (alternating)")
    p.add_argument("--attn", choices=["math", "sdpa"], default=None)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--max-batch", type=int, default=512, help="the engine's largest decode batch")
    p.add_argument("--compile", default=None, metavar="BACKEND",
                   help="the LLM's decode pieces compiled with this torch.compile backend (llm.compile_backend)")
    p.add_argument("--work-batch", type=int, default=MAX_JOBS,
                   help="decode and vocode jobs per batch (stages.decoder/vocoder.max_batch_size)")
    p.add_argument("--placement", action="append", metavar="SPEC",
                   help="stages per device, e.g. 'llm=cuda:0,decoder+vocoder+tokenizer=cuda:1', or 'gpus=N' "
                        "(the LLM alone on cuda:0, the other stages over the other cards); stages not named "
                        "run on --device. Repeat to compare layouts side by side in one run")
    a = p.parse_args(argv)
    try:
        places = [placement(x, a.device) for x in a.placement] if a.placement else None
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    bench_gpu(a.size, a.device, tuple(int(c) for c in a.concurrency.split(",")), a.rate, a.question_s,
              a.reply, a.attn, reference=not a.no_reference, max_batch=a.max_batch, placements=places,
              compile_backend=a.compile, work_batch=a.work_batch)


if __name__ == "__main__":
    main()
