"""TokenizerRunner: fixture parity from raw audio, batching, checkpoints, input errors."""
from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import save_file

from services.common.checkpoint import PREFIX, Checkpoint, CheckpointError
from services.common.layers import sinusoids
from services.tokenizer.audio_io import AudioInputError
from services.tokenizer.runner import TokenizerRunner


@pytest.fixture(scope="module")
def waves(fixtures):
    t = fixtures.load("01_frontend", "frontend.safetensors")
    cases = fixtures.json("01_frontend", "frontend.json")["cases"]
    return {c: (t[f"{c}.wave_in_int16"].float() / 32768.0, cases[c]["source_sample_rate"])
            for c in ("speech", "tone", "tone2", "stereo")} | {"_int16": t, "_meta": cases}


@pytest.fixture(scope="module")
def weights(fixtures):
    return fixtures.load("02_tokenizer", "weights.safetensors")


@pytest.fixture(scope="module")
def runner(fixtures, weights):
    return TokenizerRunner(fixtures.model_config, weights, device="cpu")


def test_parity_runner_from_audio(fixtures, waves, runner):
    """Source audio (48 kHz speech, 16 kHz tone) -> the fixture-02 fp32 codes, exactly."""
    codes = runner.tokenize([waves["speech"], waves["tone"]])
    exp = fixtures.load("02_tokenizer", "outputs_fp32.safetensors")["codes"]
    bl = fixtures.load("02_tokenizer", "inputs.safetensors")["bridge_length"].tolist()
    assert [c.shape[0] for c in codes] == bl
    assert torch.equal(torch.cat(codes), exp)


def test_parity_runner_bf16_codes(fixtures, waves, weights):
    r = TokenizerRunner(fixtures.model_config, weights, device="cpu", dtype=torch.bfloat16)
    got = torch.cat(r.tokenize([waves["speech"], waves["tone"]]))
    exp = fixtures.load("02_tokenizer", "outputs_bf16.safetensors")["codes"]
    assert got.shape == exp.shape
    assert (got == exp).float().mean().item() >= 0.97


def test_batched_equals_one_at_a_time(waves, runner):
    """tone2 (51 mel frames) has an odd length whose last encoder frame would see the batch
    padding up to stereo's 201 frames; each request must still get its solo codes."""
    items = [waves["tone2"], waves["stereo"], waves["tone"]]
    batched = runner.tokenize(items)
    for item, got in zip(items, batched):
        alone = runner.tokenize([item])[0]
        assert torch.equal(got, alone)


def test_joint_padding_reproduces_reference_collate(fixtures, waves, runner):
    """joint_padding: the reference's collate (pad to the longest) -- for the fixture's own
    batch the codes are the fixture's; an odd-length shorter request then differs from alone."""
    codes = runner.tokenize([waves["speech"], waves["tone"]], joint_padding=True)
    exp = fixtures.load("02_tokenizer", "outputs_fp32.safetensors")["codes"]
    assert torch.equal(torch.cat(codes), exp)
    joint = runner.tokenize([waves["speech"], waves["stereo"]], joint_padding=True)[1]
    assert not torch.equal(joint, runner.tokenize([waves["stereo"]])[0])


