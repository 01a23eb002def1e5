"""The LLM stage's engine: continuous batching of the interleaved text/audio protocol.

    submit(Request) ─► waiting ─► admitted (slot, prefix reuse) ─► running ─► done
                                                     │
    step():  Scheduler.plan()            which sequences run, how many tokens each (scheduler.py)
             DecodeRunner.forward        single-token rows: one step on persistent buffers,
                                         CUDA graphs on a GPU (runner.py); prefill chunks eager
             text rows ─► lm_head ─► sampler          ┐ DecodeRunner.decide: on the device,
             audio rows ─► audio head ─► sampler ×8   ┘ one host read of the step's decisions
             Sequence.on_text / on_frame  protocol (protocol.py) ─► events, history effects

Every sequence owns a slot of the preallocated KV cache. A session keeps its slot between
turns while memory allows; a new turn whose prompt extends the cached tokens prefills only
the new part; the least recently used idle session loses its slot when one is needed.

Plain Python and PyTorch: a deployment wraps it (Ray, gRPC, Redis live elsewhere). Events
go to each request's `Handle` (a queue) and to an optional callback. `run_forever()` steps
on a background thread; `step()` can also be called directly (tests, benchmarks).
"""
from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from services.llm import sampler
from services.llm.prompts import ProtocolTokens
from services.llm.runner import DecodeRow, DecodeRunner
from services.llm.kv_cache import KVCache
from services.llm.kv_slots import BlockPool, SessionTable
from services.llm.protocol import (AudioFrame, Done, EngineError, Event, Mode, Phase, ProtocolRules, ProtocolConfig,
                                   Request, SegmentEnd, SegmentStart, Sequence, TextToken,
                                   UnknownSessionError)
from services.llm.scheduler import Scheduler
from services.llm.stop import StopTables

log = logging.getLogger(__name__)

__all__ = ["AudioFrame", "Done", "Engine", "EngineConfig", "EngineError", "Event", "Handle", "Mode",
           "ProtocolConfig", "Request", "SegmentEnd", "SegmentStart", "TextToken", "UnknownSessionError"]


@dataclass(frozen=True)
class EngineConfig:
    num_slots: int = 8                   # KV slots: running sequences + idle sessions kept
    max_len: int = 4096                  # tokens per sequence = the context limit
    kv_budget_bytes: Optional[int] = None  # KV memory: paged, the blocks' total; static, caps num_slots
    paged: bool = False                  # KV blocks handed out as sequences grow (else max_len per slot)
    kv_block_size: int = 16              # tokens per KV block
    prefill_budget: int = 512            # prompt tokens forwarded per step, over all sequences
    max_batch: Optional[int] = None      # running sequences at once (default num_slots)
    stop_mode: str = "text"              # "text": transformers 4.45 stop strings (the reference); "bytes": >= 4.50
    trace: bool = False                  # record every row of every forward in Engine.trace
    kv_bucket: int = 128                 # attended KV length rounded up (prefill: to a multiple of
                                         # it; decode: to it times a power of two): few distinct shapes
    cuda_graphs: Optional[bool] = None   # decode steps replayed as CUDA graphs (None: on CUDA)
    compile_backend: Optional[str] = None  # torch.compile backend for the decode pieces ("inductor": fused kernels)


class Handle:
    """A submitted request: its events, in order, ending with `Done`."""

    def __init__(self, engine: "Engine", request_id: str):
        self.engine = engine
        self.request_id = request_id
        self._q: "queue.Queue[Event]" = queue.Queue()
        self.done: Optional[Done] = None
        self._seq: Optional[Sequence] = None

    def _put(self, ev: Event) -> None:
        if isinstance(ev, Done):
            self.done = ev
        self._q.put(ev)

    def cancel(self) -> None:
        """Stop the request; it ends (Done reason "cancelled") within one step. No-op once done."""
        if self.done is None and self._seq is not None and self._seq.done is None:
            self.engine.cancel(self.request_id)

    def events(self, timeout: Optional[float] = None) -> Iterator[Event]:
        """Yield events until Done (blocking; run the engine on another thread, or use
        `drain()` after stepping it yourself)."""
        while True:
            ev = self._q.get(timeout=timeout)
            yield ev
            if isinstance(ev, Done):
                return

    def drain(self) -> list[Event]:
        """Every event delivered so far (non-blocking)."""
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out

    def result(self, timeout: Optional[float] = None) -> Done:
        """Wait for the end (needs the engine running on another thread)."""
        for ev in self.events(timeout):
            pass
        assert self.done is not None
        return self.done


