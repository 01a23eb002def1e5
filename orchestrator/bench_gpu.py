"""`baichuan-audio bench gpu`: spoken conversations through the serving path on one device.

In one process, at the chosen dimensions with random weights, every stage runs the code its
deployment runs: the tokenizer runner (batched like the tokenizer deployment), the prompt
builder, the LLM engine (decode steps as CUDA graphs on a GPU) with the turn publisher that
cuts audio into decode jobs, the decoder's `decode_pieces` on those jobs and the vocoder runner
with each job's seed and left context. Only the transport differs: in-process queues instead of
Serve handles and Redis streams (the hop that `--hops` would add is measured on the CPU
elsewhere). Each stage runs on its own thread and CUDA stream, so decoding overlaps LLM steps.

Conversations arrive as a Poisson process; each is one spoken turn: a question of
`--question-s` seconds, then a reply on a fixed schedule (random weights decide nothing useful:
`--reply` text tokens and audio frames, alternating), in low-latency mode (small first decode
chunk). For each concurrency level it prints:
  engine step times by kind (p50/p95), time to first text and first audio from the end of the
  request (p50/p95), each stream's speed against real time, the worst playback underrun a
  real-time player would hear, and the GPU memory each stage holds;
and, for the ratio, the reference-style decode loop's audio-frame step in the same process.

Imports only model, runner and engine code (the GPU machine has no Ray, Redis or soundfile).

    python -m orchestrator.bench_gpu --size tiny --concurrency 1,2          # CPU smoke run
    python -m orchestrator.bench_gpu --size real --device cuda --concurrency 1,8,32,64,128,256
"""
from __future__ import annotations

import argparse
import queue
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.common.dtypes import default_dtype
from services.common.model_config import HiFTConfig, ModelConfig
from services.common.tiny_checkpoint import TINY_HIFT, random_hift_state, tiny_config_dict
from services.decoder.bench import decoder_config, random_tensors
from services.decoder.runner import DecoderRunner
from services.decoder.streaming import decode_pieces
from services.llm.bench import build_model
from services.llm.bench_engine import bench_config, make_tokenizer
from services.llm.engine import Engine, EngineConfig, Request
from services.llm.prompts import Audio, Message, PromptBuilder, ProtocolTokens
from services.llm.publisher import ChunkPolicy, TurnPublisher
from services.tokenizer.bench import real_config
from services.tokenizer.runner import TokenizerRunner
from services.vocoder.runner import VocoderRunner


# ---------------------------------------------------------------------------- the model
@dataclass
class Stack:
    device: torch.device
    tokenizer: TokenizerRunner
    llm_config: ModelConfig
    model: object
    text_tokenizer: object
    prompts: PromptBuilder
    decoder: DecoderRunner
    vocoder: VocoderRunner
    memory: dict[str, float] = field(default_factory=dict)      # GiB per stage