def test_parity_long_audio_chunks(fixtures, waves, runner):
    """35 s: two chunks (30 s + 5 s), their tokens concatenated (frontend.json long35)."""
    meta = waves["_meta"]["long35"]
    sp = waves["_int16"]["speech.wave_in_int16"]
    n = meta["source_num_samples"]
    wave = sp.repeat(1, -(-n // sp.shape[1]))[:, :n].float() / 32768.0
    codes = runner.tokenize([(wave, meta["source_sample_rate"]), waves["tone"]])
    assert codes[0].shape == (meta["total_bridge_length"], fixtures.model_config.audio.num_codebooks)
    first = runner.tokenize([(wave[:, :30 * meta["source_sample_rate"]], meta["source_sample_rate"])])[0]
    assert torch.equal(codes[0][:first.shape[0]], first)


def test_all_single_token_batch(fixtures, runner):
    """Correction 6: a batch in which every audio has bridge length 1 gives one row each."""
    a = fixtures.model_config.audio
    g = torch.Generator().manual_seed(0)
    items = [(0.1 * torch.randn(1, 960, generator=g), a.sampling_rate) for _ in range(3)]
    codes = runner.tokenize(items)
    assert [tuple(c.shape) for c in codes] == [(1, a.num_codebooks)] * 3
    for item, c in zip(items, codes):
        assert torch.equal(runner.tokenize([item])[0], c)


def test_tokenize_bytes(fixtures, waves, runner):
    sf = pytest.importorskip("soundfile")
    blobs = []
    for c in ("speech", "tone"):
        b = io.BytesIO()
        sf.write(b, waves["_int16"][f"{c}.wave_in_int16"].T.numpy(), waves[c][1], format="WAV", subtype="PCM_16")
        blobs.append(b.getvalue())
    codes = runner.tokenize_bytes(blobs)
    exp = fixtures.load("02_tokenizer", "outputs_fp32.safetensors")["codes"]
    assert torch.equal(torch.cat(codes), exp)


def test_bad_request_is_named(fixtures, waves, runner):
    a = fixtures.model_config.audio
    short = (torch.zeros(1, 959), a.sampling_rate)           # 959 samples: bridge length 0
    with pytest.raises(AudioInputError, match="request 1") as e:
        runner.tokenize([waves["tone"], short])
    assert e.value.reason == "too_short"
    nan = torch.zeros(1, 16000)
    nan[0, 5] = float("nan")
    with pytest.raises(AudioInputError) as e:
        runner.tokenize([(nan, a.sampling_rate)])
    assert e.value.reason == "non_finite"


def test_mono_1d_waveform_accepted(waves, runner):
    w, sr = waves["tone"]
    assert torch.equal(runner.tokenize([(w[0], sr)])[0], runner.tokenize([(w, sr)])[0])


def _write_checkpoint(path, config: dict, tensors: dict):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return Checkpoint(path)


def test_from_checkpoint(fixtures, waves, weights, tmp_path):
    cfg = fixtures.json(".", "model_config.json")
    ck = _write_checkpoint(tmp_path / "full", cfg, weights)
    r = TokenizerRunner.from_checkpoint(ck, device="cpu")
    assert r.dtype == torch.float32
    exp = fixtures.load("02_tokenizer", "outputs_fp32.safetensors")["codes"]
    assert torch.equal(torch.cat(r.tokenize([waves["speech"], waves["tone"]])), exp)


def test_from_checkpoint_without_positional_table(fixtures, weights, tmp_path):
    cfg = fixtures.json(".", "model_config.json")
    w = {k: v for k, v in weights.items() if k != PREFIX["encoder"] + "positional_embedding"}
    r = TokenizerRunner.from_checkpoint(_write_checkpoint(tmp_path / "nopos", cfg, w), device="cpu")
    a = fixtures.model_config.audio
    # torch_dtype bfloat16: the table a bf16-initialised reference would hold
    assert torch.equal(r.encoder.positional_embedding, sinusoids(a.max_source_positions, a.d_model, torch.bfloat16))


def test_from_checkpoint_missing_key_is_named(fixtures, weights, tmp_path):
    cfg = fixtures.json(".", "model_config.json")
    w = {k: v for k, v in weights.items() if k != PREFIX["bridge"] + "down_proj.weight"}
    with pytest.raises(CheckpointError, match=r"audio_tokenizer\.audio_bridge_model\.down_proj\.weight"):
        TokenizerRunner.from_checkpoint(_write_checkpoint(tmp_path / "bad", cfg, w), device="cpu")


def test_bench_smoke(fixtures, capsys):
    from services.tokenizer.bench import bench_tokenizer, mid_config, real_config
    from services.common.model_config import ModelConfig

    res = bench_tokenizer(fixtures.model_config, batch_sizes=(1, 2), seconds=0.5, device="cpu", iters=1, warmup=0)
    assert [r["batch_size"] for r in res] == [1, 2] and all(r["rtf"] > 0 for r in res)
    assert "RTF" in capsys.readouterr().out
    real = ModelConfig.from_dict(real_config())
    assert (real.audio.d_model, real.audio.encoder_layers, real.audio.bridge_dim) == (1280, 32, 5120)
    assert real.audio.codebook_sizes == (8192, 4096, 2048, 1024, 1024, 1024, 1024, 1024)
    assert real.audio_tokens.audio_pad == 151659
    assert ModelConfig.from_dict(mid_config()).audio.codebook_sizes == real.audio.codebook_sizes


def test_chunk_count_follows_the_reference_split(fixtures):
    from services.tokenizer.runner import TokenizerRunner

    runner = TokenizerRunner(fixtures.model_config, None)
    for name, case in fixtures.json("01_frontend", "frontend.json")["cases"].items():
        got = runner.chunk_count(case["source_num_samples"], case["source_sample_rate"])
        assert got == len(case["chunks"]), name
    assert runner.chunk_count(16000 * 30 + 1, 16000) == 1       # the 1-sample tail is dropped
