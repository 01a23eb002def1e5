"""Fixture 02: Whisper-style encoder, VQ bridge and the residual VQ (one stage per codebook), fp32 and bf16."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common.checkpoint import PREFIX, load_state
from services.common.layers import sinusoids
from services.common.model_config import AudioConfig
from services.tokenizer.encoder import AudioEncoder
from services.tokenizer.log_mel import encoder_length
from services.tokenizer.rvq import VQBridge
from tests.parity import MARGIN

FX = "02_tokenizer"
FRONT = "01_frontend"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def batch_cases(fixtures) -> list[str]:
    """The 01_frontend case behind each row of 02's input_features (the fixture's batch), found
    by content: the row is that case's single-chunk log-mel followed by zero padding (stored
    tensors copied by the reference's collate, so compared exactly)."""
    fixtures.require(FRONT)
    feats = fixtures.load(FX, "inputs.safetensors")["input_features"]
    mels = fixtures.load(FRONT, "frontend.safetensors")
    cases = fixtures.json(FRONT, "frontend.json")["cases"]
    out = []
    for b in range(feats.shape[0]):
        hits = []
        for c, meta in cases.items():
            mel = mels.get(f"{c}.mel.0")
            if mel is None or len(meta["chunks"]) != 1 or mel.shape[-1] > feats.shape[-1]:
                continue
            n = mel.shape[-1]
            if torch.equal(feats[b, :, :n], mel) and not feats[b, :, n:].any():
                hits.append(c)
        assert len(hits) == 1, f"row {b} of {FX} input_features matches 01 cases {hits}"
        out.append(hits[0])
    return out


def sees_padding(mel_frames: int, longest: int, audio: AudioConfig) -> bool:
    """Whether a sample of `mel_frames`, batched with zero padding up to `longest`, is changed by
    that padding (the reference collate's batch effect): conv2 (kernel k, stride s, padding k//2)
    makes the last encoder frame read conv1's output at frame s*(n_enc - 1) - k//2 + k - 1,
    which is conv1 applied to the padding when it is >= mel_frames."""
    k, s = audio.kernel_size, audio.stride_size
    n_enc = encoder_length(mel_frames, audio)
    return mel_frames < longest and s * (n_enc - 1) - k // 2 + k - 1 >= mel_frames


def allowed_bf16_code_flips(fixtures) -> int:
    """bf16 codes flip at near-ties when kernels round differently: allow MARGIN times the most
    differing codes the reference's own replays on other kernels showed, and at least one
    flipped frame (a flip changes the residual of every later stage of that frame)."""
    seen = [v["02/bf16/codes"] for v in fixtures.tolerances.values() if "02/bf16/codes" in v]
    return int(max([MARGIN * s for s in seen] + [fixtures.model_config.audio.num_codebooks]))


@pytest.fixture(scope="module")
def data(fixtures):
    fixtures.require(FX)
    return {
        "weights": fixtures.load(FX, "weights.safetensors"),
        "inputs": fixtures.load(FX, "inputs.safetensors"),
        "fp32": fixtures.load(FX, "outputs_fp32.safetensors"),
        "bf16": fixtures.load(FX, "outputs_bf16.safetensors"),
    }


def build(fixtures, weights, dtype):
    """fp32 build and load, then cast: the fixture's bf16 variant is model.to(bf16)."""
    a = fixtures.model_config.audio
    enc, br = AudioEncoder(a), VQBridge(a)
    load_state(enc, weights, PREFIX["encoder"], source=FX, optional=["positional_embedding"])
    load_state(br, weights, PREFIX["bridge"], source=FX)
    return enc.to(dtype).eval(), br.to(dtype).eval()


def valid_codes(codes):
    # (B, T4, n) with -1 beyond each length -> (Σ bridge_length, n), batch-major then time
    return codes[codes[..., 0] >= 0]


@pytest.fixture(scope="module")
def models(fixtures, data):
    return {k: build(fixtures, data["weights"], dt) for k, dt in DTYPES.items()}


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_parity_encoder_out(fixtures, data, models, kind):
    enc, _ = models[kind]
    inp = data["inputs"]
    with torch.no_grad():
        h = enc(inp["input_features"], inp["encoder_length"])
    exp = data[kind]["encoder_out"]
    assert h.dtype == exp.dtype
    fixtures.assert_close(h, exp, f"02/{kind}/encoder_out", kind)
    for b, n in enumerate(inp["encoder_length"].tolist()):
        assert not h[b, n:].any(), "frames beyond encoder_length must be zero"


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_parity_encoder_out_batch_invariant_mode(fixtures, data, models, kind):
    """conv_lengths = each sample's mel frames (01_frontend's frontend.json): every sample the
    reference collate's padding does not reach (the longest always) equals the fixture."""
    enc, _ = models[kind]
    inp = data["inputs"]
    cases = fixtures.json(FRONT, "frontend.json")["cases"]
    chunks = [cases[c]["chunks"][0] for c in batch_cases(fixtures)]
    mel = torch.tensor([c["mel_frames"] for c in chunks])
    assert [c["encoder_length"] for c in chunks] == inp["encoder_length"].tolist()
    with torch.no_grad():
        h = enc(inp["input_features"], inp["encoder_length"], conv_lengths=mel)
    longest = int(mel.max())
    rows = [b for b, n in enumerate(mel.tolist()) if not sees_padding(n, longest, fixtures.model_config.audio)]
    assert rows, "the longest sample is never padded"
    fixtures.assert_close(h[rows], data[kind]["encoder_out"][rows], f"02/{kind}/encoder_out", kind)