def _allocated(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def build_stack(size: str, device: torch.device, tmp: Path, attn: str) -> Stack:
    """Random weights at `size` ("tiny": the tiny checkpoint's dimensions, for the CPU; "real":
    Baichuan-Audio's). Every stage's codebooks are the same, so codes flow between them."""
    mem, before = {}, _allocated(device)
    if size == "tiny":
        tiny = ModelConfig.from_dict(tiny_config_dict())
        tok_cfg, llm_cfg, dec_cfg, hift_cfg = tiny, tiny, tiny, TINY_HIFT
    else:
        tok_cfg = ModelConfig.from_dict(real_config())
        llm_cfg = bench_config("qwen7b")
        dec_cfg, hift_cfg = decoder_config("real"), HiFTConfig()
    tokenizer = TokenizerRunner(tok_cfg, None, device=device)
    mem["tokenizer"], before = _allocated(device) - before, _allocated(device)
    dtype = default_dtype(device)
    model = build_model(llm_cfg, device, dtype, attn, seed=0)
    mem["llm weights"], before = _allocated(device) - before, _allocated(device)
    decoder = DecoderRunner(dec_cfg, random_tensors(dec_cfg), device=device, max_batch=16)
    mem["decoder"], before = _allocated(device) - before, _allocated(device)
    vocoder = VocoderRunner(hift_cfg, random_hift_state(hift_cfg, 0), device=device, max_batch=16)
    mem["vocoder"] = _allocated(device) - before
    text_tok = make_tokenizer(llm_cfg, tmp)
    prompts = PromptBuilder(text_tok, ProtocolTokens.from_tokenizer(text_tok, llm_cfg), llm_cfg.audio.num_codebooks)
    return Stack(device, tokenizer, llm_cfg, model, text_tok, prompts, decoder, vocoder, mem)


# ---------------------------------------------------------------------------- one conversation
@dataclass
class Turn:
    id: str
    arrival: float                       # the end of the request (the question fully received)
    question: torch.Tensor
    first_text: float | None = None
    first_audio: float | None = None
    audio: list[tuple[float, float]] = field(default_factory=list)   # (arrival time, seconds) per PCM piece
    finals: int = 0                      # audio segments whose last piece arrived
    done: threading.Event = field(default_factory=threading.Event)
    publisher: TurnPublisher | None = None

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


def _schedule(spec: str) -> list[tuple[str, int]]:
    """'8,60,4,40' -> text 8 tokens, audio 60 frames, text 4, audio 40."""
    n = [int(x) for x in spec.split(",")]
    return [("text" if i % 2 == 0 else "audio", k) for i, k in enumerate(n)]


# ---------------------------------------------------------------------------- one run
def run_level(stack: Stack, C: int, rate: float, question_s: float, reply: str, seed: int = 0,
              max_batch: int = 256, timeout_s: float = 600.0) -> dict:
    """C conversations arriving at `rate` per second; returns the measurements."""
    dev = stack.device
    rng = random.Random(seed)
    schedule = _schedule(reply)
    frames_total = sum(n for k, n in schedule if k == "audio")
    audio_segments = sum(1 for k, _ in schedule if k == "audio")
    sr_q = stack.tokenizer.audio.sampling_rate
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter() + 0.5
    arrivals, t = [], t0
    for i in range(C):
        arrivals.append(t)
        t += rng.expovariate(rate) if rate > 0 else 0.0
    turns = [Turn(f"t{i}", a, 0.1 * torch.randn(1, int(question_s * sr_q), generator=g)) for i, a in enumerate(arrivals)]
    seeds = {tr.id: seed * 100_003 + i for i, tr in enumerate(turns)}
    by_id = {tr.id: tr for tr in turns}

    prompt_len = len(stack.prompts.chat([Message("user", [Audio(torch.zeros(
        max(1, round(question_s * 12.5)), stack.llm_config.audio.num_codebooks, dtype=torch.long))])]).ids)
    max_len = prompt_len + len(schedule) + frames_total + sum(n for k, n in schedule if k == "text") + 64
    engine = Engine(stack.model, stack.text_tokenizer, config=EngineConfig(
        num_slots=C, max_len=max_len, prefill_budget=2048, max_batch=min(C, max_batch)))
    if dev.type == "cuda":
        engine.warm_up()                                 # as the LLM deployment does at start
    streams = {name: torch.cuda.Stream(dev) if dev.type == "cuda" else None for name in ("tok", "llm", "dec", "voc")}
    dec_q: "queue.Queue" = queue.Queue()
    voc_q: "queue.Queue" = queue.Queue()
    stop = threading.Event()
    steps: list[tuple[str, float]] = []
    errors: list[BaseException] = []
    rate_hz = stack.vocoder.config.sampling_rate

    def stream_ctx(name):
        s = streams[name]
        return torch.cuda.stream(s) if s is not None else _null()

    def emit_for(turn: Turn):
        def emit(target: str, entry) -> None:           # what the LLM deployment sends on
            if target == "llm":
                if entry.TYPE == "text" and turn.first_text is None:
                    turn.first_text = time.perf_counter()
            else:
                dec_q.put(entry)
        return emit

    def on_event(ev) -> None:                          # the deployment's per-turn forwarder
        tr = by_id.get(ev.request_id)
        if tr is not None and tr.publisher is not None:
            tr.publisher.feed(ev)

    engine.on_event = on_event

    def tokenizer_loop():
        pending = list(turns)
        with stream_ctx("tok"):
            while pending and not stop.is_set():
                now = time.perf_counter()
                ready = [tr for tr in pending if tr.arrival <= now]
                if not ready:
                    time.sleep(min(0.002, max(0.0, pending[0].arrival - now)))
                    continue
                pending = [tr for tr in pending if tr.arrival > now]
                codes = stack.tokenizer.tokenize([(tr.question, sr_q) for tr in ready])   # one batch, like @serve.batch
                for tr, c in zip(ready, codes):
                    p = stack.prompts.chat([Message("user", [Audio(c)])], spoken=True)
                    tr.publisher = TurnPublisher(tr.id, tr.id, emit_for(tr), chunks=ChunkPolicy(4, 2.0, 50),
                                                 seed=seeds[tr.id])
                    engine.submit(Request(p.ids, mode="spoken", audio_codes=p.audio_codes, forced=schedule,
                                          seed=seeds[tr.id], request_id=tr.id))

    def engine_loop():
        with stream_ctx("llm"):
            while not stop.is_set():
                before = dict(engine.stats)
                s = time.perf_counter()
                busy = engine.step()
                if not busy:
                    time.sleep(0.0005)
                    continue
                el = time.perf_counter() - s
                d = {k: engine.stats[k] - before[k] for k in ("text_decisions", "audio_frames", "forward_tokens")}
                rows = d["text_decisions"] + d["audio_frames"]
                kind = ("prefill" if d["forward_tokens"] > rows + 1 else
                        "audio" if d["audio_frames"] and not d["text_decisions"] else
                        "text" if d["text_decisions"] and not d["audio_frames"] else "mixed")
                steps.append((kind, el))

    def decoder_loop():
        with stream_ctx("dec"):
            while not stop.is_set():
                jobs = _take(dec_q, stack.decoder.max_batch)
                if not jobs:
                    continue
                pieces = [(j.codes.tensor("int64"), j.context_frames, j.seed) for j in jobs]
                for j, (mel, vctx) in zip(jobs, decode_pieces(stack.decoder, pieces)):
                    voc_q.put((j, mel, vctx))

    def vocoder_loop():
        with stream_ctx("voc"):
            while not stop.is_set():
                items = _take(voc_q, stack.vocoder.max_batch)
                if not items:
                    continue
                waves = stack.vocoder.vocode([m for _, m, _ in items], seed=[j.seed for j, _, _ in items],
                                             context_frames=[c for _, _, c in items])
                now = time.perf_counter()
                for (j, _, _), w in zip(items, waves):
                    tr = by_id[j.turn_id]
                    if tr.first_audio is None:
                        tr.first_audio = now
                    tr.audio.append((now, w.shape[-1] / rate_hz))
                    tr.finals += j.final
                    if tr.finals == audio_segments:          # the last chunk of the last segment
                        tr.done.set()

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported after the run
                errors.append(e)
                stop.set()
        return run

    threads = [threading.Thread(target=guard(f), daemon=True)
               for f in (tokenizer_loop, engine_loop, decoder_loop, vocoder_loop)]
    for th in threads:
        th.start()
    deadline = time.perf_counter() + timeout_s
    for tr in turns:
        while not tr.done.wait(0.05):
            if errors or time.perf_counter() > deadline:
                break
    stop.set()
    for th in threads:
        th.join(timeout=30)
    if errors:
        raise errors[0]
    done = [tr for tr in turns if tr.done.is_set()]

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else float("nan")

    by_kind = {}
    for k in ("audio", "text", "mixed", "prefill"):
        ts = [t for kk, t in steps if kk == k]
        if ts:
            by_kind[k] = (pct(ts, 0.5), pct(ts, 0.95), len(ts))
    ttfa = [tr.first_audio - tr.arrival for tr in done]
    ttft = [tr.first_text - tr.arrival for tr in done if tr.first_text is not None]
    out = {"C": C, "completed": len(done), "steps": by_kind,
           "ttft": (pct(ttft, 0.5), pct(ttft, 0.95)), "ttfa": (pct(ttfa, 0.5), pct(ttfa, 0.95)),
           "speed": (pct([tr.speed() for tr in done], 0.5), min((tr.speed() for tr in done), default=float("nan"))),
           "underrun": max((tr.underrun() for tr in done), default=float("nan")),
           "kv_gib": engine.cache.nbytes() / 2**30, "graphs": engine.runner.stats.copy()}
    return out


def _take(q: "queue.Queue", n: int) -> list:
    """Up to n items: what a worker claims at once (waits briefly for the first)."""
    try:
        items = [q.get(timeout=0.01)]
    except queue.Empty:
        return []
    while len(items) < n:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            break
    return items


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------------------- report
def bench_gpu(size: str = "tiny", device: str = "cpu", concurrency=(1, 2), rate: float = 0.0,
              question_s: float = 5.0, reply: str = "8,60,4,40", attn: str | None = None,
              reference: bool = True, print_fn=print) -> list[dict]:
    dev = torch.device(device)
    attn = attn or ("sdpa" if dev.type == "cuda" else "math")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        stack = build_stack(size, dev, Path(tmp), attn)
        mem = ", ".join(f"{k} {v:.2f} GiB" for k, v in stack.memory.items())
        sched = _schedule(reply)
        audio_s = 0.08 * sum(n for k, n in sched if k == "audio")
        print_fn(f"# bench gpu: {size} dimensions, random weights, {dev} ({name}), LLM attention {attn}")
        print_fn(f"# each conversation: a {question_s:g} s spoken question, then a forced reply {sched} "
                 f"({audio_s:.1f} s of audio), low-latency decoding; arrivals Poisson at "
                 f"{'C/2' if rate <= 0 else rate} per second")
        print_fn(f"# GPU memory: {mem}" if dev.type == "cuda" else "# (CPU run: no GPU memory)")
        print_fn(f"{'C':>4} {'done':>4} | {'audio step p50/p95 ms':>21} {'text step':>15} | "
                 f"{'first text p50/p95 s':>20} {'first audio p50/p95 s':>21} | {'speed p50/min':>13} | "
                 f"{'underrun s':>10} | {'KV GiB':>6}")
        # graphs are captured the first time a shape runs: once, untimed, before the levels
        run_level(stack, min(2, max(concurrency)), 10.0, question_s, reply, seed=99)
        rows = []
        for C in concurrency:
            r = run_level(stack, C, rate if rate > 0 else max(1.0, C / 2.0), question_s, reply)
            rows.append(r)
            st = r["steps"]

            def ms(k):
                return f"{st[k][0] * 1e3:7.2f}/{st[k][1] * 1e3:7.2f}" if k in st else f"{'-':>15}"
            print_fn(f"{C:>4} {r['completed']:>4} | {ms('audio'):>21} {ms('text'):>15} | "
                     f"{r['ttft'][0]:9.3f}/{r['ttft'][1]:9.3f} {r['ttfa'][0]:10.3f}/{r['ttfa'][1]:9.3f} | "
                     f"{r['speed'][0]:6.2f}/{r['speed'][1]:5.2f}x | {r['underrun']:10.3f} | {r['kv_gib']:6.2f}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if reference:
            from services.llm.bench import reference_steps
            ref = reference_steps(stack.model, 1, 512, 3, 1)
            ours = rows[0]["steps"].get("audio", (float("nan"),))[0]
            print_fn(f"# reference-style loop (per-layer torch.cat cache, full audio-head re-run per codebook, "
                     f"host sampling), batch 1, 512 cached: audio frame {ref['ref_audio_s'] * 1e3:.1f} ms; "
                     f"the serving engine at C={rows[0]['C']}: {ours * 1e3:.2f} ms "
                     f"({ref['ref_audio_s'] / ours:.1f}x)")
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
    a = p.parse_args(argv)
    if not a.device.startswith("cuda"):
        torch.set_num_threads(1)
    bench_gpu(a.size, a.device, tuple(int(c) for c in a.concurrency.split(",")), a.rate, a.question_s,
              a.reply, a.attn, reference=not a.no_reference)


if __name__ == "__main__":
    main()
