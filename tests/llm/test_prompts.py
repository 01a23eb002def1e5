"""Prompt ids against fixture 06's inputs (§11.1, §11.6, §12 items 1-2)."""
from __future__ import annotations

import pytest
import torch

from services.llm.prompts import (DEFAULT_SYSTEM_PROMPT, Audio, GeneratedAudio, Message, PromptBuilder, PromptError,
                                  ProtocolTokens, split_tts_text)

FIX = "06_protocol"


@pytest.fixture(scope="module")
def env(fixtures):
    from transformers import AutoTokenizer
    fixtures.require(FIX)
    tok = AutoTokenizer.from_pretrained(str(fixtures.root / FIX / "tokenizer"))
    tokens = ProtocolTokens.from_tokenizer(tok, fixtures.model_config, fixtures.json(FIX, "generation_config.json"))
    builder = PromptBuilder(tok, tokens, fixtures.model_config.audio.num_codebooks)
    return builder, fixtures.json(FIX, "inputs.json"), fixtures.load(FIX, "inputs.safetensors")["speech.audio_codes"]


def _turn(codes):
    return [Message("system", DEFAULT_SYSTEM_PROMPT), Message("user", [Audio(codes)])]


def test_ids_from_tokenizer_and_config(env, fixtures):
    b, inp, _ = env
    t = b.tokens
    special = inp["special_token_ids"]
    assert (t.system, t.user, t.assistant, t.eos) == (special["<B_SYS>"], special["<C_Q>"], special["<C_A>"],
                                                      special["<|endoftext|>"])
    assert t.audio == fixtures.model_config.audio_tokens
    assert inp["system_prompt"] == DEFAULT_SYSTEM_PROMPT


@pytest.mark.parametrize("run,spoken", [("spoken", True), ("text", False)])
def test_chat_prompt_matches_fixture(env, run, spoken):
    b, inp, codes = env
    p = b.chat(_turn(codes), spoken=spoken)
    assert p.ids == inp["prompt_ids"][run]
    assert torch.equal(p.audio_codes, codes) and p.n_pads == codes.shape[0]


def test_asr_prompt_matches_fixture(env):
    b, inp, codes = env
    p = b.asr(codes)
    assert p.ids == inp["prompt_ids"]["asr"]
    assert torch.equal(p.audio_codes, codes)


def test_tts_chunks_match_fixture(env):
    b, inp, _ = env
    start = b.tokenizer.convert_ids_to_tokens(b.tokens.audio.audiogen_start)   # each chunk prompt's tail
    assert split_tts_text(inp["tts_text"]) == [c.replace(start, "") for c in inp["tts_chunk_prompts"]]
    assert b.tts_chunks(inp["tts_text"]) == inp["tts_chunk_ids"]


def test_split_tts_text_rules():
    # split after each mark (kept with its piece); merge until longer than 10 characters
    assert split_tts_text("ab,cd;ef:gh!ij?kl") == ["ab,cd;ef:gh!", "ij?kl"]
    assert split_tts_text("一二三四五，六七八九十。") == ["一二三四五，六七八九十。"]
    assert split_tts_text("一二三四五六七八九十一，好。") == ["一二三四五六七八九十一，", "好。"]
    assert split_tts_text("a、b") == ["a、b"]            # Baichuan-Audio does not split after 、
    assert split_tts_text("") == []


def test_multi_turn_history(env, fixtures):
    """Past assistant turns: [<audiotext_start>]<C_A> + text + <audiogen_start> pads <audiogen_end>;
    no separators or end-of-turn tokens."""
    b, _, codes = env
    t, a = b.tokens, b.tokens.audio
    assert len(codes) >= 5                                       # the user audio is sliced [:3], [3:5]
    # two generated frames (any valid codes): codebook k gets k + 1 and C - k
    sizes = torch.tensor(fixtures.model_config.audio.codebook_sizes)
    k = torch.arange(len(sizes))
    reply = torch.stack([(k + 1) % sizes, (len(sizes) - k) % sizes])
    msgs = _turn(codes[:3]) + [Message("assistant", ["你好", GeneratedAudio(reply)]),
                               Message("user", [Audio(codes[3:5])])]
    p = b.chat(msgs, spoken=True)
    first = b.chat(_turn(codes[:3]), spoken=True).ids            # ends with <audiotext_start><C_A>
    want = (first + b.encode("你好") + [a.audiogen_start, a.audio_pad, a.audio_pad, a.audiogen_end]
            + [t.user, a.audio_start, a.audio_pad, a.audio_pad, a.audio_end, a.audiotext_start, t.assistant])
    assert p.ids == want
    assert torch.equal(p.audio_codes, torch.cat([codes[:3], reply, codes[3:5]]))
    text_only = b.chat(msgs, spoken=False)
    assert a.audiotext_start not in text_only.ids
    assert len(text_only.ids) == len(want) - 2


def test_errors(env):
    b, _, codes = env
    with pytest.raises(PromptError, match="unknown role"):
        b.chat([Message("bot", "hi")])
    with pytest.raises(PromptError, match="system message may only be the first"):
        b.chat([Message("user", "hi"), Message("system", "x")])
    with pytest.raises(PromptError, match=rf"shape \[frames, {b.num_codebooks}\]"):
        b.asr(codes[:, :-1])


def test_eos_must_agree_with_generation_config(env, fixtures):
    b, _, _ = env
    other = (b.tokens.eos + 1) % fixtures.model_config.llm.vocab_size       # any id but <|endoftext|>
    with pytest.raises(PromptError, match="eos_token_id"):
        ProtocolTokens.from_tokenizer(b.tokenizer, fixtures.model_config, {"eos_token_id": other})
