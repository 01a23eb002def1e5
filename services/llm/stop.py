"""Stop strings with transformers' StopStringCriteria semantics (correction 10, §11.2f).

A stop string S stops generation when S occurs in the concatenated token strings and that
occurrence ends inside the final token (overhang allowed on both sides). So ". " is matched
by a "." token followed by any token starting with a space, and "," by any token merely
containing a comma. The check runs on the host after each step: a per-token table answers
"could this token end any stop string at all?" in O(1); only then are the last few tokens'
strings joined and searched.

Two ways of turning a token into a string, as in the two transformers generations:
- mode="text" (transformers 4.45, which the reference pins and the fixtures used): each
  token is decoded on its own (`convert_tokens_to_string`), so a token ending inside a
  multi-byte character becomes U+FFFD and cannot help to match "，".
- mode="bytes" (transformers >= 4.50 on byte-level vocabularies): tokens are raw bytes and
  the stop strings are UTF-8, so byte fragments can complete "，" across tokens.
"""
from __future__ import annotations

from typing import Sequence

from services.common.text_tokenizer import bytes_to_unicode

_PREFIX = "abcdef"  # the static prefix transformers decodes each token after


_BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}    # byte-level character -> byte


def _is_byte_level(tokenizer) -> bool:
    dec = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return dec is not None and dec.__class__.__name__ == "ByteLevel"


def token_strings(tokenizer, mode: str = "text", size: int | None = None) -> list:
    """The string (mode "text") or bytes (mode "bytes") each token id contributes.

    size: table length (the model's vocab may exceed the tokenizer's); ids without a token
    get "" / b"", which can never end a stop string."""
    if mode not in ("text", "bytes"):
        raise ValueError(f"stop-string mode must be 'text' or 'bytes', not {mode!r}")
    vocab = tokenizer.get_vocab()
    n = max(size or 0, max(vocab.values()) + 1)
    empty = "" if mode == "text" else b""
    out: list = [empty] * n
    byte_level = _is_byte_level(tokenizer)
    base = None
    for tok, idx in vocab.items():
        raw = bytes(_BYTE_OF[c] for c in tok) if byte_level and all(c in _BYTE_OF for c in tok) else None
        if mode == "bytes" and raw is not None:
            out[idx] = raw
            continue
        if raw is not None:
            # what the ByteLevel decoder returns for this token after the prefix (lossy UTF-8)
            out[idx] = raw.decode("utf-8", errors="replace")
            continue
        if base is None:
            prefix_ids = tokenizer(_PREFIX, add_special_tokens=False)["input_ids"]
            base = [tokenizer.convert_ids_to_tokens(i) for i in prefix_ids]
        s = tokenizer.convert_tokens_to_string(base + [tok])
        s = s[s.index(_PREFIX) + len(_PREFIX):]
        out[idx] = s if mode == "text" else s.encode("utf-8")
    return out


class StopStrings:
    """One set of stop strings over one vocabulary.

    `check(ids)` -> the first stop string (in the given order) that the final id completes,
    or None. `ids` is the whole sequence so far (prompt included, as HF checks it)."""

    def __init__(self, stop_strings: Sequence[str], strings: Sequence, mode: str = "text"):
        if not stop_strings:
            raise ValueError("StopStrings needs at least one stop string")
        self.stop_strings = tuple(stop_strings)
        self.mode = mode
        self._targets = tuple(s if mode == "text" else s.encode("utf-8") for s in self.stop_strings)
        if any(len(t) == 0 for t in self._targets):
            raise ValueError("empty stop string")
        self.strings = strings
        self.max_len = max(len(t) for t in self._targets)
        # can_end[id]: the token's string overlaps the end of some stop string at its start
        # (after dropping any suffix overhang): t[:L-j] ends with S, or is a suffix of S.
        # That is: S occurs inside t, or a non-empty prefix of t is a suffix of S.
        suffixes = {S[-m:] for S in self._targets for m in range(1, len(S) + 1)}
        starts = {x[:1] for x in suffixes}
        def can_end(t) -> bool:
            if any(S in t for S in self._targets):
                return True
            if t[:1] not in starts:
                return False
            return any(t[:m] in suffixes for m in range(1, min(len(t), self.max_len) + 1))
        self.can_end = [bool(t) and can_end(t) for t in strings]

    def check(self, ids: Sequence[int]) -> str | None:
        if not ids:
            return None
        last = ids[-1]
        if last >= len(self.can_end) or not self.can_end[last]:
            return None
        final = self.strings[last]
        # HF looks back at most max_len tokens (final one included); chars beyond max_len - 1
        # before the final token cannot take part in a match ending inside it.
        tail = final[:0]
        i = len(ids) - 2
        lo = max(0, len(ids) - self.max_len)
        while i >= lo and len(tail) < self.max_len - 1:
            tok = ids[i]
            tail = (self.strings[tok] if tok < len(self.strings) else final[:0]) + tail
            i -= 1
        s = tail + final
        start = len(tail)
        for name, S in zip(self.stop_strings, self._targets):
            if s.find(S, max(0, start - len(S) + 1)) != -1:
                return name
        return None


class StopTables:
    """Token strings of one tokenizer, computed once (152k decodes on the real vocab) and
    shared by every stop-string set built from it."""

    def __init__(self, tokenizer, mode: str = "text", size: int | None = None):
        self.mode = mode
        self.strings = token_strings(tokenizer, mode, size)
        self._sets: dict[tuple[str, ...], StopStrings] = {}

    def stops(self, stop_strings: Sequence[str]) -> StopStrings:
        key = tuple(stop_strings)
        if key not in self._sets:
            self._sets[key] = StopStrings(key, self.strings, self.mode)
        return self._sets[key]
