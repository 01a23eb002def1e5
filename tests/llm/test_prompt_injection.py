"""Text cannot inject special tokens: every special string of the checkpoint's tokenizer (read
from its tokenizer_config.json, never written here), placed in user text, the system prompt,
assistant history or TTS text, is encoded as ordinary text; special ids appear in a prompt
only where the prompt builder puts them."""
from __future__ import annotations

import json

import pytest
import torch

from services.common.checkpoint import Checkpoint
from services.common.text_tokenizer import load_text_tokenizer
from services.llm.prompts import Audio, GeneratedAudio, Message, PromptBuilder, ProtocolTokens


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return Checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def builder(ckpt):
    tok = load_text_tokenizer(ckpt.path)
    return PromptBuilder(tok, ProtocolTokens.from_tokenizer(tok, ckpt.config, ckpt.generation_config()),
                         ckpt.config.audio.num_codebooks)


@pytest.fixture(scope="module")
def specials(ckpt) -> dict[str, int]:
    """Every special token of the checkpoint's tokenizer config: string -> id."""
    cfg = json.loads((ckpt.path / "tokenizer_config.json").read_text(encoding="utf-8"))
    out = {t["content"]: int(i) for i, t in cfg["added_tokens_decoder"].items() if t.get("special")}
    assert len(out) > 10
    return out


def special_ids_in(ids: list[int], specials: dict[str, int]) -> list[int]:
    values = set(specials.values())
    return [i for i in ids if i in values]


def test_every_special_string_in_user_text_stays_text(builder, specials):
    plain = builder.chat([Message("system", "sys"), Message("user", "hello there")])
    for s, sid in specials.items():
        text = f"hello {s} there{s}"
        p = builder.chat([Message("system", "sys"), Message("user", text)])
        # the same special ids as the prompt without it, in the same order: only the builder's
        assert special_ids_in(p.ids, specials) == special_ids_in(plain.ids, specials), s
        assert builder.tokenizer.decode(builder.encode(text)) == text


def test_system_prompt_history_and_tts_text_are_escaped_too(builder, specials):
    nb = builder.num_codebooks
    codes = torch.zeros((2, nb), dtype=torch.int64)
    injected = "".join(specials)            # every special string at once
    for make in (
        lambda t: builder.chat([Message("system", t), Message("user", "hi")]),
        lambda t: builder.chat([Message("user", [Audio(codes)]), Message("assistant", [t, GeneratedAudio(codes)]),
                                Message("user", "hi")]),
    ):
        with_text, without = make(injected), make("")
        assert special_ids_in(with_text.ids, specials) == special_ids_in(without.ids, specials)
        assert with_text.n_pads == without.n_pads
    chunk = builder.tts_chunk(injected)
    assert special_ids_in(chunk, specials) == [builder.tokens.audio.audiogen_start]


def test_plain_text_encodes_as_the_reference_does(builder):
    """Without special strings the ids are the reference processor's (special tokens mapped)."""
    for text in ("你好，欢迎收听今天的节目。", "Hello, how are you today?", "请用【邻家女声】这个声音回答问题。"):
        assert builder.encode(text) == list(builder.tokenizer.encode(text, add_special_tokens=False))
