"""The stage processes of `bench gpu` (orchestrator/bench_gpu.py): each builds its stage with the
code its deployment runs and serves a multiprocessing queue; `Stack` starts the four and joins
them tokenizer -> llm -> decoder -> vocoder. Imports only model, runner and engine code."""
from __future__ import annotations

from collections import deque
import multiprocessing as mp
import queue
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from services.common.dtypes import default_dtype
from services.common.entries import URGENT, VOCODER_JOBS, next_lane
from services.common.model_config import HiFTConfig, ModelConfig
from services.common.tiny_checkpoint import TINY_HIFT, random_hift_state, tiny_config_dict
from services.decoder.bench import decoder_config, random_tensors
from services.decoder.runner import DecoderRunner
from services.decoder.streaming import decode_pieces
from services.llm.bench import build_model, reference_steps
from services.llm.bench_engine import bench_config, make_tokenizer
from services.llm.engine import Engine, EngineConfig, Request
from services.llm.kv_cache import KVCache
from services.llm.prompts import Audio, Message, PromptBuilder, ProtocolTokens
from services.llm.protocol import TextToken
from services.llm.publisher import ChunkPolicy, TurnPublisher
from services.tokenizer.bench import real_config
from services.tokenizer.runner import TokenizerRunner
from services.vocoder.runner import VocoderRunner

STAGES = ("tokenizer", "llm", "decoder", "vocoder")
MAX_JOBS = 16                    # jobs per batch: the prod overlay's decoder and vocoder max_batch_size


def reply_schedule(spec: str) -> list[tuple[str, int]]:
    """'8,60,4,40' -> text 8 tokens, audio 60 frames, text 4, audio 40."""
    n = [int(x) for x in spec.split(",")]
    return [("text" if i % 2 == 0 else "audio", k) for i, k in enumerate(n)]


# ---------------------------------------------------------------------------- the stages
def _configs(size: str) -> tuple[ModelConfig, ModelConfig, ModelConfig, HiFTConfig]:
    """(tokenizer, LLM, decoder, vocoder) configs: the tiny checkpoint's dimensions (for the
    CPU) or Baichuan-Audio's. Every stage's codebooks are the same, so codes flow between them."""
    if size == "tiny":
        tiny = ModelConfig.from_dict(tiny_config_dict())
        return tiny, tiny, tiny, TINY_HIFT
    return ModelConfig.from_dict(real_config()), bench_config("qwen7b"), decoder_config("real"), HiFTConfig()


