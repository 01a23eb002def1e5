"""The text tokenizer: load a checkpoint's Qwen2 byte-level BPE, look up the special ids,
and build tiny tokenizers in exactly the real file layout.

Ids never come from constants: the audio ids come from `config.json` (`audio_config.*_token_id`)
and must agree with the tokenizer; the role ids (`<B_SYS>`, `<C_Q>`, `<C_A>`) and
`<|endoftext|>` are looked up in the tokenizer (reference-model.md §2.3, §12 item 1).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from services.common.model_config import AudioTokenIds, ModelConfig

ENDOFTEXT = "<|endoftext|>"
ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT = "<B_SYS>", "<C_Q>", "<C_A>"

# Qwen's chat tokens, then Baichuan's 11 role/tool tokens (§2.3).
QWEN_SPECIALS = (ENDOFTEXT, "<|im_start|>", "<|im_end|>")
BAICHUAN_SPECIALS = ("<B_SYS>", "<B_USYS>", "<C_Q>", "<C_A>", "<B_FUNC>", "<B_CODE>", "<B_APE>",
                     "<function_calling>", "<calc_start>", "<calc_end>", "<inner_think>")
# The 23 multimodal tokens in id order: Omni-1.5's list without its 3 video tokens, which is
# what fits Baichuan-Audio's audio ids 151657..151679 (audio_delim at +17, audiotext_start at
# +18). The names of the 14 image/box/ref tokens are inferred from Omni-1.5 (§2.3 [I]).
MULTIMODAL_SPECIALS = (
    "<audio_start_baichuan>", "<audio_end_baichuan>", "<audio_pad_baichuan>",
    "<img_start_baichuan>", "<img_end_baichuan>", "<img_pad_baichuan>", "<img_newline_baichuan>",
    "<box_start_baichuan>", "<box_end_baichuan>", "<box_delim_baichuan>",
    "<ref_start_baichuan>", "<ref_end_baichuan>", "<img_delim_baichuan>",
    "<polygon_start_baichuan>", "<polygon_end_baichuan>", "<baichuan_pad_token>", "<reserved_113>",
    "<audio_delim_baichuan>", "<audiotext_start_baichuan>", "<audiotext_end_baichuan>",
    "<audiotext_pad_baichuan>", "<audiogen_start_baichuan>", "<audiogen_end_baichuan>",
)
ALL_SPECIALS = QWEN_SPECIALS + BAICHUAN_SPECIALS + MULTIMODAL_SPECIALS

# AudioTokenIds field -> token string; the config's `{field}_token_id` is that token's id.
AUDIO_TOKEN_STRINGS = {f.name: f"<{f.name}_baichuan>" for f in fields(AudioTokenIds)}

# Default prompts of the demos (§11.1, §11.6); also part of the tiny tokenizer's corpus.
DEFAULT_SYSTEM_PROMPT = "请用【邻家女声】这个声音回答问题。"
ASR_PROMPT = "将语音转录为文本:"


class TokenizerError(ValueError):
    """A tokenizer that does not agree with the model config."""


@dataclass(frozen=True)
class SpecialIds:
    """Every id the prompt builder and the generation protocol need."""

    endoftext: int     # generation EOS, left-pad id (§2.2, Correction 13)
    system: int        # <B_SYS>
    user: int          # <C_Q>
    assistant: int     # <C_A>
    audio: AudioTokenIds


def load_text_tokenizer(path: str | Path):
    """The checkpoint's fast tokenizer (transformers), from its `tokenizer.json`. Local files
    only; custom tokenizer code is never executed."""
    from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise TokenizerError(f"{p}: no tokenizer.json (the checkpoint's byte-level BPE) found")
    tc = p / "tokenizer_config.json"
    if not (tc.is_file() and json.loads(tc.read_text(encoding="utf-8")).get("tokenizer_class")):
        return PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json"))
    # A blank model config: the class comes from tokenizer_config.json, and transformers need
    # not read config.json (model_type "omni", unknown to it, would only draw a warning).
    return AutoTokenizer.from_pretrained(str(p), config=PretrainedConfig(), local_files_only=True,
                                         trust_remote_code=False)


def _single_id(tokenizer, token: str) -> int | None:
    """The id of `token` if the tokenizer knows it as one token, else None."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        return None
    return int(tid)


