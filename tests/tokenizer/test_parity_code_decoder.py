"""Fixture 04: codes -> RVQ sum -> proj_decoder (the decoder stage's CodeDecoder)."""
from __future__ import annotations

import pytest
import torch

from services.common.checkpoint import PREFIX, CheckpointError, load_state
from services.common.codebooks import CodeDecoder
from services.tokenizer.rvq import VQBridge

FX = "04_decoder_flow"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def data(fixtures):
    fixtures.require(FX)
    return {"weights": fixtures.load(FX, "weights.safetensors"), "inputs": fixtures.load(FX, "inputs.safetensors"),
            "fp32": fixtures.load(FX, "outputs_fp32.safetensors"),
            "bf16": fixtures.load(FX, "outputs_bf16.safetensors")}


def decoder(fixtures, weights, dtype):
    m = CodeDecoder(fixtures.model_config.audio)
    load_state(m, weights, PREFIX["bridge"], source=FX, partial=True)
    return m.to(dtype)


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ["single", "batch"])
def test_parity_code_decoder(fixtures, data, kind, case):
    m = decoder(fixtures, data["weights"], DTYPES[kind])
    codes = data["inputs"][f"codes_{case}"]
    out = data[kind]
    with torch.no_grad():
        s = m.recover(codes)
        y = m(codes)
    assert s.dtype == out[f"{case}.rvq_sum_5120"].dtype
    fixtures.assert_close(s, out[f"{case}.rvq_sum_5120"], f"04/{kind}/{case}.rvq_sum_5120", kind)
    fixtures.assert_close(y, out[f"{case}.proj_decoder_out"], f"04/{kind}/{case}.proj_decoder_out", kind)
    # The sum is gathers and fp32 additions in the reference's order (no matmul, no transcendental):
    # IEEE-exact on any CPU, so bit for bit. The projection (a matmul) is compared above with a tolerance.
    assert torch.equal(s, out[f"{case}.rvq_sum_5120"])


def test_code_decoder_declares_only_codebooks_and_projection(fixtures):
    m = CodeDecoder(fixtures.model_config.audio)
    n = fixtures.model_config.audio.num_codebooks
    assert set(m.state_dict()) == {f"vq_list.{i}.codebook.embed" for i in range(n)} | \
        {"proj_decoder.weight", "proj_decoder.bias"}


def test_bridge_decode_matches_code_decoder(fixtures, data):
    """The tokenizer-side bridge (loaded strictly from fixture 02: one model, so the same
    codebooks and proj_decoder) shares the decode maths."""
    fixtures.require("02_tokenizer")
    br = VQBridge(fixtures.model_config.audio)
    load_state(br, fixtures.load("02_tokenizer", "weights.safetensors"), PREFIX["bridge"], source="02")
    codes = data["inputs"]["codes_batch"]
    with torch.no_grad():
        got = br.decode(codes)
        # The same ops on the same data in one process: bit for bit (also checks that 02's and
        # 04's copies of the codebooks and proj_decoder are the same tensors).
        assert torch.equal(got, decoder(fixtures, data["weights"], torch.float32)(codes))
    # Against the reference: its matmul rounds differently on other CPUs.
    fixtures.assert_close(got, data["fp32"]["batch.proj_decoder_out"], "04/fp32/batch.proj_decoder_out", "fp32")


def test_code_decoder_missing_codebook_is_named(fixtures, data):
    last = fixtures.model_config.audio.num_codebooks - 1
    w = {k: v for k, v in data["weights"].items() if not k.endswith(f"vq_list.{last}.codebook.embed")}
    with pytest.raises(CheckpointError, match=rf"vq_list\.{last}\.codebook\.embed"):
        load_state(CodeDecoder(fixtures.model_config.audio), w, PREFIX["bridge"], source=FX, partial=True)


def test_code_decoder_rejects_wrong_code_shape(fixtures):
    n = fixtures.model_config.audio.num_codebooks
    m = CodeDecoder(fixtures.model_config.audio)
    for cols in (n - 1, n + 1):                    # one column short, one too many
        with pytest.raises(ValueError, match="one column per codebook"):
            m(torch.zeros(3, cols, dtype=torch.long))
