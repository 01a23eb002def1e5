"""Prompt token ids exactly as the reference demos build them (reference-model.md §11.1, §11.6).

- Chat (s2s demo): `<B_SYS>system <C_Q>user [<audiotext_start>]<C_A>assistant ... <C_Q>user
  [<audiotext_start>]<C_A>`, no BOS, no newlines, no end-of-turn token; the
  `<audiotext_start_baichuan>` prefixes only when a spoken reply is wanted. The tokenizer's
  chat_template is not used.
- User audio: `<audio_start> pad×N <audio_end>`; assistant audio in history:
  `<audiogen_start> pad×N <audiogen_end>`; the N code rows become the pads' embeddings.
- ASR (base demo): `将语音转录为文本:` + user audio span, no role tokens.
- TTS (base demo): the text split after `: , ; ! ? ， 。 ； ： ！ ？`, pieces merged until a chunk
  is longer than 10 characters, each chunk followed by `<audiogen_start_baichuan>`.

Role and special-token ids come from the tokenizer and `ModelConfig.audio_tokens`. Text (the
user's, the system prompt, the assistant's history, TTS text) is encoded as text only: a
special-token string inside it (`<C_Q>`, `<audiogen_start_baichuan>`, `<|endoftext|>`, ...) is
split into ordinary byte-level pieces, never its id, so a caller cannot inject a role or an
audio control token; special ids enter a prompt only where this builder places them. This
differs from the reference processor, which maps such strings to their ids; for text without
them the ids are the same.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from services.common.model_config import AudioTokenIds, ModelConfig
# DEFAULT_SYSTEM_PROMPT: the s2s demo's ("answer with the 'girl-next-door' female voice"; the
# voice is chosen only through this text). ASR_PROMPT: the base ASR demo's instruction.
from services.common.text_tokenizer import ASR_PROMPT, DEFAULT_SYSTEM_PROMPT, special_ids

__all__ = ["ASR_PROMPT", "DEFAULT_SYSTEM_PROMPT", "Audio", "GeneratedAudio", "Message", "Prompt",
           "PromptBuilder", "PromptError", "ProtocolTokens", "split_tts_text"]

# Baichuan-Audio's TTS demo splits after these (Omni-1.5's demo also after "、").
TTS_SPLIT = re.compile(r"([:,;!?，。；：！？])")
TTS_MIN_CHUNK_CHARS = 10  # a chunk is closed once it is longer than this


class PromptError(ValueError):
    """A prompt that cannot be built (unknown role token, bad audio codes, ...)."""


@dataclass(frozen=True)
class Audio:
    """User audio: its RVQ codes [N, num_codebooks], one row per 80 ms frame."""

    codes: torch.Tensor


@dataclass(frozen=True)
class GeneratedAudio:
    """Assistant audio kept in the history (codes of a spoken reply segment)."""

    codes: torch.Tensor


Part = Union[str, Audio, GeneratedAudio]


@dataclass(frozen=True)
class Message:
    role: str                          # "system" | "user" | "assistant"
    content: Union[str, Sequence[Part]]


@dataclass
class Prompt:
    """Token ids plus the codes of every `<audio_pad>` in them, in order."""

    ids: list[int]
    audio_codes: torch.Tensor | None = None   # [n_pads, C] int64
    n_pads: int = field(init=False)

    def __post_init__(self):
        self.n_pads = 0 if self.audio_codes is None else int(self.audio_codes.shape[0])


@dataclass(frozen=True)
class ProtocolTokens:
    """Every id and string the protocol needs, from the tokenizer, config and generation config."""

    audio: AudioTokenIds
    eos: int                   # <|endoftext|>: generation_config.eos_token_id == tokenizer.eos_token_id
    system: int
    user: int
    assistant: int
    audiogen_start_str: str    # token strings, for the stop-string lists
    eos_str: str

    @classmethod
    def from_tokenizer(cls, tokenizer, cfg: ModelConfig, generation_config: dict | None = None) -> "ProtocolTokens":
        """Role/EOS ids from the tokenizer (checked against config.json's audio ids), and the
        generation config's EOS, which must be the tokenizer's (correction 13: the loop tests
        tokenizer.eos_token_id while generate stops on generation_config.eos_token_id)."""
        ids = special_ids(tokenizer, cfg)
        gen_eos = (generation_config or {}).get("eos_token_id", ids.endoftext)
        if isinstance(gen_eos, (list, tuple)) and len(gen_eos) == 1:
            gen_eos = gen_eos[0]
        if gen_eos != ids.endoftext:
            raise PromptError(f"generation_config.json eos_token_id is {gen_eos}, but the tokenizer's "
                              f"<|endoftext|> is {ids.endoftext}; the protocol needs both to be <|endoftext|>")
        return cls(audio=cfg.audio_tokens, eos=ids.endoftext, system=ids.system, user=ids.user,
                   assistant=ids.assistant,
                   audiogen_start_str=tokenizer.convert_ids_to_tokens(cfg.audio_tokens.audiogen_start),
                   eos_str=tokenizer.convert_ids_to_tokens(ids.endoftext))


class PromptBuilder:
    def __init__(self, tokenizer, tokens: ProtocolTokens, num_codebooks: int):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.num_codebooks = num_codebooks

    # ------------------------------------------------------------------ pieces
    def encode(self, text: str) -> list[int]:
        """`text` as text: special-token strings in it are split, never mapped to their ids."""
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)) if text else []

    def _codes(self, codes: torch.Tensor, what: str) -> torch.Tensor:
        c = torch.as_tensor(codes)
        if c.dim() != 2 or c.shape[1] != self.num_codebooks:
            raise PromptError(f"{what} codes must have shape [frames, {self.num_codebooks}], got {tuple(c.shape)}")
        if c.shape[0] == 0:
            raise PromptError(f"{what} has no frames (audio shorter than one 80 ms token?)")
        return c.to(torch.int64)

    def _render(self, parts: Sequence, ids: list[int], codes: list[torch.Tensor]) -> None:
        """Append parts; adjacent text parts are encoded together (the processor sees one string)."""
        a = self.tokens.audio
        text = ""
        for p in parts:
            if isinstance(p, str):
                text += p
                continue
            ids += self.encode(text)
            text = ""
            if isinstance(p, int):                        # a role / special id
                ids.append(p)
            elif isinstance(p, Audio):
                c = self._codes(p.codes, "user audio")
                ids += [a.audio_start] + [a.audio_pad] * c.shape[0] + [a.audio_end]
                codes.append(c)
            elif isinstance(p, GeneratedAudio):
                c = self._codes(p.codes, "assistant audio")
                ids += [a.audiogen_start] + [a.audio_pad] * c.shape[0] + [a.audiogen_end]
                codes.append(c)
            else:
                raise PromptError(f"unsupported prompt part {type(p).__name__}")
        ids += self.encode(text)

    @staticmethod
    def _prompt(ids: list[int], codes: list[torch.Tensor]) -> Prompt:
        return Prompt(ids, torch.cat(codes) if codes else None)

    # ------------------------------------------------------------------ prompts
    def chat(self, messages: Sequence[Message], spoken: bool = True) -> Prompt:
        """The s2s demo's `preprocess_messages`: ends with the generation prompt
        (`[<audiotext_start>]<C_A>`). A system message may only come first."""
        t = self.tokens
        role_id = {"system": t.system, "user": t.user, "assistant": t.assistant}
        parts: list = []
        for i, m in enumerate(messages):
            if m.role not in role_id:
                raise PromptError(f"message {i}: unknown role {m.role!r} (system, user or assistant)")
            if m.role == "system" and i != 0:
                raise PromptError(f"message {i}: a system message may only be the first one")
            if spoken and m.role == "assistant":
                parts.append(t.audio.audiotext_start)
            parts.append(role_id[m.role])
            parts.extend([m.content] if isinstance(m.content, str) else list(m.content))
        if spoken:
            parts.append(t.audio.audiotext_start)
        parts.append(t.assistant)
        ids: list[int] = []
        codes: list[torch.Tensor] = []
        self._render(parts, ids, codes)
        return self._prompt(ids, codes)

    def asr(self, codes: torch.Tensor) -> Prompt:
        """The base ASR demo: instruction + user audio span, no roles."""
        ids: list[int] = []
        out: list[torch.Tensor] = []
        self._render([ASR_PROMPT, Audio(codes)], ids, out)
        return self._prompt(ids, out)

    def tts_chunks(self, text: str) -> list[list[int]]:
        """The base TTS demo: one id list per chunk, each ending in <audiogen_start>.
        Chunk 1 is the prompt; chunk k > 1 is appended after segment k - 1."""
        return [self.tts_chunk(c) for c in split_tts_text(text)]

    def tts_chunk(self, chunk: str) -> list[int]:
        """One TTS chunk's ids: its text, then <audiogen_start>."""
        return self.encode(chunk) + [self.tokens.audio.audiogen_start]


def split_tts_text(text: str) -> list[str]:
    """Split after each punctuation mark (kept with its piece), then merge pieces greedily
    until a chunk is longer than 10 characters; the remainder is the last chunk."""
    pieces: list[str] = []
    last = 0
    for m in TTS_SPLIT.finditer(text):
        pieces.append(text[last:m.start()] + m.group(0))
        last = m.end()
    if last < len(text):
        pieces.append(text[last:])
    chunks: list[str] = []
    cur = ""
    for p in pieces:
        cur += p
        if len(cur) > TTS_MIN_CHUNK_CHARS:
            chunks.append(cur)
            cur = ""
    if cur:
        chunks.append(cur)
    return chunks
