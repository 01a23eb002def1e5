"""`baichuan-audio bench llm`: the serving engine's decode steps, timed through `Engine.step`
itself (the path users get), with its decode runner replayed as CUDA graphs and eagerly, and
the reference-style loop (services/llm/bench.py) for the ratio, all in the same process.

Random weights at the chosen dimensions; a byte-level tokenizer of the tiny layout supplies the
special strings (ids beyond it are plain vocabulary). Every sequence runs a forced schedule
(reference-model.md §11: one text token, then audio frames; or text only), so each timed step
is one 80 ms frame (audio) or one token (text) for every sequence, with the repetition-penalty
histories and sampling on the device. Also checks that the graphed and eager engines make the
same greedy decisions, token for token and code for code.

    baichuan-audio bench llm                       # small config on the CPU (eager only)
    baichuan-audio bench llm --preset qwen7b --device cuda --batch-sizes 1,8,64

Imports only torch, transformers' tokenizer and the model code (the GPU machine has no Ray,
Redis or soundfile).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from services.common.dtypes import default_dtype
from services.common.model_config import ModelConfig
from services.common.text_tokenizer import build_tiny_tokenizer, load_text_tokenizer
from services.common.tiny_checkpoint import TINY_VOCAB, tiny_config_dict
from services.llm.bench import PRESETS, build_model, check_head, reference_steps, synthetic_config
from services.llm.engine import Engine, EngineConfig, Request


def bench_config(preset: str) -> ModelConfig:
    """The preset's dimensions with the tiny checkpoint's audio token ids (so the tiny byte-level
    tokenizer holds every special string)."""
    ids = {k: v for k, v in tiny_config_dict()["audio_config"].items() if k.endswith("_token_id")}
    return synthetic_config(**PRESETS[preset], audio_token_ids=ids)


def make_tokenizer(cfg: ModelConfig, folder: Path):
    build_tiny_tokenizer(folder, cfg, TINY_VOCAB)
    return load_text_tokenizer(folder)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _requests(B: int, context: int, kind: str, steps: int, seed: int, greedy: bool) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    # plain byte tokens (ids < 256): no special string, no stop piece
    prompts = [torch.randint(32, 127, (context,), generator=g).tolist() for _ in range(B)]
    forced = [("text", 1), ("audio", steps + 8)] if kind == "audio" else [("text", steps + 8)]
    return [Request(p, mode="spoken", forced=forced, greedy=greedy, seed=seed + i) for i, p in enumerate(prompts)]


def run_engine(engine: Engine, B: int, context: int, kind: str, steps: int, warmup: int, seed: int = 0,
               greedy: bool = False) -> tuple[list[float], list]:
    """Admit B sequences of `context` prompt tokens, run until all decode `kind`, then time
    `steps` engine steps. Returns (seconds per step, each request's events so far)."""
    # sequences admitted first decode while later ones prefill: their schedules must outlast that
    prefill_steps = -(-B * context // engine.config.prefill_budget)
    handles = [engine.submit(r) for r in _requests(B, context, kind, steps + warmup + prefill_steps, seed, greedy)]
    dev = engine.device
    # prefill (and, for audio, the one text token) until every sequence decodes `kind`
    for _ in range(100_000):
        seqs = engine.scheduler.running
        phases = ("AUDIO",) if kind == "audio" else ("FIRST_TEXT", "TEXT")
        if len(seqs) == B and all(s.pending == 1 and s.phase.name in phases for s in seqs):   # decoding
            break
        engine.step()
    for _ in range(warmup):
        engine.step()
    times = []
    for _ in range(steps):
        _sync(dev)
        t0 = time.perf_counter()
        engine.step()                     # reads the decisions back: the step is complete on return
        times.append(time.perf_counter() - t0)
    events = [h.drain() for h in handles]
    for h in handles:
        h.cancel()
    engine.run_until_idle()
    return times, events


def decisions(events: list) -> list[tuple]:
    """Every text token and audio frame of each request, in order."""
    from services.llm.protocol import AudioFrame, TextToken
    return [tuple((e.token_id,) if isinstance(e, TextToken) else e.codes for e in evs
                  if isinstance(e, AudioFrame) or (isinstance(e, TextToken) and e.token_id is not None))
            for evs in events]


def new_engine(model, tokenizer, B: int, context: int, steps: int, graphs: bool,
               compile_backend: str | None = None) -> Engine:
    budget = max(512, min(B * context, 8192))
    cfg = EngineConfig(num_slots=B, max_len=context + steps + -(-B * context // budget) + 64, prefill_budget=budget,
                       max_batch=B, cuda_graphs=graphs, paged=True,      # paged KV, as the LLM deployment runs it
                       compile_backend=compile_backend)
    return Engine(model, tokenizer, config=cfg)


def bench_engine(preset: str = "cpu", batch_sizes=(1, 8), device: str = "cpu", dtype=torch.float32,
                 context: int = 128, steps: int = 10, warmup: int = 3, attn: str = "math",
                 kinds=("audio", "text"), check: bool = True, reference_max_batch: int = 64,
                 compile_backend: str | None = None, print_fn=print) -> list[dict]:
    """compile_backend: also time the engine with its decode pieces compiled (e.g. "inductor":
    fused kernels), graphed on CUDA, in a "compiled" column with its gain over the plain one."""
    device = torch.device(device)
    cfg = bench_config(preset)
    model = build_model(cfg, device, dtype, attn, seed=0)
    graphs_possible = device.type == "cuda"
    c = cfg.llm
    name = torch.cuda.get_device_name(device) if graphs_possible else "CPU"
    print_fn(f"# engine decode bench: {device} ({name}), {dtype}, attn {attn}; hidden {c.hidden_size}, "
             f"layers {c.num_hidden_layers}, vocab {c.vocab_size}, codebooks {list(cfg.audio.codebook_sizes)}; "
             f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, random")
    print_fn(f"# context {context} tokens per sequence; {steps} timed engine steps after {warmup} warm-up; "
             f"an audio step = one 80 ms frame for every sequence")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(cfg, Path(tmp))
        n_check = min(4, max(batch_sizes))

        def greedy(graphs: bool, backend: str | None = None) -> list[list]:
            """Each of n_check sequences' greedy decisions over 16 audio steps."""
            eng = new_engine(model, tok, n_check, context, 24, graphs, backend)
            return decisions(run_engine(eng, n_check, context, "audio", 16, 0, seed=7, greedy=True)[1])

        def agreement(a: list[list], b: list[list]) -> tuple[int, int]:
            """(decisions equal, decisions) position by position."""
            fa, fb = [x for d in a for x in d], [x for d in b for x in d]
            return sum(x == y for x, y in zip(fa, fb)), len(fa)

        if check and graphs_possible:
            check_head(model, print_fn=print_fn)
            a, b = greedy(True), greedy(False)
            agree, n = agreement(a, b)
            print_fn(f"# check: graphed vs eager engine, greedy, {n_check} sequences, {n} decisions: "
                     f"{'identical' if a == b else f'DIFFERENT ({agree} equal)'}")
            # SDPA picks another kernel under capture (1 bf16 ulp in the hidden state, README
            # "Benchmarks"), so only the math attention must agree exactly
            if a != b and attn == "math":
                raise SystemExit("graphed and eager engines disagree with math attention")
        if check and compile_backend:               # fused kernels round differently: report, not fail
            agree, n = agreement(greedy(graphs_possible), greedy(graphs_possible, compile_backend))
            print_fn(f"# check: compiled ({compile_backend}) vs plain engine, greedy, {n_check} sequences: "
                     f"{agree} of {n} decisions equal")
        print_fn(f"{'kind':>5} {'batch':>5} | {'graphs p50 ms':>13} {'p95':>7} | {'eager p50 ms':>12} {'p95':>7} | "
                 f"{'x':>5} | {'reference ms':>12} {'x':>6} | {'per stream vs real time':>23}"
                 + (f" | {'compiled p50 ms':>15} {'p95':>7} {'x':>5}" if compile_backend else ""))
        for kind in kinds:
            for B in batch_sizes:
                r = {"kind": kind, "batch": B}
                for graphs in ((True, False) if graphs_possible else (False,)):
                    eng = new_engine(model, tok, B, context, steps + warmup, graphs)
                    t, _ = run_engine(eng, B, context, kind, steps, warmup)
                    r["graphs" if graphs else "eager"] = (statistics.median(t), sorted(t)[int(0.95 * (len(t) - 1))])
                    del eng
                    if graphs_possible:
                        torch.cuda.empty_cache()
                if compile_backend:
                    eng = new_engine(model, tok, B, context, steps + warmup, graphs_possible, compile_backend)
                    t, _ = run_engine(eng, B, context, kind, steps, warmup)
                    r["compiled"] = (statistics.median(t), sorted(t)[int(0.95 * (len(t) - 1))])
                    del eng
                if B <= reference_max_batch:        # the reference's torch.cat cache copies it all every step
                    r["reference"] = reference_steps(model, B, context, 3, 1)[f"ref_{kind}_s"]
                rows.append(r)

                def ms(k: str) -> str:
                    return f"{r[k][0] * 1e3:13.2f} {r[k][1] * 1e3:7.2f}" if k in r else f"{'-':>13} {'-':>7}"
                best = r.get("graphs", r["eager"])[0]
                x = f"{r['eager'][0] / r['graphs'][0]:5.1f}" if "graphs" in r else f"{'-':>5}"
                ref = (f"{r['reference'] * 1e3:12.2f} {r['reference'] / best:5.1f}x" if "reference" in r
                       else f"{'-':>12} {'-':>6}")
                rt = f"{0.080 / best:.2f}x" if kind == "audio" else "-"
                comp = ""
                if "compiled" in r:
                    plain = r.get("graphs", r["eager"])[0]
                    comp = f" | {r['compiled'][0] * 1e3:15.2f} {r['compiled'][1] * 1e3:7.2f} {plain / r['compiled'][0]:5.2f}"
                print_fn(f"{kind:>5} {B:>5} | {ms('graphs')} | {ms('eager')[1:]} | {x} | {ref} | {rt:>23}{comp}")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--attn", default=None, choices=["math", "sdpa"], help="default: sdpa on CUDA, math on CPU")
    p.add_argument("--kinds", default="audio,text")
    p.add_argument("--no-check", action="store_true", help="skip the graphed-vs-eager greedy check")
    p.add_argument("--compile", default=None, metavar="BACKEND",
                   help="also time the engine with its decode pieces compiled by torch.compile with this backend "
                        "(inductor: fused kernels; graphed on CUDA), against the plain engine in the same run")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype] if a.dtype else default_dtype(a.device)
    bench_engine(a.preset, tuple(int(b) for b in a.batch_sizes.split(",")), a.device, dtype, a.context,
                 a.steps, a.warmup, a.attn or ("sdpa" if cuda else "math"), tuple(a.kinds.split(",")),
                 check=not a.no_check, compile_backend=a.compile)


if __name__ == "__main__":
    main()
