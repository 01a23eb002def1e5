"""Fixture 06_protocol: the engine in greedy mode reproduces the reference demo loops
(spoken, text, tts, asr) token for token and code for code (reference-model.md §11,
corrections 10-15).

Also holds the fixture loaders the engine tests share (`protocol_env`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from services.llm.engine import Engine, EngineConfig, Request
from services.llm.model import AudioLLM
from services.llm.scheduler import Done, SegmentEnd, TextDelta

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

    def engine(self, **cfg) -> Engine:
        cfg.setdefault("num_slots", 8)
        cfg.setdefault("max_len", 256)
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
    if not fixtures.has(FIX):
        pytest.skip(f"fixture {FIX} not in {fixtures.root}")
    return ProtocolEnv(fixtures, *_load(fixtures.root))


def display(decoded: str) -> str:
    """The demo's shown text: the decode with these three strings removed."""
    for s in ("<|endoftext|>", "<audiogen_start_baichuan>", "<audiogen_end_baichuan>"):
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
        shown = env.outputs["runs"]["asr"]["result"][0]["generated"] if run == "asr" else display(r["decoded"])
        assert e.text == shown, f"{run}: text segment {i} text"
        deltas = "".join(d.text for d in events if isinstance(d, TextDelta) and d.segment == i)
        assert deltas == e.text, f"{run}: streamed deltas of segment {i} do not add up to its text"
    for i, (e, r) in enumerate(zip(audios, ref_audios)):
        codes = torch.tensor(e.codes, dtype=torch.int64)
        assert torch.equal(codes, out[f"{run}.audio.{i}.codes"]), f"{run}: audio segment {i} codes"
        assert list(e.end_codes) == r["eos_frame_codes"], f"{run}: end-of-audio frame of segment {i}"
    if trace is not None:
        log = torch.tensor([t[1:] for t in trace if t[0] == done.request_id], dtype=torch.int64)
        assert torch.equal(log, out[f"{run}.forward_log"]), f"{run}: forward log differs"


@pytest.mark.parametrize("run", RUNS)
def test_parity_protocol(protocol_env, run):
    eng = protocol_env.engine(trace=True)
    h = eng.submit(protocol_env.request(run))
    eng.run_until_idle()
    check_run(protocol_env, run, h.drain(), eng.trace)


def test_parity_protocol_all_runs_batched(protocol_env):
    """The four runs together in one engine (one forward per step for all of them)."""
    eng = protocol_env.engine()
    hs = {run: eng.submit(protocol_env.request(run)) for run in RUNS}
    eng.run_until_idle()
    for run, h in hs.items():
        check_run(protocol_env, run, h.drain())
