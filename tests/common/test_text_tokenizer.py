"""Tiny byte-level BPE tokenizers in the real layout, and the special-id lookup."""
from __future__ import annotations

import dataclasses
import json

import pytest

from services.common.model_config import ModelConfig
from services.common.text_tokenizer import (
    ALL_SPECIALS, ASR_PROMPT, AUDIO_TOKEN_STRINGS, DEFAULT_SYSTEM_PROMPT, ENDOFTEXT, MULTIMODAL_SPECIALS,
    TokenizerError, build_tiny_tokenizer, load_text_tokenizer, special_ids, special_token_layout,
)
from services.common.tiny_checkpoint import TINY_VOCAB, tiny_config_dict

MIXED = ("Hello, world! 你好，今天天气很好。The quick brown fox jumps over 13 lazy dogs... "
         "¿Qué tal? naïve café 😀\n\n  tabs\tand  spaces " + DEFAULT_SYSTEM_PROMPT + ASR_PROMPT)


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return ModelConfig.from_dict(tiny_config_dict(0))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tiny_cfg):
    assert tiny_cfg.llm.vocab_size == TINY_VOCAB
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), tiny_cfg, tiny_cfg.llm.vocab_size)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_text_tokenizer(tok_dir)


def test_loads_with_autotokenizer_at_full_size(tok, tok_dir, tiny_cfg):
    vocab = tiny_cfg.llm.vocab_size
    assert type(tok).__name__.startswith("Qwen2Tokenizer")
    assert len(tok) == vocab and len(tok.get_vocab()) == vocab
    assert sorted(tok.get_vocab().values()) == list(range(vocab))
    assert {p.name for p in tok_dir.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def test_every_special_id_matches_config(tok, tiny_cfg):
    ids = special_ids(tok, tiny_cfg)
    assert ids.audio == tiny_cfg.audio_tokens
    layout = special_token_layout(tiny_cfg)
    # the real tokenizer's special-token lists: 37 specials, 23 of them multimodal
    assert set(layout) == set(ALL_SPECIALS) and len(ALL_SPECIALS) == 37 and len(MULTIMODAL_SPECIALS) == 23
    for token, i in layout.items():
        assert tok.convert_tokens_to_ids(token) == i, token
    for name, token in AUDIO_TOKEN_STRINGS.items():
        assert layout[token] == getattr(tiny_cfg.audio_tokens, name)
    assert (ids.endoftext, ids.system, ids.user, ids.assistant) == (
        layout[ENDOFTEXT], layout["<B_SYS>"], layout["<C_Q>"], layout["<C_A>"])
    # Specials sit inside the BPE ids (above the 256 byte symbols), not at the end (as in the real tokenizer).
    assert max(layout.values()) < tiny_cfg.llm.vocab_size - 1 and min(layout.values()) > 256


def test_tokenizer_config_as_qwen2(tok_dir, tok):
    c = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert c["tokenizer_class"] == "Qwen2Tokenizer"
    assert c["eos_token"] == c["pad_token"] == ENDOFTEXT and c["bos_token"] is None
    assert c["clean_up_tokenization_spaces"] is False and c.get("add_bos_token") is False
    assert all(v["special"] and not v["normalized"] for v in c["added_tokens_decoder"].values())
    assert tok.eos_token_id == tok.pad_token_id == tok.convert_tokens_to_ids(ENDOFTEXT)
    assert tok.bos_token_id is None
    m = json.loads((tok_dir / "special_tokens_map.json").read_text())
    assert m["eos_token"]["content"] == m["pad_token"]["content"] == ENDOFTEXT
    assert set(m["additional_special_tokens"]) == set(ALL_SPECIALS) - {ENDOFTEXT}


def test_round_trip_mixed_english_chinese(tok):
    ids = tok.encode(MIXED, add_special_tokens=False)
    assert tok.decode(ids) == MIXED
    assert len(ids) < len(MIXED.encode("utf-8")) * 0.8  # the BPE merges are used


def test_special_strings_in_text_become_single_ids(tok, tiny_cfg):
    at = tiny_cfg.audio_tokens
    text = f"<B_SYS>{DEFAULT_SYSTEM_PROMPT}<C_Q><audio_start_baichuan>" \
           f"{{\"path\": \"a.wav\"}}<audio_end_baichuan><audiotext_start_baichuan><C_A>ok<audiogen_start_baichuan>"
    ids = tok.encode(text, add_special_tokens=False)
    layout = special_token_layout(tiny_cfg)
    assert ids[0] == layout["<B_SYS>"] and ids[-1] == at.audiogen_start and ids[-2] != at.audiogen_start
    for token in ("<C_Q>", "<audio_start_baichuan>", "<audio_end_baichuan>", "<audiotext_start_baichuan>", "<C_A>"):
        assert ids.count(layout[token]) == 1, token
    assert tok.decode(ids) == text
    # A special string glued to words is still one id.
    assert tok.encode("x<C_A>y", add_special_tokens=False)[1] == layout["<C_A>"]
    assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True) == \
        f"{DEFAULT_SYSTEM_PROMPT}{{\"path\": \"a.wav\"}}ok"


def test_parity_byte_symbols_and_specials_like_fixture_tokenizer(fixtures, tmp_path):
    """Built for the fixture config, the special ids and the 256 byte ids equal those of the
    fixture tokenizer (written by the reference tooling)."""
    fixtures.require("06_protocol")
    ref = load_text_tokenizer(fixtures.root / "06_protocol" / "tokenizer")
    cfg = fixtures.model_config
    ours = load_text_tokenizer(build_tiny_tokenizer(tmp_path, cfg, cfg.llm.vocab_size))
    assert len(ours) == len(ref) == cfg.llm.vocab_size
    rv, ov = ref.get_vocab(), ours.get_vocab()
    byte_pieces = [p for p, i in rv.items() if i < 256]
    assert len(byte_pieces) == 256 and all(ov[p] == rv[p] for p in byte_pieces)
    for token, i in ref.get_added_vocab().items():
        assert ov[token] == i, token
    assert special_ids(ours, cfg) == special_ids(ref, cfg)


def test_special_ids_names_a_config_mismatch(tok, tiny_cfg):
    wrong = dataclasses.replace(tiny_cfg, audio_tokens=dataclasses.replace(
        tiny_cfg.audio_tokens, audio_pad=tiny_cfg.audio_tokens.audio_pad + 1))
    with pytest.raises(TokenizerError) as e:
        special_ids(tok, wrong)
    have, want = tiny_cfg.audio_tokens.audio_pad, tiny_cfg.audio_tokens.audio_pad + 1
    assert f"<audio_pad_baichuan>: tokenizer has id {have}, config.json audio_config.audio_pad_token_id is {want}" \
        in str(e.value)


def test_build_rejects_ids_outside_vocab(tmp_path, tiny_cfg):
    small = max(special_token_layout(tiny_cfg).values())          # the largest special id is then outside
    with pytest.raises(TokenizerError, match=rf"vocab_size={small}"):
        build_tiny_tokenizer(tmp_path, tiny_cfg, small)


def test_build_is_deterministic(tmp_path, tiny_cfg, tok_dir):
    again = build_tiny_tokenizer(tmp_path, tiny_cfg, tiny_cfg.llm.vocab_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (tok_dir / name).read_bytes(), name
