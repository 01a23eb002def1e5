"""DecoderRunner: end to end from codes against fixture 04, input validation, batching, loading."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from services.common.checkpoint import PREFIX, CheckpointError
from services.common.layers import sinusoids
from services.decoder.runner import DecodeInputError, DecoderRunner, chunk_plan, mel_frames, waveform_distance
from tests.decoder.conftest import DTYPES, FIX


@pytest.fixture(scope="module")
def weights(fixtures):
    return fixtures.load(FIX, "weights.safetensors")


@pytest.fixture(scope="module")
def runner(fixtures, weights):
    return DecoderRunner(fixtures.model_config, weights)


def _segments(inputs):
    return list(torch.split(inputs["codes_batch"], inputs["bridge_length_batch"].tolist()))


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_parity_end_to_end_from_codes(fixtures, weights, kind):
    """codes -> mel with the stored noise: a single segment, and a batch of two segments of different
    lengths where a matches the reference batch and b matches b decoded alone (correction 5)."""
    run = DecoderRunner(fixtures.model_config, weights, dtype=DTYPES[kind])
    i = fixtures.load(FIX, "inputs.safetensors")
    o = fixtures.load(FIX, f"outputs_{kind}.safetensors")
    (mel,) = run.decode([i["codes_single"]], noise=[o["single.noise"][0]])
    assert mel.dtype == torch.float32 and mel.shape == (80, 119)
    fixtures.assert_close(mel.T, o["single.flow_matching_mel"][0], f"04/{kind}/single.flow_matching_mel", kind)
    a, b = _segments(i)
    mel_a, mel_b = run.decode([a, b], noise=[o["batch.noise"][0], o["solo_b.noise"][0]])
    fixtures.assert_close(mel_a.T, o["batch.flow_matching_mel"][0], f"04/{kind}/batch.flow_matching_mel", kind)
    fixtures.assert_close(mel_b.T, o["solo_b.flow_matching_mel"][0], f"04/{kind}/batch.flow_matching_mel", kind)


def test_batch_cfg_is_bit_identical(fixtures, weights, runner):
    """cond + uncond as one estimator call of batch 2B gives exactly the separate calls (CPU kernels)."""
    i = fixtures.load(FIX, "inputs.safetensors")
    segs = _segments(i)
    both = DecoderRunner(fixtures.model_config, weights, batch_cfg=True)
    for x, y in zip(runner.decode(segs, seed=3), both.decode(segs, seed=3)):
        assert torch.equal(x, y)


def test_seeded_noise_is_per_segment_and_reproducible(fixtures, runner):
    i = fixtures.load(FIX, "inputs.safetensors")
    a, b = _segments(i)
    m1 = runner.decode([a, b], seed=7)
    m2 = runner.decode([a, b], seed=7)
    assert all(torch.equal(x, y) for x, y in zip(m1, m2))
    # Each segment draws its own (80, 4L-1) in input order, so a's mel does not depend on b
    # (up to float rounding of a batch of 1 vs 2).
    assert torch.allclose(runner.decode([a], seed=7)[0], m1[0], atol=1e-5)
    assert not torch.allclose(runner.decode([a], seed=8)[0], m1[0], atol=1e-1)


def test_trailing_end_of_audio_frame_is_dropped(fixtures, runner):
    i = fixtures.load(FIX, "inputs.safetensors")
    codes = i["codes_single"]
    eos = torch.zeros(1, 8, dtype=torch.long)
    eos[0, 0] = fixtures.model_config.audio.codebook_sizes[0]
    z = torch.randn(80, mel_frames(codes.shape[0]), generator=torch.Generator().manual_seed(0))
    (with_eos,) = runner.decode([torch.cat([codes, eos])], noise=[z])
    (plain,) = runner.decode([codes], noise=[z])
    assert torch.equal(with_eos, plain)


def test_bad_inputs_are_refused_with_precise_messages(fixtures, runner):
    K = fixtures.model_config.audio.codebook_sizes
    good = torch.zeros(5, 8, dtype=torch.long)
    with pytest.raises(DecodeInputError, match="no segments"):
        runner.decode([])
    with pytest.raises(DecodeInputError, match=r"segment 1 has no audio frames"):
        runner.decode([good, torch.zeros(0, 8, dtype=torch.long)])
    only_eos = torch.zeros(1, 8, dtype=torch.long)
    only_eos[0, 0] = K[0]
    with pytest.raises(DecodeInputError, match=r"segment 0 has no audio frames"):
        runner.decode([only_eos])
    bad = good.clone()
    bad[3, 2] = K[2]
    with pytest.raises(DecodeInputError, match=rf"segment 1: code {K[2]} at frame 3, codebook 2 is out of range; "
                                               rf"codebook 2 has {K[2]} entries"):
        runner.decode([good, bad])
    neg = good.clone()
    neg[0, 7] = -1
    with pytest.raises(DecodeInputError, match=r"code -1 at frame 0, codebook 7"):
        runner.decode([neg])
    mid_eos = good.clone()
    mid_eos[2, 0] = K[0]
    with pytest.raises(DecodeInputError, match=rf"end-of-audio code {K[0]} in codebook 0 at frame 2 of 5"):
        runner.decode([mid_eos])
    with pytest.raises(DecodeInputError, match=r"segment 0 has 501 frames \(40.1 s\); the limit is 500"):
        runner.decode([torch.zeros(501, 8, dtype=torch.long)])
    with pytest.raises(DecodeInputError, match=r"expected \(frames, 8\)"):
        runner.decode([torch.zeros(5, 7, dtype=torch.long)])
    with pytest.raises(DecodeInputError, match="must be integers"):
        runner.decode([torch.zeros(5, 8)])
    with pytest.raises(DecodeInputError, match=r"noise 0 has shape \(80, 10\); segment 0 needs \(80, 19\)"):
        runner.decode([good], noise=[torch.zeros(80, 10)])


def test_max_frames_is_configurable(fixtures, weights):
    small = DecoderRunner(fixtures.model_config, weights, max_frames=8)
    with pytest.raises(DecodeInputError, match="the limit is 8 frames"):
        small.decode([torch.zeros(9, 8, dtype=torch.long)])
    assert small.decode([torch.zeros(8, 8, dtype=torch.long)], seed=0)[0].shape == (80, 31)
    with pytest.raises(ValueError, match="positional table"):
        DecoderRunner(fixtures.model_config, weights, max_frames=751)


def test_positional_table_computed_when_absent(fixtures, weights):
    """A checkpoint without the decoder's sinusoid buffer gets the reference's init-time table,
    built in the load dtype (§12 item 16): equal to the stored one in fp32, bf16 arithmetic in bf16."""
    key = PREFIX["audio_decoder"] + "positional_embedding"
    stored = weights[key]
    without = {k: v for k, v in weights.items() if k != key}
    run32 = DecoderRunner(fixtures.model_config, without)
    assert torch.equal(run32.audio_decoder.positional_embedding, stored)
    run16 = DecoderRunner(fixtures.model_config, without, dtype=torch.bfloat16)
    table16 = run16.audio_decoder.positional_embedding
    assert torch.equal(table16, sinusoids(stored.shape[0], stored.shape[1], torch.bfloat16))
    assert (table16.float() - stored).abs().max() > 1.0      # positions above 256 rounded in bf16


def test_from_checkpoint_directory(fixtures, weights, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(fixtures.model_config.raw))
    save_file(weights, str(tmp_path / "model.safetensors"))
    run = DecoderRunner.from_checkpoint(tmp_path)
    assert run.dtype == torch.float32 and run.device.type == "cpu"
    i = fixtures.load(FIX, "inputs.safetensors")
    o = fixtures.load(FIX, "outputs_fp32.safetensors")
    (mel,) = run.decode([i["codes_single"]], noise=[o["single.noise"][0]])
    fixtures.assert_close(mel.T, o["single.flow_matching_mel"][0], "04/fp32/single.flow_matching_mel", "fp32")
    missing = {k: v for k, v in weights.items() if not k.endswith("final_proj.bias")}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing: audio_tokenizer\.audio_flow_matching_decoder\."
                                              r"conditional_decoder\.final_proj\.bias"):
        DecoderRunner.from_checkpoint(tmp_path)


def test_chunk_plan():
    assert chunk_plan(30) == [(0, 6), (6, 18), (18, 30)]
    assert chunk_plan(150, 6, 2.0, 50) == [(0, 6), (6, 18), (18, 42), (42, 90), (90, 140), (140, 150)]
    assert chunk_plan(4) == [(0, 4)]
    with pytest.raises(ValueError):
        chunk_plan(10, first_chunk=0)


def test_waveform_distance_is_phase_blind():
    g = torch.Generator().manual_seed(0)
    n = torch.arange(24000)
    a = 0.3 * torch.sin(2 * torch.pi * 220 * n / 24000)
    b = 0.3 * torch.sin(2 * torch.pi * 220 * n / 24000 + 1.0)          # same spectrum, other phase
    c = 0.3 * torch.sin(2 * torch.pi * 330 * n / 24000)
    noise = 1e-3 * torch.randn(24000, generator=g)
    assert waveform_distance(a + noise, a + noise) == 0.0
    # measured: 0.035 (phase shift) vs 0.149 (other pitch)
    assert waveform_distance(a + noise, b + noise) < 0.3 * waveform_distance(a + noise, c + noise)