def _allocated(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _prompts(llm_cfg: ModelConfig, tmp: Path) -> tuple[object, PromptBuilder]:
    tok = make_tokenizer(llm_cfg, tmp)
    return tok, PromptBuilder(tok, ProtocolTokens.from_tokenizer(tok, llm_cfg), llm_cfg.audio.num_codebooks)


def max_context(prompts: PromptBuilder, llm_cfg: ModelConfig, question_s: float, reply: str) -> int:
    """KV tokens one conversation of the benchmark needs (prompt, reply, slack)."""
    sched = reply_schedule(reply)
    frames = max(1, round(question_s * 12.5))
    prompt_len = len(prompts.chat([Message("user", [Audio(torch.zeros(
        frames, llm_cfg.audio.num_codebooks, dtype=torch.long))])]).ids)
    return prompt_len + len(sched) + sum(n for _, n in sched) + 64


def _take(q, n: int, wait: float = 0.01) -> list:
    """Up to n items: what a worker claims at once (waits briefly for the first)."""
    try:
        items = [q.get(timeout=wait)]
    except queue.Empty:
        return []
    while len(items) < n and items[-1] is not None and not isinstance(items[-1], str):
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            break
    return items


class Lanes:
    """A work stream's jobs as the stage's worker claims them (worker.run_worker over
    entries.lanes): the urgent lane (a turn's first audio) before the rest, each in order."""

    def __init__(self):
        self.urgent: deque = deque()
        self.rest: deque = deque()
        self.control: list = []                      # None (stop) and "flush" requests

    def claim(self, inbox, n: int, wait: float = 0.01) -> list[tuple[str, object]]:
        """Everything waiting in `inbox` joins its lane; then up to n (lane, job) pairs."""
        items: list = []
        try:
            if not (self.urgent or self.rest):
                items.append(inbox.get(timeout=wait))
            while True:
                items.append(inbox.get_nowait())
        except queue.Empty:
            pass
        for it in items:
            if it is None or isinstance(it, str):
                self.control.append(it)
            else:
                (self.urgent if it[0].endswith(URGENT) else self.rest).append(it)
        out = []
        while len(out) < n and (self.urgent or self.rest):
            out.append((self.urgent or self.rest).popleft())
        return out


def _stage(name: str, opts: dict, inbox, outbox, marks) -> None:
    """One stage's process: build it (reporting its GPU memory), then serve its inbox until None.
    The string "flush" asks for the stage's statistics since the last flush."""
    dev = torch.device(opts["devices"][name])
    if dev.type == "cuda":
        if dev.index is not None:                    # a bare "cuda" is the current card already
            torch.cuda.set_device(dev)               # graphs, pools and streams on the stage's card
    else:
        torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tok_cfg, llm_cfg, dec_cfg, hift_cfg = _configs(opts["size"])
            {"tokenizer": _tokenizer_stage, "llm": _llm_stage, "decoder": _decoder_stage,
             "vocoder": _vocoder_stage}[name](opts, dev, Path(tmp), (tok_cfg, llm_cfg, dec_cfg, hift_cfg),
                                              inbox, outbox, marks)
    except BaseException:  # noqa: BLE001 - the parent reports it
        marks.put(("error", name, traceback.format_exc()))


def _tokenizer_stage(opts, dev, tmp, cfgs, inbox, outbox, marks) -> None:
    tok_cfg, llm_cfg = cfgs[0], cfgs[1]
    runner = TokenizerRunner(tok_cfg, None, device=dev)
    _, prompts = _prompts(llm_cfg, tmp)
    sr = runner.audio.sampling_rate
    marks.put(("ready", "tokenizer", {"tokenizer": _allocated(dev)}, {"sampling_rate": sr}))
    batches: list[tuple[int, float, float]] = []     # (turns, encode s, prompts s) per batch
    questions: dict[str, np.ndarray] = {}             # sent ahead of their arrival (see run_level)
    while True:
        items = _take(inbox, MAX_JOBS, wait=0.05)
        for m in items:
            if isinstance(m, tuple) and m[0] == "question":
                questions[m[1]] = m[2]
        turns = [(m[0], questions.pop(m[0]), m[1]) for m in items if isinstance(m, tuple) and m[0] != "question"]
        if turns:                                    # one batch, like @serve.batch
            t0 = time.perf_counter()
            codes = runner.tokenize([(torch.from_numpy(q), sr) for _, q, _ in turns])
            t1 = time.perf_counter()
            for (tid, _, seed), c in zip(turns, codes):
                p = prompts.chat([Message("user", [Audio(c)])], spoken=True)
                outbox.put((tid, p.ids, p.audio_codes.numpy(), seed))
                marks.put(("prompted", tid, time.perf_counter()))
            batches.append((len(turns), t1 - t0, time.perf_counter() - t1))
        if "flush" in items:
            marks.put(("stats", "tokenizer", {"batches": batches}))
            batches = []
        if "staged" in items:                        # every question sent before it is here
            marks.put(("staged",))
        if None in items:
            return


def _llm_stage(opts, dev, tmp, cfgs, inbox, outbox, marks) -> None:
    llm_cfg = cfgs[1]
    model = build_model(llm_cfg, dev, default_dtype(dev), opts["attn"], seed=0)
    weights = _allocated(dev)
    tok, prompts = _prompts(llm_cfg, tmp)
    t = time.perf_counter()
    slots = opts["slots"]
    max_len = max_context(prompts, llm_cfg, opts["question_s"], opts["reply"])
    engine = Engine(model, tok, config=EngineConfig(       # paged KV, as the LLM deployment runs it
        num_slots=slots, max_len=max_len, paged=True,
        kv_budget_bytes=slots * max_len * KVCache.block_bytes(llm_cfg, 1, default_dtype(dev)),
        prefill_budget=2048, max_batch=min(slots, opts["max_batch"]), compile_backend=opts.get("compile")))
    if dev.type == "cuda":
        engine.warm_up()                                 # as the LLM deployment does at start
    info = {"slots": engine.num_slots, "max_len": engine.config.max_len, "kv_gib": engine.cache.nbytes() / 2**30,
            "ladder": engine.runner.ladder, "kv_ladder": engine.runner.kv_ladder,
            "start_s": time.perf_counter() - t}
    marks.put(("ready", "llm", {"llm weights": weights, "llm KV cache, graphs": _allocated(dev) - weights}, info))
    forced = reply_schedule(opts["reply"])
    publishers: dict[str, TurnPublisher] = {}

    def on_event(ev) -> None:                          # the deployment's per-turn forwarder
        if isinstance(ev, TextToken) and ev.token_id is not None and ev.request_id not in texted:
            texted.add(ev.request_id)
            marks.put(("first_text", ev.request_id, time.perf_counter()))
        pub = publishers.get(ev.request_id)
        if pub is not None:
            pub.feed(ev)

    def emit_for(tid: str):
        def emit(target: str, entry) -> None:           # what the LLM deployment sends on
            if target != "llm":
                if tid not in jobbed:
                    jobbed.add(tid)
                    marks.put(("first_job", tid, time.perf_counter()))
                outbox.put((target, entry))             # its lane of jobs:decoder
        return emit

    texted: set[str] = set()
    jobbed: set[str] = set()
    engine.on_event = on_event
    steps: list[tuple[str, float, int]] = []
    captures = engine.runner.stats["captures"]
    while True:
        while True:
            try:
                msg = inbox.get_nowait() if engine.has_work() else inbox.get(timeout=0.05)
            except queue.Empty:
                break
            if msg is None:
                return
            if msg == "flush":
                marks.put(("stats", "llm", {"steps": steps, "captures": engine.runner.stats["captures"] - captures}))
                steps, captures = [], engine.runner.stats["captures"]
            elif msg == "reference":
                marks.put(("stats", "reference", reference_steps(model, 1, 512, 3, 1)))
            else:
                tid, ids, codes, seed = msg
                publishers[tid] = TurnPublisher(tid, tid, emit_for(tid), chunks=ChunkPolicy(4, 2.0, 50), seed=seed)
                engine.submit(Request(ids, mode="spoken", audio_codes=torch.from_numpy(codes), forced=forced,
                                      seed=seed, request_id=tid))
        if not engine.has_work():
            continue
        before = dict(engine.stats)
        s = time.perf_counter()
        engine.step()
        el = time.perf_counter() - s
        d = {k: engine.stats[k] - before[k] for k in ("text_decisions", "audio_frames", "forward_tokens")}
        rows = d["text_decisions"] + d["audio_frames"]
        kind = ("prefill" if d["forward_tokens"] > rows + 1 else
                "audio" if d["audio_frames"] and not d["text_decisions"] else
                "text" if d["text_decisions"] and not d["audio_frames"] else "mixed")
        steps.append((kind, el, rows))


def _decoder_stage(opts, dev, tmp, cfgs, inbox, outbox, marks) -> None:
    runner = DecoderRunner(cfgs[2], random_tensors(cfgs[2]), device=dev, max_batch=opts["work_batch"])
    t = time.perf_counter()
    # the longest window of the benchmark's segments (a low-latency window is the segment's prefix)
    shapes = runner.warm_up(max(n for k, n in reply_schedule(opts["reply"]) if k == "audio"))
    marks.put(("ready", "decoder", {"decoder": _allocated(dev)}, {"shapes": shapes, "start_s": time.perf_counter() - t}))
    captures = runner.graphs.stats["captures"]
    work = Lanes()
    batches: list[tuple[int, float]] = []             # (jobs, s) per batch
    while True:
        claimed = work.claim(inbox, opts["work_batch"])
        if claimed:
            t0 = time.perf_counter()
            pieces = [(j.codes.tensor("int64"), j.context_frames, j.seed) for _, j in claimed]
            for (lane, j), (mel, vctx) in zip(claimed, decode_pieces(runner, pieces)):
                marks.put(("first_mel", j.turn_id, time.perf_counter()))
                outbox.put((next_lane(lane, VOCODER_JOBS), (j.turn_id, j.seed, j.final, mel.numpy(), vctx)))
            batches.append((len(claimed), time.perf_counter() - t0))
        if "flush" in work.control:
            marks.put(("stats", "decoder", {"captures": runner.graphs.stats["captures"] - captures,
                                            "batches": batches}))
            captures, batches = runner.graphs.stats["captures"], []
        if None in work.control:
            return
        work.control.clear()


def _vocoder_stage(opts, dev, tmp, cfgs, inbox, outbox, marks) -> None:
    hift_cfg = cfgs[3]
    runner = VocoderRunner(hift_cfg, random_hift_state(hift_cfg, 0), device=dev, max_batch=opts["work_batch"])
    marks.put(("ready", "vocoder", {"vocoder": _allocated(dev)}, {}))
    rate = hift_cfg.sampling_rate
    work = Lanes()
    batches: list[tuple[int, float]] = []             # (jobs, s) per batch
    while True:
        jobs = [j for _, j in work.claim(inbox, opts["work_batch"])]
        items = work.control
        if jobs:
            t0 = time.perf_counter()
            waves = runner.vocode([torch.from_numpy(m) for _, _, _, m, _ in jobs], seed=[s for _, s, _, _, _ in jobs],
                                  context_frames=[c for *_, c in jobs])
            now = time.perf_counter()
            for (tid, _, final, _, _), w in zip(jobs, waves):
                marks.put(("audio", tid, now, w.shape[-1] / rate, final))
            batches.append((len(jobs), now - t0))
        if "flush" in items:
            marks.put(("stats", "vocoder", {"batches": batches}))
            batches = []
        if None in items:
            return
        items.clear()


# ---------------------------------------------------------------------------- the stack
class Stack:
    """The four stage processes and their queues (tokenizer -> llm -> decoder -> vocoder)."""

    def __init__(self, opts: dict, timeout_s: float = 900.0):
        ctx = mp.get_context("spawn")            # CUDA cannot be forked
        self.marks = ctx.Queue()
        self.inboxes = {n: ctx.Queue() for n in STAGES}
        outs = {"tokenizer": "llm", "llm": "decoder", "decoder": "vocoder", "vocoder": None}
        self.procs = [ctx.Process(target=_stage, name=f"bench-{n}", daemon=True,
                                  args=(n, opts, self.inboxes[n], self.inboxes[outs[n]] if outs[n] else None,
                                        self.marks)) for n in STAGES]
        for p in self.procs:
            p.start()
        self.memory: dict[str, float] = {}
        self.info: dict[str, dict] = {}
        deadline = time.perf_counter() + timeout_s
        while len(self.info) < len(STAGES):
            m = self._get(deadline)
            if m[0] == "ready":
                self.memory.update(m[2])
                self.info[m[1]] = m[3]

    def _get(self, deadline: float):
        while True:
            try:
                m = self.marks.get(timeout=0.5)
            except queue.Empty:
                if time.perf_counter() > deadline:
                    raise TimeoutError("bench gpu: a stage did not answer in time")
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"bench gpu: stage process(es) {dead} died")
                continue
            if m[0] == "error":
                raise RuntimeError(f"bench gpu: the {m[1]} stage failed:\n{m[2]}")
            return m

    def wait_for(self, kind: str, deadline: float) -> None:
        while self._get(deadline)[0] != kind:
            pass

    def stats(self, names: tuple[str, ...], deadline: float) -> dict[str, dict]:
        for n in names:
            self.inboxes["llm" if n == "reference" else n].put("reference" if n == "reference" else "flush")
        got: dict[str, dict] = {}
        while len(got) < len(names):
            m = self._get(deadline)
            if m[0] == "stats":
                got[m[1]] = m[2]
        return got

    def close(self) -> None:
        for q in self.inboxes.values():
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
