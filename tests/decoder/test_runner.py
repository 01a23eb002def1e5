"""DecoderRunner: end to end from codes against fixture 04, input validation, batching, loading."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from services.common.checkpoint import PREFIX, CheckpointError
from services.common.chunking import chunk_plan
from services.common.layers import sinusoids
from services.decoder.runner import DecodeInputError, DecoderRunner, mel_frames, waveform_distance
from tests.decoder.conftest import DTYPES, FIX, check_close


@pytest.fixture(scope="module")
def weights(fixtures):
    fixtures.require(FIX)
    return fixtures.load(FIX, "weights.safetensors")


@pytest.fixture(scope="module")
def runner(fixtures, weights):
    return DecoderRunner(fixtures.model_config, weights)


def _segments(inputs):
    return list(torch.split(inputs["codes_batch"], inputs["bridge_length_batch"].tolist()))


def _codes(runner, frames: int) -> torch.Tensor:
    """Valid all-zero codes of `frames` frames, one column per codebook of the config."""
    return torch.zeros(frames, len(runner.codebook_sizes), dtype=torch.long)


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_parity_end_to_end_from_codes(fixtures, weights, kind):
    """codes -> mel with the stored noise: a single segment, and a batch of two segments of different
    lengths where each matches itself decoded alone and the longest also the reference batch
    (correction 5: the reference's batch GroupNorm changes only the padded, shorter segments)."""
    run = DecoderRunner(fixtures.model_config, weights, dtype=DTYPES[kind])
    i = fixtures.load(FIX, "inputs.safetensors")
    o = fixtures.load(FIX, f"outputs_{kind}.safetensors")
    (mel,) = run.decode([i["codes_single"]], noise=[o["single.noise"][0]])
    frames = int(o["single.flow_matching_mel_lengths"][0])
    assert mel.dtype == torch.float32 and mel.shape == (fixtures.model_config.flow.in_channels, frames)
    check_close(fixtures, mel.T, o["single.flow_matching_mel"][0], f"04/{kind}/single.flow_matching_mel", kind)

    segs = _segments(i)
    assert len(segs) == 2 and torch.equal(segs[0], i["codes_single"]), "batch = segment a (single), then b"
    lens = o["batch.flow_matching_mel_lengths"].tolist()
    # Alone: a is `single`, b is `solo_b`; both decoded in one padded batch.
    solo = run.decode(segs, noise=[o["single.noise"][0], o["solo_b.noise"][0]])
    for mel_j, ref in zip(solo, ("single", "solo_b")):
        check_close(fixtures, mel_j.T, o[f"{ref}.flow_matching_mel"][0], f"04/{kind}/batch.flow_matching_mel",
                    kind)
    # The reference batch's noise: the longest segment(s) must match the reference batch.
    batched = run.decode(segs, noise=[o["batch.noise"][j, :, :n] for j, n in enumerate(lens)])
    longest = [j for j, n in enumerate(lens) if n == max(lens)]
    for j in longest:
        check_close(fixtures, batched[j].T, o["batch.flow_matching_mel"][j, :lens[j]],
                    f"04/{kind}/batch.flow_matching_mel", kind)


def test_batch_cfg_matches_separate_calls(fixtures, weights, runner):
    """cond + uncond as one estimator call of batch 2B gives the separate calls. Within kernel
    rounding: a batch of 2B may take other CPU kernels than a batch of B."""
    i = fixtures.load(FIX, "inputs.safetensors")
    segs = _segments(i)
    both = DecoderRunner(fixtures.model_config, weights, batch_cfg=True)
    for x, y in zip(runner.decode(segs, seed=3), both.decode(segs, seed=3)):
        fixtures.assert_close(y, x, "04/fp32/batch.flow_matching_mel", "fp32")


def test_seeded_noise_is_per_segment_and_reproducible(fixtures, runner):
    i = fixtures.load(FIX, "inputs.safetensors")
    a, b = _segments(i)
    m1 = runner.decode([a, b], seed=7)
    m2 = runner.decode([a, b], seed=7)
    assert all(torch.equal(x, y) for x, y in zip(m1, m2))
    # Each segment draws its own (mel bins, 4L-1) in input order, so a's mel does not depend on b
    # (up to float rounding of a batch of 1 vs 2).
    fixtures.assert_close(runner.decode([a], seed=7)[0], m1[0], "04/fp32/batch.flow_matching_mel", "fp32")
    # Other noise moves the mel by O(1) (mean 1.16 on the public fixture), far beyond 0.1.
    assert (runner.decode([a], seed=8)[0] - m1[0]).abs().max() > 0.1


def test_trailing_end_of_audio_frame_is_dropped(fixtures, runner):
    i = fixtures.load(FIX, "inputs.safetensors")
    codes = i["codes_single"]
    eos = _codes(runner, 1)
    eos[0, 0] = fixtures.model_config.audio.codebook_sizes[0]
    z = torch.randn(fixtures.model_config.flow.in_channels, mel_frames(codes.shape[0], runner.stride),
                    generator=torch.Generator().manual_seed(0))
    (with_eos,) = runner.decode([torch.cat([codes, eos])], noise=[z])
    (plain,) = runner.decode([codes], noise=[z])
    assert torch.equal(with_eos, plain)


def test_bad_inputs_are_refused_with_precise_messages(fixtures, runner):
    K = fixtures.model_config.audio.codebook_sizes
    C, M = len(K), fixtures.model_config.flow.in_channels
    k_mid, k_last = C // 2, C - 1                      # a middle and the last codebook of the config
    good = _codes(runner, 5)                           # 5 frames: this test's own input
    with pytest.raises(DecodeInputError, match="no segments"):
        runner.decode([])
    with pytest.raises(DecodeInputError, match=r"segment 1 has no audio frames"):
        runner.decode([good, _codes(runner, 0)])
    only_eos = _codes(runner, 1)
    only_eos[0, 0] = K[0]
    with pytest.raises(DecodeInputError, match=r"segment 0 has no audio frames"):
        runner.decode([only_eos])
    bad = good.clone()
    bad[3, k_mid] = K[k_mid]
    with pytest.raises(DecodeInputError, match=rf"segment 1: code {K[k_mid]} at frame 3, codebook {k_mid} is out of "
                                               rf"range; codebook {k_mid} has {K[k_mid]} entries"):
        runner.decode([good, bad])
    neg = good.clone()
    neg[0, k_last] = -1
    with pytest.raises(DecodeInputError, match=rf"code -1 at frame 0, codebook {k_last}"):
        runner.decode([neg])
    mid_eos = good.clone()
    mid_eos[2, 0] = K[0]
    with pytest.raises(DecodeInputError, match=rf"end-of-audio code {K[0]} in codebook 0 at frame 2 of 5"):
        runner.decode([mid_eos])
    n, cap = runner.max_frames + 1, runner.max_frames
    with pytest.raises(DecodeInputError, match=rf"segment 0 has {n} frames \({n * runner.frame_s:.1f} s\); "
                                               rf"the limit is {cap}"):
        runner.decode([_codes(runner, n)])
    with pytest.raises(DecodeInputError, match=rf"expected \(frames, {C}\)"):
        runner.decode([torch.zeros(5, C + 1, dtype=torch.long)])
    with pytest.raises(DecodeInputError, match="must be integers"):
        runner.decode([torch.zeros(5, C)])
    T = mel_frames(good.shape[0], runner.stride)
    with pytest.raises(DecodeInputError, match=rf"noise 0 has shape \({M}, {T - 1}\); segment 0 needs \({M}, {T}\)"):
        runner.decode([good], noise=[torch.zeros(M, T - 1)])


def test_max_frames_is_configurable(fixtures, weights, runner):
    small = DecoderRunner(fixtures.model_config, weights, max_frames=8)     # 8: this test's own cap
    with pytest.raises(DecodeInputError, match="the limit is 8 frames"):
        small.decode([_codes(small, 9)])
    mel = small.decode([_codes(small, 8)], seed=0)[0]
    assert mel.shape == (fixtures.model_config.flow.in_channels, mel_frames(8, small.stride))
    # the longest segment the audio decoder's positional table covers is accepted as a cap, one more is not
    table_tokens = (runner.audio_decoder.max_frames + 1) // runner.stride
    DecoderRunner(fixtures.model_config, weights, max_frames=table_tokens)
    with pytest.raises(ValueError, match="positional table"):
        DecoderRunner(fixtures.model_config, weights, max_frames=table_tokens + 1)


def test_positional_table_computed_when_absent(fixtures, weights):
    """A checkpoint without the decoder's sinusoid buffer gets the reference's init-time table,
    built in the load dtype (§12 item 16): equal to the stored one in fp32, bf16 arithmetic in bf16."""
    key = PREFIX["audio_decoder"] + "positional_embedding"
    stored = weights[key]
    without = {k: v for k, v in weights.items() if k != key}
    run32 = DecoderRunner(fixtures.model_config, without)
    # sin/cos of position x exp'd frequency: an ulp of exp grows with the position, hence the scale
    fixtures.assert_close(run32.audio_decoder.positional_embedding, stored,
                          "04/fp32/audio_decoder.positional_embedding", "fp32", scale=stored.shape[0])
    run16 = DecoderRunner(fixtures.model_config, without, dtype=torch.bfloat16)
    table16 = run16.audio_decoder.positional_embedding
    # the same function, data and shapes in this process: exact
    assert torch.equal(table16, sinusoids(stored.shape[0], stored.shape[1], torch.bfloat16))
    # bf16 arithmetic rounds positions above 256 by whole units (O(1) moves of sin/cos), whereas
    # rounding the fp32 table to bf16 would move no entry by more than 2^-9
    assert (table16.float() - stored).abs().max() > 0.1


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
