"""`make-tiny-checkpoint`: the real layout, strict loading, determinism, and the weight
shaping that makes a generated reply short."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import services.common.checkpoint as checkpoint_mod
from services.common.checkpoint import (
    INDEX_FILE, PREFIX, Checkpoint, CheckpointError, is_unused, load_hift_tensors,
)
from services.common.checkpoint_schema import BUFFER, hift_schema, model_schema, sinusoid_table
from services.common.text_tokenizer import ALL_SPECIALS, ENDOFTEXT, load_text_tokenizer, special_ids, special_token_layout
from services.common.tiny_checkpoint import (
    AUDIO_BOOST, AUDIO_EOS_BIAS, AUDIO_FRAMES, BIAS_CHANNEL, BIAS_FEATURE, TINY_HIFT, TINY_VOCAB,
    tiny_config_dict, write_tiny_checkpoint,
)
from tests.common.test_checkpoint import module_from_schema

SHARDS = 3


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0, shards=SHARDS)


@pytest.fixture(scope="module")
def ckpt(ckpt_dir) -> Checkpoint:
    return Checkpoint(ckpt_dir)


@pytest.fixture(scope="module")
def llm(ckpt) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in ckpt.tensors([PREFIX["llm"], PREFIX["lm_head"], PREFIX["audio_head"]]).items()}


def test_real_layout_files(ckpt_dir, ckpt):
    names = {p.name for p in ckpt_dir.iterdir()}
    shards = {f"model-{i:05d}-of-{SHARDS:05d}.safetensors" for i in range(1, SHARDS + 1)}
    assert names == shards | {"config.json", "generation_config.json", INDEX_FILE, "hift.pt", "hift_config.json",
                              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    raw = json.loads((ckpt_dir / "config.json").read_text())
    assert raw == json.loads(json.dumps(tiny_config_dict(0)))
    for block in ("visual_config", "video_config"):
        assert raw[block] == {"enable": False}
    assert raw["architectures"] == ["OmniForCausalLM"] and ckpt.config.llm.vocab_size == TINY_VOCAB
    assert ckpt.config.llm.hidden_size % 128 == 0


def test_every_schema_key_present_and_index_consistent(ckpt_dir, ckpt):
    schema = model_schema(ckpt.config)
    index = json.loads((ckpt_dir / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(schema) == set(ckpt.weight_map)
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(ckpt_dir / shard), "pt") as f:
            keys = set(f.keys())
            assert keys == {k for k, s in index["weight_map"].items() if s == shard}, shard
            for k in keys:
                t = f.get_slice(k)
                shape = tuple(t.get_shape())
                assert shape == schema[k].shape, k
                assert t.get_dtype() == ("F32" if schema[k].kind == BUFFER else "BF16"), k
                total += (4 if schema[k].kind == BUFFER else 2) * torch.Size(shape).numel()
    assert index["metadata"]["total_size"] == total


def test_buffers_are_reference_sinusoids(ckpt):
    stored = ckpt.tensors(["audio_tokenizer."])
    for k, spec in model_schema(ckpt.config).items():
        if spec.kind == BUFFER:
            assert torch.equal(stored[k], sinusoid_table(*spec.shape)), k


def test_every_stage_loads_strictly(ckpt):
    schema = model_schema(ckpt.config)
    for name, prefix in PREFIX.items():
        report = ckpt.load_module(module_from_schema(schema, prefix), prefix)
        assert report.loaded and all(is_unused(k) for k in report.skipped_unused), name


def test_hift_file(ckpt):
    assert ckpt.hift_path().name == "hift.pt" and ckpt.hift_config() == TINY_HIFT
    tensors = load_hift_tensors(ckpt.hift_path())
    schema = hift_schema(ckpt.hift_config())
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: s.shape for k, s in schema.items()}
    assert all(v.dtype == torch.float32 for v in tensors.values())
    alphas = torch.cat([v for k, v in tensors.items() if k.endswith(".alpha")])
    assert 0.5 <= alphas.min() and alphas.max() <= 1.5


def test_generation_config_and_tokenizer(ckpt):
    tok = load_text_tokenizer(ckpt.tokenizer_dir)
    ids = special_ids(tok, ckpt.config)  # raises if an audio id disagrees with config.json
    gen = ckpt.generation_config()
    assert gen["bos_token_id"] == gen["eos_token_id"] == ids.endoftext == tok.eos_token_id
    assert gen["max_new_tokens"] > 0 and len(tok) == ckpt.config.llm.vocab_size


def test_random_init_recipe(ckpt):
    t = {k: v.float() for k, v in ckpt.tensors(["audio_tokenizer."]).items()}
    enc = "audio_tokenizer.audio_model."
    assert abs(t[enc + "layers.0.fc1.weight"].std().item() * 64 ** 0.5 - 1) < 0.1   # N(0,1)/sqrt(fan_in)
    assert abs(t[enc + "conv1.weight"].std().item() * (128 * 3) ** 0.5 - 1) < 0.1    # conv: fan_in = in * k
    assert abs(t[enc + "layers.0.fc1.bias"].std().item() - 0.1) < 0.03
    ln = torch.cat([v for k, v in t.items() if k.endswith("layer_norm.weight")])
    assert abs(ln.mean().item() - 1) < 0.05 and abs(ln.std().item() - 0.2) < 0.05
    cb = "audio_tokenizer.audio_bridge_model.vq_list.0.codebook."
    assert abs(t[cb + "embed"].std().item() - 1) < 0.05
    assert 1 <= t[cb + "cluster_size"].min() and t[cb + "cluster_size"].max() <= 11


def test_renamed_key_fails_naming_both(ckpt_dir, tmp_path):
    """Rename one key in a copy of the checkpoint's shard and index: the strict load names
    the key the module misses and the key nobody takes (with its shard)."""
    import shutil
    copy = tmp_path / "renamed"
    shutil.copytree(ckpt_dir, copy)
    good, bad = "audio_head.headnorm.weight", "audio_head.head_norm.weight"
    index = json.loads((copy / INDEX_FILE).read_text())
    shard = index["weight_map"].pop(good)
    tensors = load_file(str(copy / shard))
    tensors[bad] = tensors.pop(good)
    save_file(tensors, str(copy / shard), metadata={"format": "pt"})
    index["weight_map"][bad] = shard
    (copy / INDEX_FILE).write_text(json.dumps(index))
    ck = Checkpoint(copy)
    module = module_from_schema(model_schema(ck.config), PREFIX["audio_head"])
    with pytest.raises(CheckpointError) as e:
        ck.load_module(module, PREFIX["audio_head"])
    assert f"missing: {good}" in str(e.value)
    assert f"unexpected: {bad} (in {shard})" in str(e.value)


def test_only_the_shards_of_a_prefix_are_opened(ckpt, monkeypatch):
    opened: list[str] = []
    real = checkpoint_mod.safe_open

    def counting(path, *a, **kw):
        opened.append(path.rsplit("/", 1)[-1])
        return real(path, *a, **kw)

    monkeypatch.setattr(checkpoint_mod, "safe_open", counting)
    for prefix in (PREFIX["lm_head"], PREFIX["encoder"]):
        opened.clear()
        want = ckpt.shards_for([prefix])
        tensors = ckpt.tensors([prefix])
        assert sorted(opened) == want and len(want) < SHARDS, prefix
        assert set(tensors) == set(ckpt.keys(prefix))


def test_same_seed_same_files_other_seed_other_weights(ckpt_dir, tmp_path):
    again = write_tiny_checkpoint(tmp_path / "again", seed=0, shards=SHARDS)
    for p in ckpt_dir.iterdir():
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name
    other = write_tiny_checkpoint(tmp_path / "other", seed=1, shards=SHARDS)
    a, b = Checkpoint(ckpt_dir), Checkpoint(other)
    key = "audio_tokenizer.audio_model.layers.0.fc1.weight"
    assert not torch.equal(a.tensors([key])[key], b.tensors([key])[key])
    assert not torch.equal(load_hift_tensors(a.hift_path())["conv_pre.weight_v"],
                           load_hift_tensors(b.hift_path())["conv_pre.weight_v"])
    assert (ckpt_dir / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_other_shard_counts(tmp_path):
    out = write_tiny_checkpoint(tmp_path / "one", seed=0, shards=1)
    assert Checkpoint(out).shards_for([""]) == ["model-00001-of-00001.safetensors"]
    with pytest.raises(ValueError, match="shards"):
        write_tiny_checkpoint(tmp_path / "zero", seed=0, shards=0)


# ------------------------------------------------------------------ protocol shaping (static)
# The LLM engine is verified elsewhere; here the logit biases are checked on the weights:
# the bias channel is provably constant through the stack, and the final-layer logits of
# random hidden states behave as designed.

def test_bias_channel_is_constant_through_the_stack(llm, ckpt):
    cfg, c = ckpt.config, BIAS_CHANNEL
    assert torch.all(llm["model.embed_tokens.weight"][:, c] == BIAS_FEATURE)
    audio_sum = sum(llm[f"model.audio_embed_layers.{k}.weight"][0, c] for k in range(cfg.audio.num_codebooks))
    assert abs(audio_sum - BIAS_FEATURE) < 1e-2
    for i in range(cfg.llm.num_hidden_layers):
        q = f"model.layers.{i}."
        for name in ("self_attn.W_pack.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"):
            assert torch.all(llm[q + name][:, c] == 0), name   # no layer reads it
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            assert torch.all(llm[q + name][c] == 0), name      # no layer writes it


def _final_logits(llm, cfg, n: int, sigma: float) -> torch.Tensor:
    """lm_head logits of n final residual states x: x[bias channel] = BIAS_FEATURE (exact, by
    the test above), other channels N(0, sigma^2) (the random layers give sigma ~1.4)."""
    g = torch.Generator().manual_seed(0)
    x = sigma * torch.randn(n, cfg.llm.hidden_size, generator=g)
    x[:, BIAS_CHANNEL] = BIAS_FEATURE
    h = llm["model.norm.weight"] * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.llm.rms_norm_eps)
    return h @ llm["lm_head.weight"].T                                          # (n, V)


@pytest.mark.parametrize("sigma", [1.1, 1.4, 1.8])
def test_text_logit_biases(llm, ckpt, sigma):
    cfg = ckpt.config
    layout = special_token_layout(cfg)
    eos, ag = layout[ENDOFTEXT], cfg.audio_tokens.audiogen_start
    logits = _final_logits(llm, cfg, 2000, sigma)
    never = [layout[t] for t in ALL_SPECIALS if layout[t] not in (eos, ag)]
    # Never emitted as text: far below everything (top-k 20 never reaches them).
    assert logits[:, never].max() < logits.topk(20, dim=1).values[:, -1].min() - 10
    # Unused <audiogen_start> beats <|endoftext|>; once in the sequence (penalty 1.05 or more) it loses.
    assert torch.all(logits[:, ag] > logits[:, eos]) and torch.all(logits[:, ag] / 1.05 < logits[:, eos])
    # Each is the greedy choice often enough that segments and replies end within a few tokens,
    # and not always, so the text segments have more than one token.
    top = logits.argmax(1)
    p_ag = (top == ag).float().mean().item()
    penalised = logits.clone()
    penalised[:, ag] /= 1.05
    p_eos = (penalised.argmax(1) == eos).float().mean().item()
    assert 0.1 < p_ag < 0.9 and 0.1 < p_eos < 0.9, (p_ag, p_eos)


def test_audio_segments_end_after_a_handful_of_frames(llm, ckpt):
    """Codebook-0 decisions with the audio repetition penalty 1.3 over random head states:
    each segment ends by code-0 EOS after exactly AUDIO_FRAMES frames."""
    cfg = ckpt.config
    K0, E = cfg.audio.codebook_sizes[0], cfg.llm.hidden_size
    w, b = llm["audio_head.heads.0.weight"], llm["audio_head.heads.0.bias"]
    assert b[K0] == AUDIO_EOS_BIAS and int((b == AUDIO_BOOST).sum()) == AUDIO_FRAMES
    assert AUDIO_BOOST / 1.3 < AUDIO_EOS_BIAS - 4 and AUDIO_BOOST > AUDIO_EOS_BIAS + 4
    g = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(50):
        hist: list[int] = []
        while True:
            h = llm["audio_head.headnorm.weight"] * torch.randn(E, generator=g)  # headnorm output
            s = w @ h + b
            for c in set(hist):
                s[c] = s[c] * 1.3 if s[c] < 0 else s[c] / 1.3
            code = int(s.argmax())
            if code == K0 or len(hist) > 50:
                break
            hist.append(code)
        lengths.append(len(hist))
    assert set(lengths) == {AUDIO_FRAMES}
