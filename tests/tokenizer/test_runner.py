"""TokenizerRunner: fixture parity from raw audio, batching, checkpoints, input errors."""
from __future__ import annotations

import io
import json

import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

from services.common.checkpoint import PREFIX, Checkpoint, CheckpointError
from services.common.layers import sinusoids
from services.tokenizer.audio_io import AudioInputError, min_samples
from services.tokenizer.log_mel import split_lengths, plan_splits, to_mono_16k
from services.tokenizer.runner import TokenizerRunner
from services.common.codebooks import codebooks
from tests.tokenizer.test_parity_encoder_rvq import allowed_bf16_code_flips, batch_cases, sees_padding


@pytest.fixture(scope="module")
def waves(fixtures):
    """Every 01_frontend case whose source samples are stored: (waveform, source rate)."""
    fixtures.require("01_frontend")
    t = fixtures.load("01_frontend", "frontend.safetensors")
    cases = fixtures.json("01_frontend", "frontend.json")["cases"]
    return {c: (t[f"{c}.wave_in_int16"].float() / 32768.0, cases[c]["source_sample_rate"])
            for c in cases if f"{c}.wave_in_int16" in t} | {"_int16": t, "_meta": cases}


@pytest.fixture(scope="module")
def batch(fixtures) -> list[str]:
    """The 01 cases of the fixture-02 batch, in its order."""
    return batch_cases(fixtures)


@pytest.fixture(scope="module")
def weights(fixtures):
    fixtures.require("02_tokenizer")
    return fixtures.load("02_tokenizer", "weights.safetensors")


@pytest.fixture(scope="module")
def runner(fixtures, weights):
    return TokenizerRunner(fixtures.model_config, weights, device="cpu")


def fixture_codes(fixtures, kind: str) -> list[torch.Tensor]:
    """The fixture-02 codes of each sample of its batch."""
    exp = fixtures.load("02_tokenizer", f"outputs_{kind}.safetensors")["codes"]
    return list(exp.split(fixtures.load("02_tokenizer", "inputs.safetensors")["bridge_length"].tolist()))


def unpadded(fixtures, waves, cases: list[str]) -> list[int]:
    """Indices of the cases that the reference collate's padding (to the longest of `cases`)
    does not reach: for these the batch-invariant runner must give the reference's codes."""
    frames = [waves["_meta"][c]["chunks"][0]["mel_frames"] for c in cases]
    return [i for i, n in enumerate(frames) if not sees_padding(n, max(frames), fixtures.model_config.audio)]


