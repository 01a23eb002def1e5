"""The engine on a paged KV cache: the same tokens and codes as on a static cache, blocks held
only for the tokens a sequence or an idle session really has, idle sessions evicted when blocks
run short, and a clear error (not a hang, not silent loss) when running sequences outgrow it.
Real model = fixture 06's tiny random model in fp32."""
from __future__ import annotations

import pytest
import torch

from services.llm.engine import EngineError
from services.llm.kv_cache import KVCache
from tests.llm.test_engine import RUNS, _alone, _asr_turn, _bound, _comparable, _variants
from tests.llm.test_parity_protocol import protocol_env  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

BS = 4                                   # tokens per block: small, so lengths cross many blocks


def _budget(env, blocks: int) -> int:
    return blocks * KVCache.block_bytes(env.model.cfg, BS, torch.float32)


def test_paged_engine_equals_static_and_gives_every_block_back(protocol_env):
    """All fixture runs and variants at once in a pool that holds what they need, a third of
    what static slots of max_len would reserve: each result equals its static run alone."""
    env = protocol_env
    variants = _variants(env)
    requests = [env.request(run) for run in RUNS] + variants
    max_len = max([env.context] + [_bound(env, r) for r in variants])
    need = sum(-(-(_bound(env, r) if r in variants else max_len) // BS) for r in requests) + len(requests)
    static_blocks = len(requests) * -(-max_len // BS)
    eng = env.engine(num_slots=len(requests), max_len=max_len, paged=True, kv_block_size=BS,
                     kv_budget_bytes=_budget(env, need), prefill_budget=4096)
    assert eng.pool.num_blocks == need < static_blocks
    hs = [eng.submit(r) for r in requests]
    eng.run_until_idle()
    assert [_comparable(h.drain()) for h in hs] == _alone(env, requests, max_len)
    assert eng.stats["max_rows"] == len(requests)          # all ran together
    assert eng.pool.available == eng.pool.num_blocks       # no session: every block came back
    assert (eng.cache.table[:eng.num_slots] == 0).all()


def test_sessions_hold_their_tokens_only_and_are_evicted_for_blocks(protocol_env):
    env = protocol_env
    kv = env.outputs["runs"]["asr"]["final_kv_len"]          # tokens an ASR turn leaves cached
    blocks = -(-kv // BS)
    # room for two cached ASR turns (and one running turn's headroom), in 8 slots
    eng = env.engine(num_slots=8, max_len=kv + BS, paged=True, kv_block_size=BS,
                     kv_budget_bytes=_budget(env, 2 * blocks + 1))
    s1, s2, s3 = (eng.open_session(f"s{i}") for i in (1, 2, 3))
    for s in (s1, s2):
        assert _asr_turn(env, eng, s).prefix_reused == 0
        slot = eng.sessions.sessions[s].slot
        assert len(eng.pool.owned[slot]) == blocks            # the cached tokens' blocks, no more
    assert eng.sessions.evictions == 0
    assert _asr_turn(env, eng, s1).prefix_reused > 0         # s1 kept its KV
    assert _asr_turn(env, eng, s3).prefix_reused == 0        # no blocks left: s2 (least recent) goes
    assert eng.sessions.evictions == 1 and eng.sessions.sessions[s2].slot is None
    assert len(eng.sessions.free) == 8 - 2                   # slots were never the limit
    eng.close_session(s3)
    assert eng.pool.available == eng.pool.num_blocks - blocks


def test_sequences_outgrowing_the_pool_end_the_newest_with_an_error(protocol_env):
    """Two spoken turns whose prompts fit but whose replies cannot both: the one admitted last
    ends with a KV-full error and gives its blocks back; the other finishes as it would alone."""
    env = protocol_env
    a, b = _variants(env)[:2]
    max_len = max(_bound(env, r) for r in (a, b))
    pool = -(-(len(a.prompt_ids) + 1) // BS) + -(-(len(b.prompt_ids) + 1) // BS) + 2
    assert pool < -(-_bound(env, a) // BS) + -(-_bound(env, b) // BS)
    eng = env.engine(num_slots=2, max_len=max_len, paged=True, kv_block_size=BS,
                     kv_budget_bytes=_budget(env, pool), prefill_budget=4096)
    ha, hb = eng.submit(a), eng.submit(b)
    eng.run_until_idle()
    done_b = hb.drain()[-1]
    assert done_b.reason == "error" and "KV cache full" in done_b.error
    assert _comparable(ha.drain()) == _alone(env, [a], max_len)[0]
    assert eng.pool.available == eng.pool.num_blocks


def test_a_prompt_larger_than_the_pool_is_refused(protocol_env):
    env = protocol_env
    r = env.request("spoken")
    eng = env.engine(max_len=env.context, paged=True, kv_block_size=BS,
                     kv_budget_bytes=_budget(env, len(r.prompt_ids) // BS))
    with pytest.raises(EngineError, match="paged KV cache holds"):
        eng.submit(r)
    with pytest.raises(EngineError, match="holds no KV block"):
        env.engine(paged=True, kv_block_size=BS, kv_budget_bytes=_budget(env, 1) - 1)
