"""Stop strings against transformers' StopStringCriteria on the fixture tokenizer (correction 10)."""
from __future__ import annotations

import os
import random

import pytest
import torch
from transformers.generation.stopping_criteria import StopStringCriteria

from services.llm.stop import StopStrings, StopTables, token_strings

FIX = "06_protocol"
PUNCTUATION = [",", "!", "?", "，", "。", "！", "？", ". "]      # §11.2f, after <audiogen_start_baichuan>


@pytest.fixture(scope="module")
def tok(fixtures):
    from transformers import AutoTokenizer
    fixtures.require(FIX)
    return AutoTokenizer.from_pretrained(str(fixtures.root / FIX / "tokenizer"))


@pytest.fixture(scope="module")
def ids(fixtures, tok):
    """Ids from the fixture and the config: every stop piece (inputs.json), the special ids,
    and the token the three full-width pieces ，！？ share as a UTF-8 prefix (its own piece)."""
    pieces = fixtures.json(FIX, "inputs.json")["stop_piece_ids"]
    wide = [tok.convert_ids_to_tokens(pieces[c]) for c in "，！？"]
    prefix = tok.convert_tokens_to_ids(os.path.commonprefix(wide))
    assert prefix is not None and prefix != tok.unk_token_id and prefix not in pieces.values()
    a = fixtures.model_config.audio_tokens
    return {"pieces": pieces, "prefix": prefix, "eos": tok.eos_token_id,
            "audiogen_start": a.audiogen_start, "audiogen_end": a.audiogen_end}


def _stop_lists(tok, ids) -> dict[str, list[str]]:
    start, eos = tok.convert_ids_to_tokens([ids["audiogen_start"], ids["eos"]])
    return {"later": [start] + PUNCTUATION, "first": [start, eos], "eos": [eos]}


class StopStringCriteria445(StopStringCriteria):
    """transformers 4.45's behaviour in today's class: every token decoded on its own
    (convert_tokens_to_string), matched as text."""

    @staticmethod
    def _get_stop_string_matching_mode(tokenizer):
        return None


def _random_sequences(tok, ids, n, seed):
    strings = token_strings(tok, "text")
    rng = random.Random(seed)
    space = [i for i, s in enumerate(strings) if s.startswith(" ")][:25]
    specials = [ids["audiogen_start"], ids["audiogen_end"], ids["eos"]]
    pool = list(ids["pieces"].values()) + [ids["prefix"]] + space + specials
    for _ in range(n):
        yield [rng.choice(pool) if rng.random() < 0.6 else rng.randrange(len(strings))
               for _ in range(rng.randint(1, 8))]


@pytest.mark.parametrize("mode,hf_cls", [("text", StopStringCriteria445), ("bytes", StopStringCriteria)])
@pytest.mark.parametrize("which", ["later", "first", "eos"])
def test_matches_transformers(tok, ids, mode, hf_cls, which):
    stops = _stop_lists(tok, ids)[which]
    hf = hf_cls(tok, stops)
    mine = StopTables(tok, mode).stops(stops)
    n_stop = 0
    for seq in _random_sequences(tok, ids, 600, seed=len(stops)):
        want = bool(hf(torch.tensor([seq]), None)[0])
        got = mine.check(seq) is not None
        assert got == want, f"{mode}: {seq} -> {got}, transformers says {want}"
        n_stop += want
    assert n_stop > 10         # the sample exercises stops, not only non-stops


def test_dot_space_across_tokens(tok, ids):
    """Correction 10: '.' then a token starting with a space stops on '. '."""
    s = StopTables(tok, "text").stops(_stop_lists(tok, ids)["later"])
    strings = token_strings(tok, "text")
    p = ids["pieces"]
    dot, comma = p["."], p[","]
    # a word piece after a space, with no stop character of its own
    space = next(i for i, t in enumerate(strings)
                 if len(t) > 1 and t.startswith(" ") and not any(c in t for c in ".,!?"))
    assert strings[dot] == "."
    assert s.check([dot, space]) == ". "
    assert s.check([space, dot]) is None            # a bare '.' is no stop string
    assert s.check([dot]) is None
    assert s.check([p[". "]]) == ". "               # the single-token piece
    assert s.check([comma, space]) is None          # ',' already passed: only the final token can end a match


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


def test_text_and_bytes_modes_differ_on_split_characters(tok, ids):
    """'，' built from a 2-byte prefix token and a 1-byte token: transformers >= 4.50 stops,
    4.45 (the reference) does not."""
    prefix = ids["prefix"]                          # the shared UTF-8 prefix of ，！？
    last = tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(ids["pieces"]["，"])[-1])   # its final byte
    seq = [prefix, last]
    later = _stop_lists(tok, ids)["later"]
    assert tok.decode(seq) == "，"
    assert StopTables(tok, "text").stops(later).check(seq) is None
    assert StopTables(tok, "bytes").stops(later).check(seq) == "，"
    assert not StopStringCriteria445(tok, later)(torch.tensor([seq]), None)[0]
    assert StopStringCriteria(tok, later)(torch.tensor([seq]), None)[0]
