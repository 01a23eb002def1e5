"""The session store on a real redis-server: caps, expiry, caller-chosen ids, deletion, and a
session belonging to the identity that made it (nobody else can find, use or delete it)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis

from orchestrator.sessions import SessionSettingsRecord, SessionStore, turn_owner_key
from services.common.errors import AlreadyExists, NotFound, QuotaExceeded

NB = 8


@pytest.fixture
def r(private_redis):
    return private_redis


def store(r, *, max_sessions: int = 100, per_owner: int = 100, ttl: int = 60) -> SessionStore:
    return SessionStore(r, default_ttl_s=ttl, max_sessions=max_sessions, num_codebooks=NB,
                        max_per_owner=lambda _owner: per_owner)


def settings(**kw) -> SessionSettingsRecord:
    return SessionSettingsRecord(**kw)


def test_server_generated_ids_and_the_record(r):
    st = store(r)
    s = st.create("alice", settings(system_prompt="hi", spoken=False))
    assert len(s.session_id) == 32 and s.owner == "alice" and s.uid == f"alice:{s.session_id}"
    got = st.get("alice", s.session_id)
    assert got.settings.system_prompt == "hi" and not got.settings.spoken and got.owner == "alice"
    assert got.codes.shape == (0, NB)


def test_another_identity_finds_nothing(r):
    st = store(r)
    s = st.create("alice", settings())
    with pytest.raises(NotFound) as e:
        st.get("bob", s.session_id)
    assert str(e.value) == f"session {s.session_id!r} not found (unknown, deleted or expired)"
    with pytest.raises(NotFound):
        st.begin_turn("bob", s.session_id, "a" * 32)
    with pytest.raises(NotFound):
        st.delete("bob", s.session_id)
    assert st.get("alice", s.session_id).active_turn == ""      # untouched by bob's attempts
    # the unknown id gives the same answer, word for word: nothing tells bob alice's id exists
    with pytest.raises(NotFound) as unknown:
        st.get("bob", "f" * 32)
    assert str(unknown.value) == str(e.value).replace(s.session_id, "f" * 32)


def test_caller_chosen_ids_are_per_identity(r):
    st = store(r)
    a = st.create("alice", settings(system_prompt="alice's"), "my-chat")
    with pytest.raises(AlreadyExists, match="you already have a session 'my-chat'"):
        st.create("alice", settings(), "my-chat")
    b = st.create("bob", settings(system_prompt="bob's"), "my-chat")          # no collision, nothing revealed
    assert a.session_id == b.session_id == "my-chat" and a.uid != b.uid
    assert st.get("alice", "my-chat").settings.system_prompt == "alice's"
    assert st.get("bob", "my-chat").settings.system_prompt == "bob's"


@pytest.mark.parametrize("bad", ["X:faithful", "a b", "", "x" * 65, "../x", "s\n", "é"])
def test_session_ids_are_checked_on_every_call(r, bad):
    st = store(r)
    s = st.create("alice", settings(faithful_history=True), "X")
    st.save_faithful_turns(s, [{"user": {"text": "hi"}, "assistant": []}])
    for call in (lambda: st.get("alice", bad), lambda: st.delete("alice", bad),
                 lambda: st.begin_turn("alice", bad, "a" * 32)):
        with pytest.raises(ValueError, match="session_id"):
            call()
    if bad:
        with pytest.raises(ValueError, match="session_id"):
            st.create("alice", settings(), bad)
    # `X:faithful` could name another key of session X; it names nothing now
    assert st.faithful_turns(st.get("alice", "X")) == [{"user": {"text": "hi"}, "assistant": []}]


def test_delete_removes_everything_and_then_is_not_found(r):
    st = store(r)
    s = st.create("alice", settings(faithful_history=True))
    st.save_faithful_turns(s, [{"user": {"text": "hi"}, "assistant": []}])
    st.delete("alice", s.session_id)
    assert not r.keys(f"session:{s.uid}*") and not r.zscore("sessions", s.uid)
    with pytest.raises(NotFound):
        st.get("alice", s.session_id)
    with pytest.raises(NotFound):   # a retried delete: NOT_FOUND, i.e. done
        st.delete("alice", s.session_id)


def test_the_session_cap_with_the_wait_until_the_oldest_expires(r):
    st = store(r, max_sessions=3, ttl=600)
    made = [st.create(owner, settings()) for owner in ("alice", "bob", "carol")]
    with pytest.raises(QuotaExceeded) as e:
        st.create("dave", settings())
    assert "3 sessions are live (limits.max_sessions)" in str(e.value)
    assert 590 <= e.value.retry_after_s <= 600 and "retry after" in str(e.value)
    st.delete("bob", made[1].session_id)
    st.create("dave", settings())


def test_the_per_identity_cap(r):
    st = store(r, per_owner=2)
    st.create("alice", settings())
    second = st.create("alice", settings())
    with pytest.raises(QuotaExceeded, match=r"alice has 2 live sessions, its limit \(quotas.sessions\)"):
        st.create("alice", settings())
    st.create("bob", settings())           # others are not affected
    st.delete("alice", second.session_id)
    st.create("alice", settings())


def test_caps_hold_when_replicas_create_at_once(r):
    """Eight stores (eight orchestrator replicas) creating together never pass the cap."""
    stores = [store(redis.Redis(connection_pool=r.connection_pool), max_sessions=5) for _ in range(8)]
    made, refused = [], []

    def create(st):
        try:
            made.append(st.create("alice", settings()))
        except QuotaExceeded:
            refused.append(1)

    threads = [threading.Thread(target=create, args=(st,)) for st in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 5 and len(refused) == 11 and r.zcard("sessions") == 5


def test_sessions_expire_after_their_ttl_and_free_the_cap(r):
    st = store(r, max_sessions=1, ttl=1)
    s = st.create("alice", settings())
    with pytest.raises(QuotaExceeded):
        st.create("bob", settings())
    time.sleep(1.3)
    with pytest.raises(NotFound):
        st.get("alice", s.session_id)
    st.create("bob", settings())


def test_activity_pushes_the_expiry_back(r):
    st = store(r, ttl=2)
    s = st.create("alice", settings())
    for _ in range(3):
        time.sleep(0.8)
        st.touch(st.get("alice", s.session_id))
    assert st.get("alice", s.session_id).turns == 0       # 2.4 s after creation, alive


def test_a_resume_names_a_turn_of_its_own_session(r):
    st = store(r)
    a, b = st.create("alice", settings()), st.create("alice", settings())
    turn = "ab" * 16
    st.begin_turn("alice", a.session_id, turn)
    assert r.get(turn_owner_key(turn)).decode() == a.uid
    st.turn_of(st.get("alice", a.session_id), turn)
    with pytest.raises(NotFound, match="of another session"):
        st.turn_of(st.get("alice", b.session_id), turn)
    with pytest.raises(NotFound):
        st.turn_of(st.get("alice", b.session_id), "cd" * 16)
    with pytest.raises(ValueError, match="turn id"):
        st.turn_of(st.get("alice", a.session_id), "turn:x:events")
    st.end_turn(st.get("alice", a.session_id), entries=[], tokens=[1, 2], codes=np.zeros((0, NB), np.int32))
    assert st.get("alice", a.session_id).tokens == [1, 2]


def test_racing_turns_on_one_session_one_wins(r):
    """Turns begun at once on one session (as from several conversation replicas, real threads
    on a real Redis): exactly one is marked running, every round; the others are refused."""
    from services.common.errors import ResourceExhausted

    st = store(r)
    s = st.create("alice", settings())
    for round_ in range(20):
        n = 6
        barrier = threading.Barrier(n)
        won, refused = [], []

        def one(i):
            tid = f"{round_:02d}{i:02d}".ljust(32, "0")
            barrier.wait()
            try:
                st.begin_turn("alice", s.session_id, tid)
                won.append(tid)
            except ResourceExhausted:
                refused.append(tid)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == n - 1, (round_, won)
        assert st.get("alice", s.session_id).active_turn == won[0]
        assert st.end_turn(st.get("alice", s.session_id), entries=[{"role": "user", "text": str(round_)}],
                           tokens=None, codes=None, turn_id=won[0])
    assert st.get("alice", s.session_id).turns == 20


def test_the_end_of_a_turn_changes_only_its_own_turn(r):
    """end_turn writes the session as it is now in Redis, only while the turn is the running
    one: an abandoned turn's late end (its replica came back, or a producer that took it over)
    neither clears the newer turn nor rewrites the history from an old copy."""
    st = store(r)
    s = st.create("alice", settings())
    stale = st.begin_turn("alice", s.session_id, "1" * 32)           # a copy read at its start
    # its producer died: a newer turn begins and ends meanwhile
    st.begin_turn("alice", s.session_id, "2" * 32, is_over=lambda t: t == "1" * 32)
    assert st.end_turn(st.get("alice", s.session_id), entries=[{"role": "user", "text": "second"}],
                       tokens=[1, 2, 3], codes=np.zeros((0, NB), np.int32), turn_id="2" * 32)
    # the first turn's late end changes nothing
    assert not st.end_turn(stale, entries=[{"role": "user", "text": "first"}], tokens=[9],
                           codes=np.zeros((0, NB), np.int32), turn_id="1" * 32)
    got = st.get("alice", s.session_id)
    assert [h["text"] for h in got.history] == ["second"] and got.tokens == [1, 2, 3] and got.turns == 1
    # recorded twice (a take-over after the first record): once
    st.begin_turn("alice", s.session_id, "3" * 32)
    for _ in range(2):
        st.end_turn(st.get("alice", s.session_id), entries=[{"role": "user", "text": "third"}],
                    tokens=None, codes=None, turn_id="3" * 32)
    assert [h["text"] for h in st.get("alice", s.session_id).history] == ["second", "third"]
    # ended through a copy read before the other turns: their history stays
    st.begin_turn("alice", s.session_id, "4" * 32)
    assert st.end_turn(stale, entries=[], tokens=None, codes=None, turn_id="4" * 32)
    assert [h["text"] for h in st.get("alice", s.session_id).history] == ["second", "third"]