def special_ids(tokenizer, cfg: ModelConfig) -> SpecialIds:
    """Look up the role and EOS ids and check the audio special tokens against the config.

    Raises TokenizerError naming every mismatch (token, tokenizer id, config id)."""
    problems: list[str] = []
    ids: dict[str, int] = {}
    for name, token in (("endoftext", ENDOFTEXT), ("system", ROLE_SYSTEM),
                        ("user", ROLE_USER), ("assistant", ROLE_ASSISTANT)):
        tid = _single_id(tokenizer, token)
        if tid is None:
            problems.append(f"{token} is not a token of the tokenizer")
        else:
            ids[name] = tid
    for name, token in AUDIO_TOKEN_STRINGS.items():
        want = getattr(cfg.audio_tokens, name)
        tid = _single_id(tokenizer, token)
        if tid != want:
            have = "missing" if tid is None else f"id {tid}"
            problems.append(f"{token}: tokenizer has {have}, config.json audio_config.{name}_token_id is {want}")
    if "endoftext" in ids and tokenizer.eos_token_id != ids["endoftext"]:
        problems.append(f"tokenizer eos_token is {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}); "
                        f"the generation loop needs {ENDOFTEXT} (id {ids['endoftext']})")
    if problems:
        raise TokenizerError("tokenizer does not match config.json: " + "; ".join(problems))
    return SpecialIds(audio=cfg.audio_tokens, **ids)


# ---------------------------------------------------------------------- tiny tokenizers
def special_token_layout(cfg: ModelConfig) -> dict[str, int]:
    """Id of every special string of §2.3 for a tokenizer built for `cfg`.

    The nine audio ids are the config's. The others follow the real layout, anchored on
    audio_start: `<|endoftext|>` = audio_start - 14, then `<|im_start|>`, `<|im_end|>`, the 11
    Baichuan tokens, and the 23 multimodal tokens from audio_start on (§2.3 [I]; the fixture
    tokenizer uses the same places: B_SYS 446, C_Q 448, C_A 449 for audio_start 457)."""
    start = cfg.audio_tokens.audio_start
    layout = {t: start - 14 + i for i, t in enumerate(QWEN_SPECIALS + BAICHUAN_SPECIALS)}
    layout.update({t: start + i for i, t in enumerate(MULTIMODAL_SPECIALS)})
    for name, token in AUDIO_TOKEN_STRINGS.items():
        layout[token] = getattr(cfg.audio_tokens, name)
    by_id: dict[int, list[str]] = {}
    for t, i in layout.items():
        by_id.setdefault(i, []).append(t)
    clash = {i: ts for i, ts in by_id.items() if len(ts) > 1}
    if clash:
        raise TokenizerError("config.json audio token ids do not fit the special-token layout: "
                             + "; ".join(f"id {i} would hold {', '.join(ts)}" for i, ts in sorted(clash.items())))
    return layout


