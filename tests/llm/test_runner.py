"""The decode runner: batch ladder, padding rows on the scratch slot, decisions independent of
batch mates and padding, and the engine benchmark through the serving path (tiny, CPU)."""
from __future__ import annotations

import pytest
import torch

from services.common.cuda_graphs import bucket, ladder
from services.llm import sampler
from services.llm.bench import build_model, synthetic_config
from services.llm.runner import DecodeRow, DecodeRunner

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            intermediate_size=192, vocab_size=512, codebook_sizes=(32, 16, 16, 16), audio_head_transformer_layers=2)


def test_ladders():
    assert ladder(1) == [1] and ladder(5) == [1, 2, 4, 8] and ladder(8) == [1, 2, 4, 8]
    assert bucket(3, ladder(8)) == 4 and bucket(8, ladder(8)) == 8
    with pytest.raises(ValueError):
        bucket(9, ladder(8))


@pytest.fixture(scope="module")
def parts():
    cfg = synthetic_config(**DIMS)
    model = build_model(cfg, torch.device("cpu"), torch.float32, "math", seed=0)
    return cfg, model


def runner_for(cfg, model, slots: int, max_batch: int) -> DecodeRunner:
    cache = model.new_cache(slots + 1, 64)                     # + the scratch slot
    counts = sampler.TokenCounts(slots + 1, cfg.llm.vocab_size)
    codes = sampler.CodeHistory(slots + 1, cfg.audio.codebook_sizes)
    a = cfg.audio_tokens
    return DecodeRunner(model, cache, counts, codes, audio_pad=a.audio_pad, eos=a.audio_end,
                        eoa=cfg.audio.codebook_sizes[0], max_batch=max_batch, kv_bucket=16)


def rows_for(cfg, slots, kinds, pos=5):
    greedy = sampler.SamplingParams(repetition_penalty=1.3, greedy=True)
    out = []
    for j, (slot, kind) in enumerate(zip(slots, kinds)):
        pad = kind == "audio"
        out.append(DecodeRow(token=cfg.audio_tokens.audio_pad if pad else 40 + j,
                             codes=tuple(range(len(cfg.audio.codebook_sizes))) if pad else None,
                             position=pos + 1, slot=slot, cache_pos=pos, decide=kind, params=greedy, seed=slot))
    return out


def keys(cache) -> list[torch.Tensor]:
    """Every slot's keys, (layers, kv_heads, max_len, d) each."""
    return [cache.slot(s)[0] for s in range(cache.num_slots)]


def test_padding_rows_touch_only_the_scratch_slot(parts):
    cfg, model = parts
    r = runner_for(cfg, model, slots=6, max_batch=8)
    r.cache.k.normal_()
    before = keys(r.cache)
    rows = rows_for(cfg, [1, 3, 4], ["text", "audio", "text"])     # 3 rows: padded to 4
    texts, frames = r.step(rows)
    assert len(texts) == 2 and len(frames) == 1 and len(frames[0]) == len(cfg.audio.codebook_sizes)
    after = keys(r.cache)
    changed = {s for s in range(r.cache.num_slots) if not torch.equal(before[s], after[s])}
    assert changed == {1, 3, 4, r.scratch}
    # only the written position of each used slot changed
    pos = rows[0].cache_pos
    for s in (1, 3, 4):
        d = (before[s] != after[s]).any(dim=(0, 1, 3))
        assert d.nonzero().flatten().tolist() == [pos]


def test_decisions_do_not_depend_on_batch_mates_or_padding(parts):
    cfg, model = parts
    alone, together = runner_for(cfg, model, 6, 8), runner_for(cfg, model, 6, 8)
    rows = rows_for(cfg, [0, 2, 5], ["audio", "text", "audio"])
    got = together.step(rows)
    want_text, want_frames = [], []
    for row in rows:
        t, f = alone.step([row])
        want_text += t
        want_frames += f
    assert got == (want_text, want_frames)


def test_engine_bench_prints_figures_through_the_serving_path(capsys):
    from services.llm.bench_engine import bench_engine

    rows = bench_engine("cpu", batch_sizes=(1, 2), context=16, steps=2, warmup=1, kinds=("audio",))
    assert [r["batch"] for r in rows] == [1, 2] and all(r["eager"][0] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "engine decode bench" in out and "per stream vs real time" in out


def test_engine_bench_times_the_compiled_engine_beside_the_plain_one(capsys):
    from services.llm.bench_engine import bench_engine

    torch._dynamo.reset()
    rows = bench_engine("cpu", batch_sizes=(2,), context=16, steps=2, warmup=1, kinds=("audio",),
                        compile_backend="eager")
    assert rows[0]["compiled"][0] > 0
    out = capsys.readouterr().out
    n = int(out.split("decisions equal")[0].split(" of ")[-1])
    assert f"{n} of {n} decisions equal" in out and n > 0 and "compiled p50 ms" in out


def test_warm_up_runs_every_shape_on_the_scratch_slot_only(parts):
    cfg, model = parts
    r = runner_for(cfg, model, slots=3, max_batch=4)
    r.cache.k.normal_()
    before = keys(r.cache)
    n = r.warm_up()
    assert n == len(r.ladder) * (len(r.kv_ladder) + 2) and r.stats["eager"] == n
    after = keys(r.cache)
    changed = {s for s in range(r.cache.num_slots) if not torch.equal(before[s], after[s])}
    assert changed == {r.scratch}


def test_compiled_pieces_are_one_graph_each_and_decide_the_same(parts):
    """The decode pieces compile whole (fullgraph: a graph break fails here) with batch and KV
    length symbolic: a ladder of shapes costs a few compiles (the specialisations of batch 1 and
    of one KV block), not one per shape; the compiled runner's decisions equal the plain one's.
    (A pass-through backend: this checks the tracing; the GPU's inductor kernels are timed and
    compared by `bench llm --compile`.)"""
    cfg, model = parts
    compiles = {"backbone": 0, "text": 0, "audio": 0}

    def backend(gm, example_inputs):
        graph = str(gm.graph)
        piece = "audio" if "audio_sel" in graph else "text" if "text_sel" in graph else "backbone"
        compiles[piece] += 1
        return gm.forward

    torch._dynamo.reset()
    plain = runner_for(cfg, model, 16, 16)
    fast = DecodeRunner(plain.model, model.new_cache(17, 64), sampler.TokenCounts(17, cfg.llm.vocab_size),
                        sampler.CodeHistory(17, cfg.audio.codebook_sizes), audio_pad=plain.audio_pad,
                        eos=plain.eos, eoa=plain.eoa, max_batch=16, kv_bucket=16, compile_backend=backend)
    shapes = set()
    for pos in (5, 20, 40):                                      # KV lengths 16, 32, 64
        for n in (1, 2, 3, 7, 13):                               # batches 1, 2, 4, 8, 16
            kinds = ["audio" if (j + pos) % 3 else "text" for j in range(n)]
            rows = rows_for(cfg, list(range(n)), kinds, pos=pos)
            assert fast.step(rows) == plain.step(rows)
            B, L = bucket(n, plain.ladder), next(q for q in plain.kv_ladder if q > pos)
            shapes.add(("backbone", B, L))
    assert len(shapes) == 15
    # specialised at most for batch 1 and the full batch, one KV block and all of them
    assert compiles["backbone"] <= 9 and compiles["text"] <= 3 and compiles["audio"] <= 3, compiles
