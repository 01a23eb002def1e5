"""API keys: key rings from a file and the environment, rotation, and who a call's metadata
names; errors say how to authenticate and never echo a key."""
from __future__ import annotations

import os

import pytest

from services.common.auth import (
    ANONYMOUS, Authenticator, KeyRing, KeyRingError, bearer, parse_keys, read_client_key, write_key_file,
)
from services.common.errors import Unauthenticated
from services.common.settings import Settings

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh"


def md(token: str | None, scheme: str = "Bearer"):
    return [("application", "conversation")] + ([("authorization", f"{scheme} {token}")] if token is not None else [])


def test_parse_lines_commas_and_comments():
    keys = parse_keys(f"# issued 2026-01\nalice:{ALICE}  # the web app\n\n bob : {BOB} ,carol:{'c' * 20}\n", "f")
    assert keys == {"alice": ALICE, "bob": BOB, "carol": "c" * 20}


@pytest.mark.parametrize("text, words", [
    ("alice\n", "line 1: an entry is not `name:key`"),
    (f"ok:{ALICE}\nal ice:{BOB}\n", "line 2: key name 'al ice' is not valid"),
    ("alice:short\n", "line 1: the key of 'alice' is shorter than 16"),
    (f"alice:{ALICE}\nalice:{BOB}\n", "line 2: 'alice' has a second key"),
    (f"alice:{ALICE}\nbob:{ALICE}\n", "line 2: the key of 'bob' is also another name's key"),
])
def test_bad_key_files_name_the_line_never_the_key(text, words):
    with pytest.raises(KeyRingError) as e:
        parse_keys(text, "keys.txt")
    assert words in str(e.value) and "keys.txt" in str(e.value)
    assert ALICE not in str(e.value) and BOB not in str(e.value)


def test_identify_by_name_from_file_and_environment(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"alice:{ALICE}\n")
    ring = KeyRing(file=str(f), text=f"bob:{BOB}")
    assert ring.identify(ALICE) == "alice" and ring.identify(BOB) == "bob"
    assert ring.identify(ALICE[:-1]) is None and ring.identify(ALICE + "x") is None and ring.identify("") is None


def test_a_rotated_key_file_takes_effect_without_a_restart(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"alice:{ALICE}\n")
    ring = KeyRing(file=str(f))
    assert ring.identify(ALICE) == "alice"
    new = "alice-rotated-key-0123456789"
    f.write_text(f"alice:{new}\n")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))   # a new Secret version
    assert ring.identify(new) == "alice" and ring.identify(ALICE) is None
    f.write_text("garbage")   # a broken rewrite keeps the last good keys
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 2_000_000))
    assert ring.identify(new) == "alice"


def test_bearer_metadata():
    assert bearer(md(ALICE)) == ALICE and bearer(md(ALICE, "bearer")) == ALICE
    assert bearer([("Authorization", f"Bearer {ALICE}".encode())]) == ALICE
    assert bearer(md(ALICE, "Basic")) == "" and bearer(md(None)) is None and bearer(None) is None


def test_authenticator_names_the_caller_or_says_how_to_authenticate(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    auth = Authenticator.public(Settings(auth={"api_keys_file": str(f)}).auth)
    assert auth.identity(md(ALICE)) == "alice" and auth.identity(md(BOB)) == "bob"
    for bad in (md(None), md("wrong-key-0123456789abcdef"), md(ALICE, "Basic"), md("")):
        with pytest.raises(Unauthenticated) as e:
            auth.identity(bad)
        assert "authorization: Bearer" in str(e.value)
        assert "wrong-key" not in str(e.value) and ALICE not in str(e.value)


def test_auth_off_makes_keyless_calls_anonymous_but_still_refuses_a_wrong_key():
    auth = Authenticator.public(Settings(auth={"required": False}).auth)
    assert auth.identity(md(None)) == ANONYMOUS
    with pytest.raises(Unauthenticated):
        auth.identity(md("wrong-key-0123456789abcdef"))


def test_required_auth_without_keys_refuses_to_start():
    with pytest.raises(KeyRingError, match="no API key is configured.*BAICHUAN_AUDIO_API_KEYS"):
        Authenticator.public(Settings().auth)


def test_keys_from_the_environment_only(tmp_path):
    s = Settings.load(env={"BAICHUAN_AUDIO_API_KEYS": f"alice:{ALICE},bob:{BOB}",
                           "BAICHUAN_AUDIO_INTERNAL_KEYS": f"stages:{'s' * 20}"})
    assert Authenticator.public(s.auth).identity(md(BOB)) == "bob"
    for text in (repr(s), str(s.to_dict()), repr(s.auth)):
        assert ALICE not in text and BOB not in text and "s" * 20 not in text


def test_stage_services_take_internal_keys_only(tmp_path):
    s = Settings.load(env={"BAICHUAN_AUDIO_API_KEYS": f"alice:{ALICE}",
                           "BAICHUAN_AUDIO_INTERNAL_KEYS": f"stages:{'s' * 20}"})
    internal = Authenticator.internal(s.auth)
    assert internal.identity(md("s" * 20)) == "stages"
    with pytest.raises(Unauthenticated, match="internal"):
        internal.identity(md(ALICE))
    with pytest.raises(Unauthenticated, match="internal"):      # none configured: nothing passes
        Authenticator.internal(Settings(auth={"required": False}).auth).identity(md(None))


def test_local_key_file_is_owner_only_and_read_by_clients(tmp_path):
    path = tmp_path / "cfg" / "api-keys"
    key = write_key_file(path, name="local")
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_client_key(path) == key and KeyRing(file=str(path)).identify(key) == "local"
    bare = tmp_path / "key"
    bare.write_text(key + "\n")
    assert read_client_key(bare) == key