def odd_crop(fixtures, waves, shorter_than: int) -> tuple[torch.Tensor, int]:
    """A piece of the speech at the model rate whose log-mel is shorter than `shorter_than`
    frames and reaches the batch padding (its last encoder frame reads padding)."""
    a = fixtures.model_config.audio
    speech16 = waves["_int16"]["speech.wave_16k"]
    n = a.hop_length * 2 * max(1, shorter_than // 4)          # ~half the frames, n // hop even
    assert split_lengths(n, a).bridge_length > 0 and n <= speech16.shape[-1]
    assert sees_padding(split_lengths(n, a).mel_frames, shorter_than, a)
    return speech16[:, :n], a.sampling_rate


NEAR_TIE = 2.5e-5   # relative distance margin; batch-shape rounding moves a distance by a few fp32 ulps


def tie_safe_rows(runner: TokenizerRunner, item) -> torch.Tensor:
    """(L,) bool over a request's code rows: True where, computed alone, every RVQ stage's nearest
    codebook row wins by more than NEAR_TIE of its distance. fp32 rounding changes with the batch
    shape (other GEMM blockings, ~1e-6), which can flip a code at a near-tie; codes of requests
    batched differently are compared exactly only on these rows."""
    wave, sr = item
    wave = wave[None] if wave.dim() == 1 else wave
    a = runner.audio
    mono = to_mono_16k(wave, sr, a)
    out = []
    for s, e, n in plan_splits(mono.shape[0], a):
        feats, mel = runner.log_mel([mono[s:e]])
        stages: list[torch.Tensor] = []
        with torch.no_grad():
            r = runner.bridge.downsample(runner.encoder(feats, torch.tensor([n.encoder_length]), mel))
            runner.bridge.quantize(r, torch.tensor([n.bridge_length]), stages)
        safe = torch.ones(n.bridge_length, dtype=torch.bool)
        for x, embed in zip(stages, codebooks(runner.bridge.vq_list)):
            two = torch.cdist(x[0, :n.bridge_length].float(), embed.float()).topk(2, largest=False).values
            safe &= (two[:, 1] - two[:, 0]) > NEAR_TIE * two[:, 0].clamp_min(1.0)
        out.append(safe)
    return torch.cat(out)


def assert_same_codes(runner, pairs) -> None:
    """pairs: (codes, codes of the same request batched otherwise, the request). Equal on every
    row that is not a near-tie, and more than half of the rows are checked."""
    checked = total = 0
    for got, alone, item in pairs:
        assert got.shape == alone.shape
        safe = tie_safe_rows(runner, item)
        assert torch.equal(got[safe], alone[safe]), f"{int((got[safe] != alone[safe]).sum())} codes differ"
        checked, total = checked + int(safe.sum()), total + safe.numel()
    assert 2 * checked > total, f"only {checked} of {total} rows are clear of near-ties"


def test_parity_runner_from_audio(fixtures, waves, runner, batch):
    """Source audio (the fixture batch's cases at their source rates) -> the fixture-02 fp32
    codes, exactly, for every sample the reference collate's padding does not reach (all of
    them in the public fixture; the others are compared under joint_padding below)."""
    codes = runner.tokenize([waves[c] for c in batch])
    exp = fixture_codes(fixtures, "fp32")
    assert [c.shape[0] for c in codes] == [e.shape[0] for e in exp]
    keep = unpadded(fixtures, waves, batch)
    assert keep, "the longest sample is never padded"
    for i in keep:
        assert torch.equal(codes[i], exp[i]), f"{batch[i]}: {(codes[i] != exp[i]).sum()} codes differ"


def test_parity_runner_bf16_codes(fixtures, waves, weights, batch):
    r = TokenizerRunner(fixtures.model_config, weights, device="cpu", dtype=torch.bfloat16)
    got = r.tokenize([waves[c] for c in batch])
    exp = fixture_codes(fixtures, "bf16")
    assert [g.shape for g in got] == [e.shape for e in exp]
    keep = unpadded(fixtures, waves, batch)
    flips, allowed = sum(int((got[i] != exp[i]).sum()) for i in keep), allowed_bf16_code_flips(fixtures)
    assert flips <= allowed, f"{flips} bf16 codes differ from the reference (allowed {allowed})"


def test_batched_equals_one_at_a_time(fixtures, waves, runner, monkeypatch):
    """Each request is computed as if alone, also one whose last encoder frame would see the
    batch padding (an odd-length crop shorter than the longest case): its encoder output in the
    batch is its solo one up to fp32 rounding (the padding would move it by far more), and so
    are its codes, except at near-ties."""
    cases = [c for c in waves if not c.startswith("_")]
    longest = max(waves["_meta"][c]["chunks"][0]["mel_frames"] for c in cases)
    items = [waves[c] for c in cases] + [odd_crop(fixtures, waves, longest)]
    outs, forward = [], runner.encoder.forward

    def spy(features, encoder_lengths, conv_lengths=None):     # records each call's output
        outs.append((encoder_lengths, forward(features, encoder_lengths, conv_lengths)))
        return outs[-1][1]
    monkeypatch.setattr(runner.encoder, "forward", spy)
    batched = runner.tokenize(items)
    alone = [runner.tokenize([item])[0] for item in items]
    (enc_len, h), solo = outs[0], outs[1:]
    for i, (n, h1) in enumerate(zip(enc_len.tolist(), solo)):
        fixtures.assert_close(h[i, :n], h1[1][0, :n], "02/fp32/encoder_out", "fp32")
    assert_same_codes(runner, list(zip(batched, alone, items)))


def test_joint_padding_reproduces_reference_collate(fixtures, waves, runner, batch, monkeypatch):
    """joint_padding: the reference's collate (pad to the longest, conv_lengths=None) -- for the
    fixture's own batch the codes are the fixture's; the default passes each chunk's mel frames.
    The two differ for a shorter chunk that reaches the padding (checked on the encoder output:
    codes, being discrete, mostly hide the change)."""
    codes = runner.tokenize([waves[c] for c in batch], joint_padding=True)
    assert torch.equal(torch.cat(codes), torch.cat(fixture_codes(fixtures, "fp32")))
    a = fixtures.model_config.audio
    longest = max((c for c in waves if not c.startswith("_")), key=lambda c: waves["_meta"][c]["chunks"][0]["mel_frames"])
    items = [waves[longest], odd_crop(fixtures, waves, waves["_meta"][longest]["chunks"][0]["mel_frames"])]
    seen, forward = [], runner.encoder.forward

    def spy(*args):                                          # records each call's arguments
        seen.append(args)
        return forward(*args)
    monkeypatch.setattr(runner.encoder, "forward", spy)
    runner.tokenize(items, joint_padding=True)
    runner.tokenize(items)
    (feats, enc_len, joint_conv), (_, _, own_conv) = seen
    mel_len = torch.tensor([split_lengths(to_mono_16k(w, sr, a).shape[0], a).mel_frames for w, sr in items])
    assert joint_conv is None and own_conv.tolist() == mel_len.tolist()
    with torch.no_grad():
        joint, alone = forward(feats, enc_len), forward(feats, enc_len, mel_len)
    assert torch.equal(joint[0], alone[0])                  # the longest: no padding, same computation
    assert (joint[1] - alone[1]).abs().max().item() > 100 * fixtures.tol("02/fp32/encoder_out", "fp32")


def test_parity_long_audio_chunks(fixtures, waves, runner):
    """The long cases (frontend.json, e.g. long35: 30 s + 5 s): several chunks, their tokens
    concatenated, the first chunk's equal to those of its first max_audio_seconds alone."""
    a = fixtures.model_config.audio
    sp = waves["_int16"]["speech.wave_in_int16"]
    other = next(c for c in waves if not c.startswith("_"))
    long_cases = [c for c in waves["_meta"] if c not in waves]
    assert long_cases, "the fixture has a multi-chunk case"
    for name in long_cases:
        meta = waves["_meta"][name]
        sr, n = meta["source_sample_rate"], meta["source_num_samples"]
        wave = sp.repeat(1, -(-n // sp.shape[1]))[:, :n].float() / 32768.0
        codes = runner.tokenize([(wave, sr), waves[other]])
        assert codes[0].shape == (meta["total_bridge_length"], a.num_codebooks), name
        head = (wave[:, :a.max_audio_seconds * sr], sr)
        first = runner.tokenize([head])[0]
        assert first.shape[0] == meta["chunks"][0]["bridge_length"]
        assert_same_codes(runner, [(codes[0][:first.shape[0]], first, head)])


def test_all_single_token_batch(fixtures, runner):
    """Correction 6: a batch in which every audio has bridge length 1 gives one row each."""
    a = fixtures.model_config.audio
    g = torch.Generator().manual_seed(0)
    n = min_samples(a.sampling_rate, a)                      # the fewest samples of one token
    items = [(0.1 * torch.randn(1, n, generator=g), a.sampling_rate) for _ in range(8)]
    codes = runner.tokenize(items)
    assert [tuple(c.shape) for c in codes] == [(1, a.num_codebooks)] * len(items)
    assert_same_codes(runner, [(c, runner.tokenize([item])[0], item) for item, c in zip(items, codes)])


def test_tokenize_bytes(fixtures, waves, runner, batch):
    blobs = []
    for c in batch:
        b = io.BytesIO()
        sf.write(b, waves["_int16"][f"{c}.wave_in_int16"].T.numpy(), waves[c][1], format="WAV", subtype="PCM_16")
        blobs.append(b.getvalue())
    codes = runner.tokenize_bytes(blobs, joint_padding=True)
    assert torch.equal(torch.cat(codes), torch.cat(fixture_codes(fixtures, "fp32")))


def test_bad_request_is_named(fixtures, waves, runner, batch):
    a = fixtures.model_config.audio
    short = (torch.zeros(1, min_samples(a.sampling_rate, a) - 1), a.sampling_rate)   # bridge length 0
    with pytest.raises(AudioInputError, match="request 1") as e:
        runner.tokenize([waves[batch[0]], short])
    assert e.value.reason == "too_short"
    nan = torch.zeros(1, a.sampling_rate)
    nan[0, 5] = float("nan")
    with pytest.raises(AudioInputError) as e:
        runner.tokenize([(nan, a.sampling_rate)])
    assert e.value.reason == "non_finite"


def test_mono_1d_waveform_accepted(waves, runner, batch):
    w, sr = waves[batch[-1]]
    assert w.shape[0] == 1
    assert torch.equal(runner.tokenize([(w[0], sr)])[0], runner.tokenize([(w, sr)])[0])


def _write_checkpoint(path, config: dict, tensors: dict):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return Checkpoint(path)


def test_from_checkpoint(fixtures, waves, weights, batch, tmp_path):
    cfg = fixtures.json(".", "model_config.json")
    ck = _write_checkpoint(tmp_path / "full", cfg, weights)
    r = TokenizerRunner.from_checkpoint(ck, device="cpu")
    assert r.dtype == torch.float32
    codes = r.tokenize([waves[c] for c in batch], joint_padding=True)
    assert torch.equal(torch.cat(codes), torch.cat(fixture_codes(fixtures, "fp32")))


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


def test_split_count_follows_the_reference_split(fixtures):
    from services.tokenizer.runner import TokenizerRunner

    a = fixtures.model_config.audio
    runner = TokenizerRunner(fixtures.model_config, None)
    for name, case in fixtures.json("01_frontend", "frontend.json")["cases"].items():
        got = runner.split_count(case["source_num_samples"], case["source_sample_rate"])
        assert got == len(case["chunks"]), name
    one_split = a.sampling_rate * a.max_audio_seconds
    assert runner.split_count(one_split + 1, a.sampling_rate) == 1       # the 1-sample tail is dropped
