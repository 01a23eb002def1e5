"""`make-tiny-checkpoint`: the real layout, strict loading, determinism, and the weight
shaping that makes a generated reply short."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import services.common.checkpoint as checkpoint_mod
from services.common.checkpoint import (
    INDEX_FILE, PREFIX, Checkpoint, CheckpointError, is_unused, load_hift_tensors,
)
from services.common.checkpoint_schema import BUFFER, hift_schema, model_schema, sinusoid_table
from services.common.text_tokenizer import (
    ALL_SPECIALS, ENDOFTEXT, load_text_tokenizer, special_ids, special_token_layout,
)
from services.common.tiny_checkpoint import (
    ASSISTANT_CHANNEL, AUDIO_BOOST, AUDIO_EOS_BIAS, AUDIO_FRAMES, BIAS_CHANNEL, BIAS_FEATURE, TINY_HIFT,
    TINY_VOCAB,
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
    stored = ckpt.tensors(["audio_tokenizer."], skip_unused=False)
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
    t = {k: v.float() for k, v in ckpt.tensors(["audio_tokenizer."], skip_unused=False).items()}
    a = ckpt.config.audio
    enc = "audio_tokenizer.audio_model."
    assert abs(t[enc + "layers.0.fc1.weight"].std().item() * a.d_model ** 0.5 - 1) < 0.1   # N(0,1)/sqrt(fan_in)
    fan_in = a.num_mel_bins * a.kernel_size                                              # conv: in * k
    assert abs(t[enc + "conv1.weight"].std().item() * fan_in ** 0.5 - 1) < 0.1
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
# The logit biases checked on the weights (the feature channels are provably constant through
# the stack, and the final-layer logits of random hidden states behave as designed), then a
# short run of the real engine.

def test_feature_channels_are_constant_through_the_stack(llm, ckpt):
    cfg, c, a = ckpt.config, BIAS_CHANNEL, ASSISTANT_CHANNEL
    emb = llm["model.embed_tokens.weight"]
    assistant = special_token_layout(cfg)["<C_A>"]
    assert torch.all(emb[:, c] == BIAS_FEATURE)
    assert emb[assistant, a] == BIAS_FEATURE and torch.count_nonzero(emb[:, a]) == 1
    n = cfg.audio.num_codebooks  # an audio row is the sum of n table rows
    for k in range(n):
        table = llm[f"model.audio_embed_layers.{k}.weight"]
        assert torch.all(table[:, c] == BIAS_FEATURE / n) and torch.all(table[:, a] == 0)
    for i in range(cfg.llm.num_hidden_layers):
        q = f"model.layers.{i}."
        for name in ("self_attn.W_pack.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"):
            assert torch.all(llm[q + name][:, [c, a]] == 0), name   # no layer reads them
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            assert torch.all(llm[q + name][[c, a]] == 0), name      # no layer writes them


def _final_logits(llm, cfg, n: int, first: bool = False) -> torch.Tensor:
    """lm_head logits of n final residual states x: the feature channels as the embeddings set
    them (exact, by the test above; `first`: the position of <C_A>), the other channels
    N(0, sigma^2) with sigma ~ U(1.1, 1.8) per state (the spread measured at the last layer of
    the tiny model)."""
    g = torch.Generator().manual_seed(0)
    sigma = 1.1 + 0.7 * torch.rand(n, 1, generator=g)
    x = sigma * torch.randn(n, cfg.llm.hidden_size, generator=g)
    x[:, BIAS_CHANNEL] = BIAS_FEATURE
    x[:, ASSISTANT_CHANNEL] = BIAS_FEATURE if first else 0.0
    h = llm["model.norm.weight"] * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.llm.rms_norm_eps)
    return h @ llm["lm_head.weight"].T                                          # (n, V)


def test_text_logit_biases(llm, ckpt):
    cfg = ckpt.config
    layout = special_token_layout(cfg)
    eos, ag = layout[ENDOFTEXT], cfg.audio_tokens.audiogen_start
    logits = _final_logits(llm, cfg, 4000)
    never = [layout[t] for t in ALL_SPECIALS if layout[t] not in (eos, ag)]
    # Never emitted as text: far below everything (top-k 20 never reaches them).
    assert logits[:, never].max() < logits.topk(20, dim=1).values[:, -1].min() - 10
    # Unused <audiogen_start> beats <|endoftext|>; once in the sequence (penalty 1.05 or more) it loses.
    assert torch.all(logits[:, ag] > logits[:, eos]) and torch.all(logits[:, ag] / 1.05 < logits[:, eos])
    # Each is the greedy choice often enough that segments and replies end within a few tokens,
    # and not always, so text segments can have more than one token.
    p_ag = (logits.argmax(1) == ag).float().mean().item()
    penalised = logits.clone()
    penalised[:, ag] /= 1.05
    p_eos = (penalised.argmax(1) == eos).float().mean().item()
    assert 0.15 < p_ag < 0.8 and 0.15 < p_eos < 0.8, (p_ag, p_eos)
    # The first token of a reply (after <C_A>) is never <|endoftext|>.
    first = _final_logits(llm, cfg, 4000, first=True)
    assert torch.all(first[:, eos] < first.topk(20, dim=1).values[:, -1] - 5)


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from threads, and lose a lot on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_generated_replies_end_quickly(ckpt, one_thread):
    """The real engine on this checkpoint, sampling as the demos do: every spoken reply ends
    by <|endoftext|> after one to a few audio segments of AUDIO_FRAMES frames."""
    from services.llm.engine import Engine, EngineConfig, Request
    from services.llm.model import AudioLLM
    from services.llm.prompts import DEFAULT_SYSTEM_PROMPT, Audio, Message, PromptBuilder, ProtocolTokens
    from services.llm.protocol import SegmentEnd

    max_steps = 1000                       # all three replies together take fewer engine steps
    tok = load_text_tokenizer(ckpt.tokenizer_dir)
    model = AudioLLM.from_checkpoint(ckpt, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prompts = []
    for i in range(3):
        codes = torch.stack([torch.randint(0, K, (10 + 3 * i,), generator=g) for K in ckpt.config.audio.codebook_sizes], 1)
        prompts.append([Message("system", DEFAULT_SYSTEM_PROMPT), Message("user", [Audio(codes)])])
    # A step adds at most one token to a reply: prompt + max_steps never hits the context limit
    # before the step check below fails.
    tokens = ProtocolTokens.from_tokenizer(tok, ckpt.config, ckpt.generation_config())
    built = [PromptBuilder(tok, tokens, ckpt.config.audio.num_codebooks).chat(m) for m in prompts]
    max_len = max(len(p.ids) for p in built) + max_steps
    engine = Engine(model, tok, generation_config=ckpt.generation_config(),
                    config=EngineConfig(num_slots=4, max_len=max_len))
    handles = [engine.submit(Request(p.ids, "spoken", p.audio_codes, seed=i, greedy=i == 2))
               for i, p in enumerate(built)]
    engine.run_until_idle(max_steps=2 * max_steps)
    for h in handles:
        events = h.drain()
        assert events[-1].reason == "eos", events[-1]
        audio = [e for e in events if isinstance(e, SegmentEnd) and e.kind == "audio"]
        assert 1 <= len(audio) <= 10 and all(len(e.codes) == AUDIO_FRAMES for e in audio)
    assert engine.stats["steps"] < max_steps


def test_audio_segments_end_after_a_handful_of_frames(llm, ckpt):
    """Codebook-0 decisions with the audio repetition penalty 1.3 over random head states:
    every segment ends by code-0 EOS after exactly AUDIO_FRAMES frames."""
    cfg = ckpt.config
    K0, E = cfg.audio.codebook_sizes[0], cfg.llm.hidden_size
    w, b = llm["audio_head.heads.0.weight"], llm["audio_head.heads.0.bias"]
    assert b[K0] == AUDIO_EOS_BIAS and int((b == AUDIO_BOOST).sum()) == AUDIO_FRAMES
    assert AUDIO_BOOST / 1.3 < AUDIO_EOS_BIAS - 4 and AUDIO_BOOST > AUDIO_EOS_BIAS + 4
    g = torch.Generator().manual_seed(0)
    n = 200                                                    # segments, decoded side by side
    used = torch.zeros(n, K0 + 1, dtype=torch.bool)            # this segment's codebook-0 history
    length = torch.full((n,), -1)
    for frame in range(3 * AUDIO_FRAMES):
        h = llm["audio_head.headnorm.weight"] * torch.randn(n, E, generator=g)  # headnorm outputs
        s = h @ w.T + b                                                           # (n, K0 + 1)
        s = torch.where(used, torch.where(s < 0, s * 1.3, s / 1.3), s)
        code = s.argmax(1)
        length = torch.where((code == K0) & (length < 0), frame, length)
        used[torch.arange(n), code] = True
    assert set(length.tolist()) == {AUDIO_FRAMES}
