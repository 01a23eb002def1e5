"""Stop strings against transformers' StopStringCriteria on the fixture tokenizer (correction 10)."""
from __future__ import annotations

import random

import pytest
import torch
from transformers.generation.stopping_criteria import StopStringCriteria

from services.llm.stop import StopStrings, StopTables, token_strings

LATER = ["<audiogen_start_baichuan>", ",", "!", "?", "，", "。", "！", "？", ". "]   # §11.2f
FIRST = ["<audiogen_start_baichuan>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def tok(fixtures):
    from transformers import AutoTokenizer
    d = fixtures.root / "06_protocol" / "tokenizer"
    if not d.is_dir():
        pytest.skip(f"fixture tokenizer {d} missing")
    return AutoTokenizer.from_pretrained(str(d))


class StopStringCriteria445(StopStringCriteria):
    """transformers 4.45's behaviour in today's class: every token decoded on its own
    (convert_tokens_to_string), matched as text."""

    @staticmethod
    def _get_stop_string_matching_mode(tokenizer):
        return None


def _random_sequences(tok, n, seed):
    strings = token_strings(tok, "text")
    rng = random.Random(seed)
    space = [i for i, s in enumerate(strings) if s.startswith(" ")][:25]
    pieces = [tok.convert_tokens_to_ids(t) for t in ("<audiogen_start_baichuan>", "<audiogen_end_baichuan>",
                                                      "<|endoftext|>")]
    stop_pieces = [0, 11, 13, 30, 256, 257, 258, 259, 260, 261]    # README: the stop pieces + 256 (UTF-8 prefix)
    pool = stop_pieces + space + pieces
    for _ in range(n):
        yield [rng.choice(pool) if rng.random() < 0.6 else rng.randrange(len(strings))
               for _ in range(rng.randint(1, 8))]


@pytest.mark.parametrize("mode,hf_cls", [("text", StopStringCriteria445), ("bytes", StopStringCriteria)])
@pytest.mark.parametrize("stops", [LATER, FIRST, ["<|endoftext|>"]])
def test_matches_transformers(tok, mode, hf_cls, stops):
    hf = hf_cls(tok, stops)
    mine = StopTables(tok, mode).stops(stops)
    n_stop = 0
    for ids in _random_sequences(tok, 600, seed=len(stops)):
        want = bool(hf(torch.tensor([ids]), None)[0])
        got = mine.check(ids) is not None
        assert got == want, f"{mode}: {ids} -> {got}, transformers says {want}"
        n_stop += want
    assert n_stop > 10         # the sample exercises stops, not only non-stops


def test_dot_space_across_tokens(tok):
    """Correction 10: '.' then a token starting with a space stops on '. '."""
    s = StopTables(tok, "text").stops(LATER)
    strings = token_strings(tok, "text")
    assert strings[13] == "." and strings[262].startswith(" ")
    assert s.check([13, 262]) == ". "
    assert s.check([262, 13]) is None               # a bare '.' is no stop string
    assert s.check([13]) is None
    assert s.check([261]) == ". "                   # the single-token piece
    assert s.check([11, 262]) is None               # ',' already passed: only the final token can end a match


def test_containing_token_and_overhang():
    """A token that merely contains ',' stops; a stop string may start in earlier tokens
    and the final token may run past its end."""
    strings = ["a,b", "xy", "st", "opper", "o", "p", "las", "top", "stop"]
    s = StopStrings([",", "stop"], strings, "text")
    assert s.check([1, 0]) == ","
    assert s.check([2, 3]) == "stop"                # ["st", "opper"]
    assert s.check([6, 7]) == "stop"                # ["las", "top"]
    assert s.check([2, 4, 5]) == "stop"             # ["st", "o", "p"]
    assert s.check([8, 1]) is None                  # the match must reach into the final token
    assert s.check([1]) is None


def test_text_and_bytes_modes_differ_on_split_characters(tok):
    """'，' built from a 2-byte prefix token and a 1-byte token: transformers >= 4.50 stops,
    4.45 (the reference) does not."""
    prefix = 256                                   # the shared UTF-8 prefix of ，！？
    last = tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(257)[-1])   # the final byte of '，'
    ids = [prefix, last]
    assert tok.decode(ids) == "，"
    assert StopTables(tok, "text").stops(LATER).check(ids) is None
    assert StopTables(tok, "bytes").stops(LATER).check(ids) == "，"
    assert not StopStringCriteria445(tok, LATER)(torch.tensor([ids]), None)[0]
    assert StopStringCriteria(tok, LATER)(torch.tensor([ids]), None)[0]