def test_parity_fp32_bridge_stages_codes(fixtures, data, models):
    """fp32 end to end: bridge_out, every stage input (all rows) and the codes, exactly."""
    enc, br = models["fp32"]
    inp, out = data["inputs"], data["fp32"]
    stages: list[torch.Tensor] = []
    with torch.no_grad():
        r = br.downsample(enc(inp["input_features"], inp["encoder_length"]))
        codes = br.quantize(r, inp["bridge_length"], stages)
    fixtures.assert_close(r, out["bridge_out"], "02/fp32/bridge_out", "fp32")
    assert len(stages) == fixtures.model_config.audio.num_codebooks
    for i, s in enumerate(stages):
        fixtures.assert_close(s, out[f"rvq_stage_input.{i}"], f"02/fp32/rvq_stage_input.{i}", "fp32")
    got = valid_codes(codes)
    assert got.dtype == torch.int64
    assert torch.equal(got, out["codes"]), f"{(got != out['codes']).sum()} fp32 codes differ"


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_parity_codes_from_stored_encoder_out(fixtures, data, models, kind):
    _, br = models[kind]
    out = data[kind]
    with torch.no_grad():
        r = br.downsample(out["encoder_out"])
        codes = br(out["encoder_out"], data["inputs"]["bridge_length"])
    fixtures.assert_close(r, out["bridge_out"], f"02/{kind}/bridge_out", kind)
    assert torch.equal(valid_codes(codes), out["codes"])


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_parity_rvq_from_stored_bridge_out(fixtures, data, models, kind):
    """Same RVQ input as the reference: every stage input and every code exactly."""
    _, br = models[kind]
    out = data[kind]
    stages: list[torch.Tensor] = []
    with torch.no_grad():
        codes = br.quantize(out["bridge_out"], data["inputs"]["bridge_length"], stages)
    for i, s in enumerate(stages):
        assert s.dtype == out[f"rvq_stage_input.{i}"].dtype
        assert torch.equal(s, out[f"rvq_stage_input.{i}"]), f"stage {i} input differs"
    assert torch.equal(valid_codes(codes), out["codes"])


def test_parity_bf16_codes_end_to_end(fixtures, data, models):
    """bf16 codes are sensitive to kernel rounding (README: a few flip between CPU kernel
    variants); compare statistically against the bf16 fixture."""
    enc, br = models["bf16"]
    inp = data["inputs"]
    with torch.no_grad():
        got = valid_codes(br(enc(inp["input_features"], inp["encoder_length"]), inp["bridge_length"]))
    exp = data["bf16"]["codes"]
    assert got.shape == exp.shape
    flips, allowed = int((got != exp).sum()), allowed_bf16_code_flips(fixtures)
    assert flips <= allowed, f"{flips} of {exp.numel()} bf16 codes differ from the reference (allowed {allowed})"


def test_parity_positional_table_fp32(fixtures, data):
    """fp32 arithmetic gives the reference's stored table (bit for bit on the CPUs tried; exp and
    sin may round an ulp differently elsewhere, and an ulp of the frequency moves the angle t·inv
    by ~ulp(t), so the tolerance scales with the largest position)."""
    a = fixtures.model_config.audio
    stored = data["weights"][PREFIX["encoder"] + "positional_embedding"]
    table = sinusoids(a.max_source_positions, a.d_model)
    assert table.dtype == torch.float32
    fixtures.assert_close(table, stored, "02/positional_embedding", "fp32", scale=a.max_source_positions - 1)


def _spec_table_under_default_dtype(length, channels, dtype):
    # §4 formula, evaluated the way an init under a bf16 default dtype evaluates it
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        inc = np.log(10000) / (channels // 2 - 1)
        inv = torch.exp(-inc * torch.arange(channels // 2))
        t = torch.arange(length)[:, None] * inv[None, :]
        return torch.cat([torch.sin(t), torch.cos(t)], dim=1)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("length,channels", [(1500, 64), (1500, 1280), (3000, 1280)])
def test_positional_table_bf16_arithmetic(length, channels):
    """A checkpoint without the buffer: the table the bf16-initialised reference holds (§12.16)."""
    table = sinusoids(length, channels, torch.bfloat16)
    expected = _spec_table_under_default_dtype(length, channels, torch.bfloat16)
    assert expected.dtype == torch.bfloat16
    assert torch.equal(table, expected)
    if (length, channels) == (1500, 1280):
        # §12 item 16 (the real model's table): max |bf16 table - fp32 table| is 2.0 over 1500 rows;
        # an ulp of fp32 sin may flip a bf16 rounding near ±1 (bf16 spacing there is 2^-7 at most)
        assert (table.float() - sinusoids(length, channels)).abs().max().item() == pytest.approx(2.0, abs=2 ** -7)


def test_encoder_without_stored_table_uses_bf16_arithmetic(fixtures, data):
    a = fixtures.model_config.audio
    weights = {k: v for k, v in data["weights"].items() if not k.endswith("audio_model.positional_embedding")}
    enc = AudioEncoder(a, table_dtype=torch.bfloat16)
    load_state(enc, weights, PREFIX["encoder"], source=FX, optional=["positional_embedding"])
    assert torch.equal(enc.positional_embedding, sinusoids(a.max_source_positions, a.d_model, torch.bfloat16).float())


def test_modules_declare_exactly_the_reference_keys(fixtures, data):
    """State-dict keys are the reference's, minus the documented unused ones."""
    a = fixtures.model_config.audio
    for module, prefix in ((AudioEncoder(a), PREFIX["encoder"]), (VQBridge(a), PREFIX["bridge"])):
        stored = {k[len(prefix):] for k in data["weights"] if k.startswith(prefix)}
        stored = {k for k in stored if not k.endswith(("embed_avg", "cluster_size"))}
        assert set(module.state_dict()) == stored