# GPT-2 style pre-tokenisation regex of Qwen2 (splits letters, single digits, punctuation runs).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Small built-in corpus for the tiny BPE: English and Chinese phrases of a voice assistant,
# including the demos' system and ASR prompts, so prompts and replies tokenise into pieces.
TINY_CORPUS = (
    DEFAULT_SYSTEM_PROMPT, ASR_PROMPT, "将语音转录为文本。",
    "你好，我是你的语音助手。", "今天天气很好，我们一起去公园散步吧！", "谢谢大家的支持。",
    "欢迎收听今天的节目。", "我们马上开始。", "再见，祝你有美好的一天！", "请问你需要什么帮助？",
    "这个问题很有意思，让我想一想。", "北京是中国的首都。", "我喜欢听音乐和看书。",
    "明天早上八点有一个会议。", "请把声音调大一点。", "你能给我讲一个故事吗？",
    "人工智能正在改变我们的生活。", "春天来了，花都开了。", "我正在学习中文和英文。",
    "这是一段测试语音。", "语音识别和语音合成都很重要。", "他说话的声音很温柔。",
    "请用简单的话回答。", "现在几点了？", "我们一起唱一首歌吧。", "好的，没问题。",
    "Hello, how are you today?", "I am fine, thank you. And you?",
    "The weather is nice today, so let's take a walk in the park!",
    "Thanks for listening to today's show.", "Welcome back, everyone.",
    "Please answer the question in a friendly voice.", "Transcribe the speech into text.",
    "What time is it now? It is half past eight in the morning.",
    "Could you tell me a short story about a quick brown fox?",
    "The quick brown fox jumps over the lazy dog.", "Speech recognition turns audio into words.",
    "Text to speech turns words into audio.", "We will start the meeting at nine o'clock.",
    "She sings a beautiful song every evening.", "My favourite colour is green; what's yours?",
    "Artificial intelligence is changing the way we live and work.",
    "Let me think about that for a moment.", "That's a very interesting question!",
    "The river flows quietly through the old town.", "Numbers like 1, 2, 3 and 2025 are split into digits.",
    "Remember to drink water and get some rest.", "I'd like a cup of tea, please.",
    "They're going to the library after school.", "We've been waiting for the train since noon.",
    "Good morning! Good afternoon! Good night!", "Is this the right way to the station?",
    "Music, books and movies make life better.", "Open the window, because it is warm outside.",
    "The children played football until sunset.", "Voice assistants answer questions quickly.",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/Qwen2 byte-level alphabet: byte -> printable character, in its canonical order
    (printable bytes first; a byte-level BPE gives the i-th entry id i)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _pipeline(model):
    """A tokenizers.Tokenizer with Qwen2's normaliser, pre-tokenizer and decoder around `model`."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors

    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _train_merges(n_merges: int) -> list[tuple[str, str]]:
    from tokenizers import models, pre_tokenizers, trainers

    tok = _pipeline(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False,
                               continuing_subword_prefix="", end_of_word_suffix=""))
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(TINY_CORPUS), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    if len(merges) < n_merges:
        most = 256 + len(merges) + len(ALL_SPECIALS)
        raise TokenizerError(f"the built-in corpus yields only {len(merges)} BPE merges; a tiny vocab of this "
                             f"size needs {n_merges} (use a vocab_size of at most {most})")
    return merges[:n_merges]


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def build_tiny_tokenizer(out_dir: str | Path, cfg: ModelConfig, vocab_size: int) -> Path:
    """Write a real Qwen2-style byte-level BPE of exactly `vocab_size` ids to `out_dir`.

    Ids 0..255 are the 256 byte symbols (GPT-2 order); every special string of §2.3 sits at
    the id of `special_token_layout(cfg)`, both in the BPE vocab and as a special added token
    (that is how the real tokenizer has non-contiguous special ids); the BPE merges learned on
    the built-in corpus fill the remaining ids in merge order. Files: tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, as transformers' save_pretrained writes them."""
    from tokenizers import AddedToken, models

    out = Path(out_dir)
    layout = special_token_layout(cfg)
    bad = {t: i for t, i in layout.items() if not 256 <= i < vocab_size}
    if bad:
        raise TokenizerError(f"special ids must lie in [256, vocab_size={vocab_size}): "
                             + ", ".join(f"{t}={i}" for t, i in bad.items()))
    merges = _train_merges(vocab_size - 256 - len(layout))
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab.update(layout)
    taken = set(layout.values())
    free = (i for i in range(256, vocab_size) if i not in taken)
    for a, b in merges:
        vocab[a + b] = next(free)
    if len(vocab) != vocab_size:
        raise TokenizerError(f"tiny tokenizer has {len(vocab)} ids, wanted {vocab_size} (duplicate BPE pieces)")

    tok = _pipeline(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False,
                               continuing_subword_prefix="", end_of_word_suffix=""))
    by_id = sorted(layout.items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in by_id])
    for t, i in by_id:  # added tokens take the id the BPE vocab gives them
        assert tok.token_to_id(t) == i, (t, i, tok.token_to_id(t))

    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    additional = [t for t, _ in by_id if t != ENDOFTEXT]
    eos = {"content": ENDOFTEXT, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added_token(t) for t, i in by_id},
        "additional_special_tokens": additional,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json",
                {"additional_special_tokens": additional, "eos_token": eos, "pad_token": eos})
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
