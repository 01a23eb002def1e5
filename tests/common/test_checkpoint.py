"""The checkpoint schema against the reference's own state dicts (the golden fixtures), and
strict loading of schema-shaped modules."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

from services.common.checkpoint import PREFIX, CheckpointError, is_unused, load_state
from services.common.checkpoint_schema import (
    BUFFER, PARAM, Schema, hift_schema, model_schema, sinusoid_buffers, sinusoid_table,
)
from services.common.model_config import ConfigError, ModelConfig

MODEL_FIXTURES = ("02_tokenizer", "03_llm_audiohead", "04_decoder_flow")


def _header(fixtures, fixture: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of a fixture's weights.safetensors (reads the header only)."""
    fixtures.require(fixture)
    with safe_open(str(fixtures.root / fixture / "weights.safetensors"), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def module_from_schema(schema: Schema, prefix: str, *, drop_unused: bool = True) -> torch.nn.Module:
    """A bare module tree whose state_dict keys are the schema's keys under `prefix` (stripped):
    parameters for PARAM entries, persistent buffers for BUFFER entries. Like a model module,
    it declares no unused key."""
    root = torch.nn.Module()
    for key, spec in schema.items():
        if not key.startswith(prefix) or (drop_unused and is_unused(key)):
            continue
        *path, leaf = key[len(prefix):].split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        t = torch.zeros(spec.shape)
        if spec.kind == BUFFER:
            mod.register_buffer(leaf, t)
        else:
            mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    return root


def test_parity_model_schema_equals_fixture_weights(fixtures):
    got: dict[str, tuple[tuple[int, ...], str]] = {}
    for fx in MODEL_FIXTURES:
        got.update(_header(fixtures, fx))
    schema = model_schema(fixtures.model_config)
    missing = sorted(set(got) - set(schema))
    extra = sorted(set(schema) - set(got))
    assert not missing and not extra, f"not in schema: {missing[:10]}; not in fixtures: {extra[:10]}"
    wrong = {k: (got[k][0], schema[k].shape) for k in got if got[k][0] != schema[k].shape}
    assert not wrong, f"shape (fixture, schema): {wrong}"
    # The fixtures store parameters as BF16 and the sinusoid buffers as F32, like the real checkpoint.
    kinds = {k: (BUFFER if dt == "F32" else PARAM) for k, (_, dt) in got.items()}
    assert {k: s.kind for k, s in schema.items()} == kinds


def test_parity_hift_schema_equals_fixture_weights(fixtures):
    got = _header(fixtures, "05_vocoder")
    schema = hift_schema(fixtures.hift_config)
    assert set(got) == set(schema), sorted(set(got) ^ set(schema))[:10]
    assert {k: v[0] for k, v in got.items()} == {k: s.shape for k, s in schema.items()}
    assert all(s.kind == PARAM for s in schema.values())


def test_parity_sinusoid_tables(fixtures):
    """The stored fp32 tables are the reference's `sinusoids`; ours match them (bit for bit on
    the CPUs tried, but exp and sin may round an ulp differently on others, and an ulp of a
    frequency moves the angle t·inv by ~ulp(t): the tolerance scales with the largest position)."""
    for fx in ("02_tokenizer", "04_decoder_flow"):
        fixtures.require(fx)
    stored = {**fixtures.load("02_tokenizer", "weights.safetensors"),
              **fixtures.load("04_decoder_flow", "weights.safetensors")}
    ours = sinusoid_buffers(fixtures.model_config)
    assert set(ours) == {k for k in stored if k.endswith("positional_embedding")}
    for k, t in ours.items():
        assert t.dtype == torch.float32, k
        fixtures.assert_close(t, stored[k], f"sinusoids/{k}", "fp32", scale=t.shape[0] - 1)


def test_sinusoid_table_formula():
    t = sinusoid_table(7, 8)  # inc = ln(1e4) / 3: sines first, then cosines
    inv = torch.exp(-torch.log(torch.tensor(1e4)) / 3 * torch.arange(4.0))
    assert torch.allclose(t[5, :4], torch.sin(5 * inv)) and torch.allclose(t[5, 4:], torch.cos(5 * inv))
    assert torch.equal(t[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_schema_lists_every_documented_unused_key(fixtures):
    unused = [k for k in model_schema(fixtures.model_config) if is_unused(k)]
    for part in ("audio_decoder.dconv2.", "audio_decoder.post_net.", "linear1.bias", "linear2.bias",
                 "codebook.embed_avg", "codebook.cluster_size", "prenet.positional_embedding"):
        assert any(part in k for k in unused), part


def test_schema_rejects_audio_head_hidden_not_multiple_of_128(fixtures):
    # the config's hidden size is a multiple of 128; half of 128 more is not
    raw = dict(fixtures.model_config.raw, hidden_size=fixtures.model_config.llm.hidden_size + 64)
    with pytest.raises(ConfigError, match="multiple of 128"):
        model_schema(ModelConfig.from_dict(raw))


def test_schema_follows_config_dimensions(fixtures):
    cfg = fixtures.model_config
    vocab, layers = cfg.llm.vocab_size + 128, cfg.llm.num_hidden_layers + 1      # both changed
    raw = dict(cfg.raw, vocab_size=vocab, num_hidden_layers=layers)
    s = model_schema(ModelConfig.from_dict(raw))
    assert s["lm_head.weight"].shape == (vocab, cfg.llm.hidden_size)
    assert f"model.layers.{layers - 1}.mlp.up_proj.weight" in s and f"model.layers.{layers}.mlp.up_proj.weight" not in s
    n, k = cfg.audio.num_codebooks, 8                                              # every codebook resized to k
    audio = dataclasses.replace(cfg.audio, codebook_sizes=(k,) * n)
    s = model_schema(dataclasses.replace(cfg, audio=audio))
    assert s["audio_head.heads.0.weight"].shape == (k + 1, cfg.llm.hidden_size)   # + the end-of-audio class
    assert s[f"audio_tokenizer.audio_bridge_model.vq_list.{n - 1}.codebook.embed"].shape == (k, cfg.audio.bridge_dim)


def test_parity_schema_module_loads_fixture_weights_strictly(fixtures):
    """A module declaring exactly the used keys of the schema loads the reference state dict;
    the unused keys are skipped, not errors."""
    fixtures.require("03_llm_audiohead")
    tensors = fixtures.load("03_llm_audiohead", "weights.safetensors")
    module = module_from_schema(model_schema(fixtures.model_config), PREFIX["audio_head"])
    report = load_state(module, tensors, PREFIX["audio_head"], source="03_llm_audiohead")
    n_layers = fixtures.model_config.audio.audio_head_transformer_layers
    assert len(report.skipped_unused) == 2 * n_layers  # linear1.bias and linear2.bias of each layer
    assert all(k.endswith(("linear1.bias", "linear2.bias")) for k in report.skipped_unused)
    key = "audio_head.heads.0.bias"
    assert torch.equal(module.state_dict()["heads.0.bias"], tensors[key].float())


def test_renamed_key_names_missing_and_unexpected(fixtures):
    fixtures.require("03_llm_audiohead")
    tensors = dict(fixtures.load("03_llm_audiohead", "weights.safetensors"))
    good, bad = "audio_head.headnorm.weight", "audio_head.head_norm.weight"
    tensors[bad] = tensors.pop(good)
    module = module_from_schema(model_schema(fixtures.model_config), PREFIX["audio_head"])
    with pytest.raises(CheckpointError) as e:
        load_state(module, tensors, PREFIX["audio_head"], source="renamed")
    msg = str(e.value)
    assert f"missing: {good}" in msg and f"unexpected: {bad}" in msg


def test_module_declaring_an_unused_key_is_caught(fixtures):
    """Unused keys are skipped by the loader, so a module that declares one cannot be filled."""
    fixtures.require("03_llm_audiohead")
    tensors = fixtures.load("03_llm_audiohead", "weights.safetensors")
    module = module_from_schema(model_schema(fixtures.model_config), PREFIX["audio_head"], drop_unused=False)
    with pytest.raises(CheckpointError, match="missing: audio_head.transformer_layers.0.linear1.bias"):
        load_state(module, tensors, PREFIX["audio_head"], source="03_llm_audiohead")