class Engine:
    def __init__(self, model, tokenizer, *, generation_config: Optional[dict] = None,
                 config: EngineConfig = EngineConfig(), protocol: Optional[ProtocolConfig] = None,
                 on_event: Optional[Callable[[Event], None]] = None):
        """model: an `AudioLLM` (its dtype and device are the engine's); tokenizer: the
        checkpoint's; generation_config: its generation_config.json (EOS check, correction 13)."""
        self.model = model
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.on_event = on_event
        w = model.lm_head.weight
        self.device, self.dtype = w.device, w.dtype
        self.tokens = ProtocolTokens.from_tokenizer(tokenizer, self.cfg, generation_config)
        self.protocol_config = protocol or ProtocolConfig.reference(self.tokens.audiogen_start_str,
                                                                    self.tokens.eos_str)
        sizes = self.cfg.audio.codebook_sizes
        self.vocab_size = self.cfg.llm.vocab_size
        self.rules = ProtocolRules(
            eos=self.tokens.eos, audio_pad=self.cfg.audio_tokens.audio_pad,
            audiogen_start=self.cfg.audio_tokens.audiogen_start, audiogen_end=self.cfg.audio_tokens.audiogen_end,
            eoa=sizes[0], num_codebooks=len(sizes), config=self.protocol_config,
            stops=StopTables(tokenizer, config.stop_mode, self.vocab_size),
            decode=lambda ids: tokenizer.decode(list(ids)),     # as the s2s demo decodes each segment
            decode_plain=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
            strip=tuple(tokenizer.convert_ids_to_tokens([self.tokens.eos, self.cfg.audio_tokens.audiogen_start,
                                                         self.cfg.audio_tokens.audiogen_end])),
        )

        # K and V of one block, every layer; a static slot is max_len tokens of blocks
        block_bytes = KVCache.block_bytes(self.cfg, config.kv_block_size, w.dtype)
        per_slot = -(-config.max_len // config.kv_block_size) * block_bytes
        num_slots = config.num_slots
        num_blocks = None
        if config.paged:
            num_blocks = (config.kv_budget_bytes // block_bytes if config.kv_budget_bytes is not None
                          else num_slots * (per_slot // block_bytes))
            if num_blocks < 1:
                raise EngineError(f"kv_budget_bytes {config.kv_budget_bytes} holds no KV block: a block of "
                                  f"{config.kv_block_size} tokens needs {block_bytes} bytes")
        elif config.kv_budget_bytes is not None:
            num_slots = min(num_slots, config.kv_budget_bytes // per_slot)
            if num_slots < 1:
                raise EngineError(f"kv_budget_bytes {config.kv_budget_bytes} holds no slot: one slot of "
                                  f"{config.max_len} tokens needs {per_slot} bytes")
        self.config = config
        self.num_slots = num_slots
        # one more slot than sequences get: the decode runner's padding rows write there
        self.cache = model.new_cache(num_slots + 1, config.max_len, block_size=config.kv_block_size,
                                     num_blocks=num_blocks)
        self.pool = (BlockPool(num_blocks, config.kv_block_size, num_slots + 1, self.cache.set_blocks)
                     if config.paged else None)
        self.counts = sampler.TokenCounts(num_slots + 1, self.vocab_size, self.device)
        self.codes = sampler.CodeHistory(num_slots + 1, sizes, self.device)
        self.sessions = SessionTable(num_slots, self.pool)
        max_batch = config.max_batch or num_slots
        self.scheduler = Scheduler(self.sessions, max_batch, config.prefill_budget)
        self.runner = DecodeRunner(model, self.cache, self.counts, self.codes, audio_pad=self.rules.audio_pad,
                                   eos=self.rules.eos, eoa=self.rules.eoa, max_batch=max_batch,
                                   kv_bucket=config.kv_bucket, cuda_graphs=config.cuda_graphs,
                                   compile_backend=config.compile_backend)
        self.handles: dict[str, Handle] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        # mixed_steps: steps that ran prefill chunks beside single-token decoding rows
        self.stats = {"steps": 0, "forwards": 0, "forward_tokens": 0, "text_decisions": 0,
                      "audio_frames": 0, "max_rows": 0, "mixed_steps": 0}
        # (request_id, new tokens, KV length before, first and last 1-based position) per row
        self.trace: Optional[list[tuple[str, int, int, int, int]]] = [] if config.trace else None

    # ================================================================== public API
    def open_session(self, session_id: Optional[str] = None) -> str:
        with self._lock:
            return self.sessions.open(session_id)

    def has_session(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self.sessions.sessions

    def close_session(self, session_id: str) -> None:
        with self._lock:
            self.sessions.close(session_id)

    def forget_idle_sessions(self, keep: int) -> int:
        """Close the least recently used sessions that hold no KV slot and run no turn, so that
        at most `keep` sessions stay known (sessions that expire elsewhere are never closed
        here otherwise). Returns how many were closed."""
        with self._lock:
            table = self.sessions.sessions
            idle = [sid for sid, s in table.items() if not s.busy and s.slot is None]   # oldest first
            excess = idle[:max(0, len(table) - keep)]
            for sid in excess:
                self.sessions.close(sid)
            return len(excess)

    def submit(self, request: Request) -> Handle:
        """Validate and queue a request. Errors (EngineError) name what is wrong."""
        with self._lock:
            seq = self._make_sequence(request)
            if seq.done is not None:               # a continued reply whose replay ended it
                h = Handle(self, seq.id)
                self._deliver(seq, h)
                return h
            if request.session_id is not None:
                self.sessions.reserve(request.session_id)
            h = Handle(self, seq.id)
            h._seq = seq
            self.handles[seq.id] = h
            self.scheduler.add(seq)
        self._wake.set()
        return h

    def cancel(self, request_id: str) -> None:
        h = self.handles.get(request_id)
        if h is None or h._seq is None:
            raise EngineError(f"unknown request {request_id!r} (finished or never submitted)")
        h._seq.cancelled = True
        self._wake.set()

    def warm_up(self) -> int:
        """Run (on a GPU: capture) every decode shape before serving, so no request waits for a
        CUDA-graph capture. Returns the number of shapes."""
        with self._lock:
            return self.runner.warm_up()

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def run_until_idle(self, max_steps: int = 1_000_000) -> int:
        """Step until nothing is waiting or running (single-threaded use)."""
        n = 0
        while self.has_work() and n < max_steps:
            self.step()
            n += 1
        return n

    def run_forever(self) -> None:
        """Step on a background thread until `stop()`."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop():
            while not self._stop.is_set():
                try:
                    busy = self.step()
                except Exception:                  # the step's sequences got Done(error); keep serving
                    log.exception("engine step failed")
                    busy = True
                if not busy:
                    self._wake.wait(0.05)
                    self._wake.clear()

        self._thread = threading.Thread(target=loop, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ================================================================== submission
    def _make_sequence(self, r: Request) -> Sequence:
        try:
            mode = Mode(r.mode)
        except ValueError:
            raise EngineError(f"unknown mode {r.mode!r}: one of {[m.value for m in Mode]}") from None
        rid = r.request_id if r.request_id is not None else f"req-{next(self._ids)}"
        if rid in self.handles:
            raise EngineError(f"request id {rid!r} is already in use")
        ids = [int(t) for t in r.prompt_ids]
        if not ids:
            raise EngineError("empty prompt")
        limit = self.config.max_len
        if len(ids) >= limit:
            raise EngineError(f"prompt has {len(ids)} tokens; the context limit is {limit} tokens "
                              f"(EngineConfig.max_len), and the prompt must leave room for the reply")
        if self.pool is not None and self.pool.blocks_for(len(ids) + 1) > self.pool.num_blocks:
            raise EngineError(f"prompt has {len(ids)} tokens; the paged KV cache holds "
                              f"{self.pool.num_blocks * self.pool.block_size} tokens in all (kv_budget_bytes)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EngineError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if r.session_id is not None:
            self.sessions.get(r.session_id)          # unknown session: a clear error now
        pad = self.rules.audio_pad
        n_pads = sum(1 for t in ids if t == pad)
        rows = self._code_rows(r.audio_codes, n_pads)
        if mode == Mode.TTS:
            if ids[-1] != self.rules.audiogen_start:
                raise EngineError("a TTS prompt must end with <audiogen_start_baichuan> (PromptBuilder.tts_chunks)")
        elif r.tts_chunks:
            raise EngineError(f"tts_chunks given for a {mode.value} request (TTS only)")
        for c in r.tts_chunks:
            if any(int(t) == pad for t in c):
                raise EngineError("a TTS chunk may not contain <audio_pad_baichuan>")
        if r.forced is not None:
            if mode != Mode.SPOKEN:
                raise EngineError("a forced schedule needs a spoken request (alternating text and audio)")
            kinds = [k for k, _ in r.forced]
            if not kinds or any(k != ("text" if i % 2 == 0 else "audio") for i, k in enumerate(kinds)):
                raise EngineError(f"forced schedule {list(r.forced)} must alternate text and audio, starting with text")
            if any(int(n) < 1 for _, n in r.forced):
                raise EngineError("every forced segment needs at least 1 token or frame")
        for name in ("max_audio_frames", "max_new_tokens", "max_turn_frames"):
            if getattr(r, name) is not None and getattr(r, name) < 1:
                raise EngineError(f"{name} must be >= 1")
        seed = r.seed if r.seed is not None else random.getrandbits(48)
        return Sequence(r, self.rules, rid, seed, limit, rows)

    def _code_rows(self, codes, n_pads: int) -> list[tuple[int, ...]]:
        sizes = self.cfg.audio.codebook_sizes
        if codes is None:
            if n_pads:
                raise EngineError(f"prompt has {n_pads} <audio_pad_baichuan> tokens but no audio_codes")
            return []
        c = torch.as_tensor(codes).to(torch.int64).cpu()
        if c.dim() != 2 or c.shape[1] != len(sizes):
            raise EngineError(f"audio_codes must be [frames, {len(sizes)}], got {tuple(c.shape)}")
        if c.shape[0] != n_pads:
            raise EngineError(f"prompt has {n_pads} <audio_pad_baichuan> tokens but audio_codes has "
                              f"{c.shape[0]} frames; they must be equal")
        hi = torch.tensor(sizes)
        if bool(((c < 0) | (c > hi)).any()):
            raise EngineError(f"audio_codes out of range: codebook k takes 0..K_k, K = {list(sizes)}")
        return [tuple(r) for r in c.tolist()]

    # ================================================================== one step
    def step(self) -> bool:
        """Run one batched step. False when there was nothing to do."""
        with self._lock:
            self._handle_cancellations()
            planned = self.scheduler.plan()
            for seq in self.scheduler.admitted:
                self._setup(seq)
            work = self._grow(planned)
            if not work:
                self._finish_step()
                return bool(planned)
            try:
                with torch.inference_mode():
                    self._run(work)
            except Exception as e:
                for w in work:
                    w.seq.finish("error", error=f"{type(e).__name__}: {e}")
                self._finish_step()
                raise
            self._finish_step()
            self.stats["steps"] += 1
            return True

    def _handle_cancellations(self) -> None:
        for seq in self.scheduler.drop_waiting(lambda s: s.cancelled):
            seq.finish("cancelled")
            self.sessions.release(seq)
            self._deliver(seq)
            self.handles.pop(seq.id, None)
        for seq in self.scheduler.running:
            if seq.cancelled:
                seq.finish("cancelled")

    def _grow(self, work: list) -> list:
        """Paged KV: blocks for every row's new tokens, evicting idle sessions if needed. A row
        whose blocks cannot be had waits a step; if no row can run, the most recently admitted
        of them ends with an error, so the others get its blocks (vLLM would recompute it later)."""
        pool = self.pool
        if pool is None:
            return work
        ready = []
        for w in work:
            tokens = w.seq.kv_len + w.n
            need = pool.need(w.seq.slot, tokens)
            if need == 0 or (self.sessions.make_room(need) and pool.ensure(w.seq.slot, tokens)):
                ready.append(w)                  # (most steps: the slot's last block has room)
        if work and not ready:
            order = {id(s): i for i, s in enumerate(self.scheduler.running)}
            victim = max((w.seq for w in work), key=lambda s: order.get(id(s), -1))
            victim.finish("error", error=f"KV cache full: {pool.num_blocks} blocks of {pool.block_size} tokens "
                                         f"are held by running sequences (raise the KV budget or lower max_batch)")
            log.warning("KV cache full: request %s ended", victim.id)
        return ready

    def _setup(self, seq: Sequence) -> None:
        """A newly admitted sequence: its text history is the whole prompt, its code history
        empty (a TTS prompt's first frame is decided in the step that ends the prefill), or
        for a continued reply the open audio segment's frames so far."""
        self.counts.reset(seq.slot, seq.tokens)
        slot = torch.tensor([seq.slot], device=self.device)
        self.codes.clear(slot)
        if seq.phase == Phase.AUDIO and seq.frames:     # a continued audio segment's frames so far
            self.codes.add(slot.expand(len(seq.frames)), torch.tensor(seq.frames, device=self.device))
        seq.effects.clear()

    def _run(self, work) -> None:
        """Forward every row of `work`, then take the decisions of the rows whose pending
        span ends. Single-token rows (decoding) go through the decode runner (CUDA graphs on
        a GPU); prefill chunks are one eager forward beside them, so a 512-token chunk never
        pads 31 single-token rows to 512. Their last hidden states join the decode rows' for
        the decisions, which the host reads back once."""
        decode = [w for w in work if w.n == 1]
        prefill = [w for w in work if w.n > 1]
        work = decode + prefill
        rows = [self._row(w) for w in work]
        if decode:
            self.runner.forward(rows[:len(decode)])
        if prefill:
            ids_t, pos_t, slots, cache_pos, n_new, codes_t, T, bound = self._inputs(prefill)
            m = self.model
            x = m.embed(ids_t, codes_t, check=False)                      # (B, T, H)
            hidden = m.forward(x, pos_t, self.cache, slots, cache_pos, n_new, kv_len=bound)
            self.runner.put_hidden(len(decode), m.last_hidden(hidden, n_new))
        texts, frames = self.runner.decide(rows)

        self.stats["forwards"] += bool(decode) + bool(prefill)
        self.stats["forward_tokens"] += sum(w.n for w in work)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(work))
        self.stats["mixed_steps"] += bool(decode) and bool(prefill)
        if self.trace is not None:
            self.trace += [(w.seq.id, w.n, w.seq.kv_len, w.seq.kv_len + 1, w.seq.kv_len + w.n) for w in work]
        for w in work:
            w.seq.advance(w.n)
        deciding = [(w, r.decide) for w, r in zip(work, rows) if r.decide]
        for w, tok in zip([w for w, d in deciding if d == "text"], texts):
            w.seq.on_text(tok)
        for w, frame in zip([w for w, d in deciding if d == "audio"], frames):
            w.seq.on_frame(frame)
        self.stats["text_decisions"] += len(texts)
        self.stats["audio_frames"] += len(frames)

    def _row(self, w) -> DecodeRow:
        """A work item as the runner sees it (the token fields matter for single-token rows)."""
        seq = w.seq
        k = seq.kv_len
        ids, pads = seq.chunk(1)
        kind = seq.kind if w.decide else None
        return DecodeRow(token=ids[0], codes=tuple(pads[0]) if pads else None, position=k + 1,   # §6.1: 1-based
                         slot=seq.slot, cache_pos=k, decide=kind, params=seq.spec.params if kind else None,
                         seed=seq.seed, draws=seq.draws, ban_eoa=kind == "audio" and seq.forced is not None)

    def _inputs(self, group) -> tuple:
        """Device inputs of one prefill forward: ids and 1-based positions (B, T), right-padded;
        slots, cache positions and new-token counts (B); the pads' codes (N, C)."""
        T = max(w.n for w in group)
        filler = self.rules.eos                       # right padding: any id but audio_pad
        rows: list[tuple[int, ...]] = []
        table = []                                    # per row: ids[T], positions[T], slot, kv_len, n
        for w in group:
            chunk, pads = w.seq.chunk(w.n)
            rows.extend(pads)
            k = w.seq.kv_len
            table.append(chunk + [filler] * (T - w.n) + list(range(k + 1, k + 1 + T))   # §6.1: 1-based
                         + [w.seq.slot, k, w.n])
        t = torch.tensor(table, dtype=torch.int64).to(self.device)
        codes = torch.tensor(rows, dtype=torch.int64).to(self.device) if rows else None
        q = self.config.kv_bucket
        bound = min(-(-max(w.seq.kv_len + T for w in group) // q) * q, self.cache.max_len)
        return t[:, :T], t[:, T:2 * T], t[:, 2 * T], t[:, 2 * T + 1], t[:, 2 * T + 2], codes, T, bound

    # ================================================================== after a step
    def _finish_step(self) -> None:
        self._apply_effects()
        for seq in self.scheduler.running:
            self._deliver(seq)
        for seq in self.scheduler.retire():
            self.handles.pop(seq.id, None)

    def _apply_effects(self) -> None:
        """Mirror the sequences' token/code changes into the device histories, batched."""
        cnt_slot, cnt_id, cnt_val = [], [], []
        clear_slots, code_slots, code_rows = [], [], []
        for seq in self.scheduler.running:
            if not seq.effects:
                continue
            adds: list[tuple[int, ...]] = []
            for e in seq.effects:
                if e[0] == "add":
                    cnt_slot += [seq.slot] * len(e[1])
                    cnt_id += e[1]
                    cnt_val += [1] * len(e[1])
                elif e[0] == "replace":
                    if e[1] != e[2]:
                        cnt_slot += [seq.slot, seq.slot]
                        cnt_id += [e[1], e[2]]
                        cnt_val += [-1, 1]
                elif e[0] == "clear_codes":
                    clear_slots.append(seq.slot)
                    adds = []                      # codes before a clear no longer count
                elif e[0] == "codes":
                    adds.append(e[1])
            code_slots += [seq.slot] * len(adds)
            code_rows += adds
            seq.effects.clear()
        dev = self.device
        if cnt_id:
            self.counts.counts.index_put_(
                (torch.tensor(cnt_slot, device=dev), torch.tensor(cnt_id, device=dev)),
                torch.tensor(cnt_val, dtype=torch.int32, device=dev), accumulate=True)
        if clear_slots:
            self.codes.clear(torch.tensor(clear_slots, device=dev))
        if code_rows:
            self.codes.add(torch.tensor(code_slots, device=dev), torch.tensor(code_rows, device=dev))

    def _deliver(self, seq: Sequence, h: Optional[Handle] = None) -> None:
        if not seq.events:
            return
        h = h or self.handles.get(seq.id)
        evs, seq.events = seq.events, []
        for ev in evs:
            if h is not None:
                h._put(ev)
            if self.on_event is not None:
                self.on_event(ev)
