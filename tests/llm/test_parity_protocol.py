"""Fixture 06_protocol: the engine in greedy mode reproduces the reference demo loops
(spoken, text, tts, asr) token for token and code for code (reference-model.md §11,
corrections 10-15).

Also holds the fixture loaders the engine tests share (`protocol_env`)."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import pytest
import torch

from services.llm.engine import Engine, EngineConfig, Request
from services.llm.model import AudioLLM
from services.llm.protocol import Done, SegmentEnd, TextToken

FIX = "06_protocol"
RUNS = ("spoken", "text", "tts", "asr")

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class ProtocolEnv:
    fixtures: object
    model: AudioLLM
    tokenizer: object
    gen_config: dict
    inputs: dict            # inputs.json
    outputs: dict           # outputs.json
    tensors_in: dict        # inputs.safetensors
    tensors_out: dict       # outputs.safetensors

    def request(self, run: str, **kw) -> Request:
        ids = self.inputs["prompt_ids"][run]
        if run == "tts":
            return Request(ids, mode="tts", tts_chunks=self.inputs["tts_chunk_ids"][1:], greedy=True, **kw)
        return Request(ids, mode=run, audio_codes=self.tensors_in["speech.audio_codes"], greedy=True, **kw)

    @property
    def context(self) -> int:
        """The smallest context (EngineConfig.max_len) every fixture run fits in. A sequence
        ends with "length" only when it must go on holding more than max_len tokens; the
        longest a run holds while going on is what its last forward leaves in the KV cache
        (the final token is appended, never forwarded), i.e. its final_kv_len."""
        return max(r["final_kv_len"] for r in self.outputs["runs"].values())

    def strings(self, *ids: int) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(ids))

    def engine(self, **cfg) -> Engine:
        cfg.setdefault("num_slots", 8)
        cfg.setdefault("max_len", self.context)
        return Engine(self.model, self.tokenizer, generation_config=self.gen_config, config=EngineConfig(**cfg))


@functools.lru_cache(maxsize=2)
def _load(root) -> tuple:
    from transformers import AutoTokenizer

    from tests.parity import Fixtures
    fx = Fixtures(root)
    tok = AutoTokenizer.from_pretrained(str(root / FIX / "tokenizer"))
    model = AudioLLM(fx.model_config)            # fp32, as the fixture ran
    model.load_tensors(fx.load(FIX, "weights.safetensors"), source=f"{FIX}/weights.safetensors")
    model.eval()
    return (model, tok, fx.json(FIX, "generation_config.json"), fx.json(FIX, "inputs.json"),
            fx.json(FIX, "outputs.json"), fx.load(FIX, "inputs.safetensors"), fx.load(FIX, "outputs.safetensors"))


@pytest.fixture(scope="module")
def protocol_env(fixtures) -> ProtocolEnv:
    fixtures.require(FIX)
    return ProtocolEnv(fixtures, *_load(fixtures.root))


def display(env: ProtocolEnv, decoded: str) -> str:
    """The demo's shown text: the decode with <|endoftext|>, <audiogen_start_baichuan> and
    <audiogen_end_baichuan> removed (their token strings, from the tokenizer and config ids)."""
    a = env.fixtures.model_config.audio_tokens
    for s in env.strings(env.tokenizer.eos_token_id, a.audiogen_start, a.audiogen_end):
        decoded = decoded.replace(s, "")
    return decoded


def check_run(env: ProtocolEnv, run: str, events: list, trace=None) -> None:
    """Compare one request's events with the fixture's record of `run`."""
    ref = env.outputs["runs"][run]
    out = env.tensors_out
    done = events[-1]
    assert isinstance(done, Done), done
    assert list(done.final_sequence) == ref["final_sequence"], f"{run}: final_sequence differs"
    assert torch.equal(torch.tensor(done.final_sequence), out[f"{run}.final_sequence"])
    assert done.kv_len == ref["final_kv_len"]
    # host writes (no-ops included), in order
    want = [(w["position"], w["old_id"], w["new_id"]) for w in ref["host_overwrites"]]
    assert list(done.host_writes) == want, f"{run}: host writes {done.host_writes} != {want}"

    ends = [e for e in events if isinstance(e, SegmentEnd)]
    texts = [e for e in ends if e.kind == "text"]
    audios = [e for e in ends if e.kind == "audio"]
    ref_texts = [s for s in ref["segments"] if s["type"] == "text"]
    ref_audios = [s for s in ref["segments"] if s["type"] == "audio"]
    assert len(texts) == len(ref_texts) and len(audios) == len(ref_audios), \
        f"{run}: {len(texts)} text / {len(audios)} audio segments, want {len(ref_texts)} / {len(ref_audios)}"
    stop_name = {"eos_token_id": "eos", "max_new_tokens": "max_new"}
    for i, (e, r) in enumerate(zip(texts, ref_texts)):
        assert list(e.token_ids) == r["generated_ids"], f"{run}: text segment {i} ids"
        first = r["stop"][0]
        assert e.reason == stop_name.get(first, first.replace("stop_string:", "stop:")), (e.reason, r["stop"])
        shown = (env.outputs["runs"]["asr"]["result"][0]["generated"] if run == "asr"
                 else display(env, r["decoded"]))
        assert e.text == shown, f"{run}: text segment {i} text"
        deltas = "".join(d.text for d in events if isinstance(d, TextToken) and d.segment == i)
        assert deltas == e.text, f"{run}: streamed deltas of segment {i} do not add up to its text"
    for i, (e, r) in enumerate(zip(audios, ref_audios)):
        codes = torch.tensor(e.codes, dtype=torch.int64)
        assert torch.equal(codes, out[f"{run}.audio.{i}.codes"]), f"{run}: audio segment {i} codes"
        assert list(e.end_codes) == r["eos_frame_codes"], f"{run}: end-of-audio frame of segment {i}"
    if trace is not None:
        log = torch.tensor([t[1:] for t in trace if t[0] == done.request_id], dtype=torch.int64)
        assert torch.equal(log, out[f"{run}.forward_log"]), f"{run}: forward log differs"


def record_forwards(model, monkeypatch) -> list:
    """What the model is actually fed, per row of every forward: (new tokens, KV length
    before, first and last RoPE position), the fixture's forward_log columns. The engine's
    own trace derives positions from its KV bookkeeping; this catches a position bug the
    logits would hide (RoPE is relative, so a uniform shift only changes rounding)."""
    rows = []
    orig = model.forward

    def forward(embeds, positions, cache, slots, cache_pos, n_new=None, kv_len=None):
        n = n_new.tolist() if n_new is not None else [embeds.shape[1]] * embeds.shape[0]
        for b, (k, c) in enumerate(zip(n, cache_pos.tolist())):
            rows.append((k, c, int(positions[b, 0]), int(positions[b, k - 1])))
        return orig(embeds, positions, cache, slots, cache_pos, n_new, kv_len)

    monkeypatch.setattr(model, "forward", forward)
    return rows


@pytest.mark.parametrize("run", RUNS)
def test_parity_protocol(protocol_env, run, monkeypatch):
    fed = record_forwards(protocol_env.model, monkeypatch)
    eng = protocol_env.engine(trace=True)
    h = eng.submit(protocol_env.request(run))
    eng.run_until_idle()
    check_run(protocol_env, run, h.drain(), eng.trace)
    log = torch.tensor(fed, dtype=torch.int64)                      # one request: every row is its
    assert torch.equal(log, protocol_env.tensors_out[f"{run}.forward_log"]), f"{run}: positions fed differ"


def test_parity_protocol_all_runs_batched(protocol_env):
    """The four runs together in one engine (one forward per step for all of them)."""
    assert set(protocol_env.outputs["runs"]) == set(RUNS)
    eng = protocol_env.engine()
    hs = {run: eng.submit(protocol_env.request(run)) for run in RUNS}
    eng.run_until_idle()
    for run, h in hs.items():
        check_run(protocol_env, run, h.drain())


# On a GPU machine: BAICHUAN_AUDIO_TEST_DEVICE=cuda pytest tests/llm/test_parity_protocol.py
GPU = os.environ.get("BAICHUAN_AUDIO_TEST_DEVICE", "")


@pytest.mark.skipif(not GPU.startswith("cuda"), reason="needs BAICHUAN_AUDIO_TEST_DEVICE=cuda and a GPU")
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "static"])
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_parity_protocol_on_the_gpu(protocol_env, graphs, paged):
    """The fixture's runs on CUDA in fp32 (as the fixture ran), decode steps replayed as CUDA
    graphs or eager, each run alone and all four batched."""
    env = ProtocolEnv(protocol_env.fixtures, AudioLLM(protocol_env.fixtures.model_config), *_load(
        protocol_env.fixtures.root)[1:])
    env.model.load_state_dict(protocol_env.model.state_dict())
    env.model.to(GPU).eval()
    for run in RUNS:
        eng = env.engine(cuda_graphs=graphs, paged=paged)
        h = eng.submit(env.request(run))
        eng.run_until_idle()
        check_run(env, run, h.drain())
    eng = env.engine(cuda_graphs=graphs, paged=paged)
    hs = {run: eng.submit(env.request(run)) for run in RUNS}
    eng.run_until_idle()
    for run, h in hs.items():
        check_run(env, run, h.drain())
