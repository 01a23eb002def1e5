"""The engine: continuous batching, cancellation, caps and limits, sessions (prefix reuse,
LRU eviction), threads. Real model = fixture 06's tiny random model in fp32."""
from __future__ import annotations

import pytest
import torch

from services.llm.engine import Engine, EngineConfig, EngineError, Request, UnknownSessionError
from services.llm.kv_cache import KVCache
from services.llm.prompts import Audio, Message, PromptBuilder
from services.llm.protocol import AudioFrame, Done, SegmentEnd
from tests.llm.test_parity_protocol import RUNS, check_run, protocol_env  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _ends(events, kind=None):
    return [e for e in events if isinstance(e, SegmentEnd) and (kind is None or e.kind == kind)]


def _comparable(events):
    """What must not depend on batching: every segment and the final sequence."""
    done = events[-1]
    assert isinstance(done, Done)
    return done.reason, done.final_sequence, done.kv_len, [(e.kind, e.token_ids, e.codes, e.end_codes, e.reason)
                                                           for e in _ends(events)]


def _builder(env):
    return PromptBuilder(env.tokenizer, env.engine().tokens, env.model.cfg.audio.num_codebooks)


def _codes(env):
    """The fixture's user-audio codes [N, C] (N depends on the root)."""
    return env.tensors_in["speech.audio_codes"]


def _bound(env, r: Request) -> int:
    """The longest sequence the engine can hold for request r, from the protocol's caps
    (EngineConfig.max_len at least this never ends it with "length")."""
    pc = env.engine(num_slots=1).protocol_config
    n = len(r.prompt_ids)
    if r.forced is not None:                 # text: n tokens; audio: a pad per frame
        return n + sum(k for _, k in r.forced)
    if r.mode == "tts":                      # per segment: frames + the end-of-audio frame's pad
        cap = min(pc.tts_audio.max_new, r.max_audio_frames or pc.tts_audio.max_new)
        return n + sum(len(c) for c in r.tts_chunks) + (1 + len(r.tts_chunks)) * (cap + 1)
    if r.mode in ("text", "asr"):
        return n + (pc.text_only if r.mode == "text" else pc.asr).max_new
    raise ValueError(f"no bound for an unforced {r.mode} request")


def _alone(env, requests, max_len):
    """Each request's comparable result, run alone on a fresh engine."""
    out = []
    for r in requests:
        eng = env.engine(max_len=max_len)
        h = eng.submit(r)
        eng.run_until_idle()
        out.append(_comparable(h.drain()))
    return out


def _variants(env):
    """Five more requests of other lengths and modes (their lengths are bounded: `_bound`)."""
    b = _builder(env)
    codes = _codes(env)
    N = len(codes)
    spoken = b.chat([Message("system", "hello"), Message("user", [Audio(codes[:max(1, N // 6)]), " weather?"])],
                    spoken=True)
    text = b.chat([Message("user", "Good morning! What time is it now?")], spoken=False)
    asr = b.asr(codes[N // 2:])
    tts = b.tts_chunks("Hello, how are you today? I am fine, thank you.")
    return [
        Request(spoken.ids, "spoken", spoken.audio_codes, forced=[("text", 4), ("audio", 5), ("text", 2)], greedy=True),
        Request(spoken.ids, "spoken", spoken.audio_codes, forced=[("text", 3), ("audio", 3), ("text", 3)], seed=1234),
        Request(text.ids, "text", greedy=True),
        Request(asr.ids, "asr", asr.audio_codes, greedy=True),
        Request(tts[0], "tts", tts_chunks=tts[1:], greedy=True, max_audio_frames=4),
    ]


def test_batched_equals_alone(protocol_env):
    """A sequence gives the same tokens and codes alone or in one batch with the fixture runs
    and the other variants, of other lengths and modes (prefill chunks, text steps and audio
    frames in one forward). Ids and codes are compared exactly: batching changes at most the
    rounding of the logits (~1e-6 in fp32), far below the decisions' top-1 margins (the
    smallest greedy one is ~3e-4 of the logit scale on the public root)."""
    env = protocol_env
    variants = _variants(env)
    max_len = max([env.context] + [_bound(env, r) for r in variants])
    alone = _alone(env, variants, max_len)
    n_requests = len(RUNS) + len(variants)
    fixture_prompts = [env.request(run).prompt_ids for run in RUNS]
    assert min(len(p) for p in fixture_prompts + [r.prompt_ids for r in variants]) > 2
    # every prompt but the last 2 tokens of the last one in the first step (all rows in one
    # forward); those 2 then run as a prefill chunk beside the others' decoding rows
    budget = sum(len(p) for p in fixture_prompts) + sum(len(r.prompt_ids) for r in variants) - 2
    eng = env.engine(num_slots=n_requests, max_len=max_len, prefill_budget=budget, trace=True)
    fixture_handles = {run: eng.submit(env.request(run)) for run in RUNS}
    hs = [eng.submit(r) for r in variants]
    eng.run_until_idle()
    for run, h in fixture_handles.items():
        check_run(env, run, h.drain())
    for i, h in enumerate(hs):
        assert _comparable(h.drain()) == alone[i], f"variant {i} differs when batched"
    assert len({t[0] for t in eng.trace}) == n_requests
    assert eng.stats["max_rows"] == n_requests              # every sequence in one forward
    assert eng.stats["mixed_steps"] > 0                     # a prefill chunk beside decoding rows


def test_cancellation(protocol_env):
    env = protocol_env
    eng = env.engine(num_slots=1)
    h1 = eng.submit(env.request("spoken"))
    h2 = eng.submit(env.request("asr"))                     # waits: one slot
    for _ in range(env.outputs["runs"]["spoken"]["forward_calls_total"] // 2):   # mid-reply
        eng.step()
    h1.cancel()
    h2.cancel()
    eng.step()                                              # both end within one step
    for h in (h1, h2):
        done = h.drain()[-1]
        assert isinstance(done, Done) and done.reason == "cancelled"
    assert not eng.has_work() and eng.sessions.free == [0]
    with pytest.raises(EngineError, match="unknown request"):
        eng.cancel(h1.request_id)


def test_reused_slot_starts_clean(protocol_env):
    """A slot's next sequence sees none of the previous one's text or code history."""
    env = protocol_env
    eng = env.engine(num_slots=1)
    hs = [eng.submit(env.request("tts")) for _ in range(2)]
    eng.run_until_idle()
    for h in hs:
        check_run(env, "tts", h.drain())


def test_context_limit(protocol_env):
    env = protocol_env
    P = len(env.request("spoken").prompt_ids)
    eng = env.engine(max_len=P)                             # the prompt must leave room for the reply
    with pytest.raises(EngineError, match=rf"prompt has {P} tokens; the context limit is {P} tokens"):
        eng.submit(env.request("spoken"))
    ref = env.outputs["runs"]["text"]["final_sequence"]
    P = len(env.request("text").prompt_ids)
    assert len(ref) - P >= 2                                # the fixture's text reply has room to cut
    max_len = P + (len(ref) - P) // 2                       # the reply runs out of room half-way
    eng = env.engine(max_len=max_len)
    h = eng.submit(env.request("text"))
    eng.run_until_idle()
    done = h.drain()[-1]
    assert done.reason == "length" and done.kv_len == max_len
    assert done.final_sequence == tuple(ref[:max_len + 1])  # the fixture's reply, cut


def test_bad_requests(protocol_env):
    env = protocol_env
    eng = env.engine()
    ids = env.inputs["prompt_ids"]["asr"]
    codes = _codes(env)
    N = len(codes)
    with pytest.raises(UnknownSessionError, match="unknown session 'nope'"):
        eng.submit(Request(ids, "asr", codes, session_id="nope"))
    with pytest.raises(UnknownSessionError, match="unknown session 'nope'"):
        eng.close_session("nope")
    with pytest.raises(EngineError, match=f"{N} <audio_pad_baichuan> tokens but audio_codes has {N - 1} frames"):
        eng.submit(Request(ids, "asr", codes[:N - 1]))
    with pytest.raises(EngineError, match="unknown mode"):
        eng.submit(Request(ids, "song", codes))
    with pytest.raises(EngineError, match="must alternate text and audio"):
        eng.submit(Request(ids, "spoken", codes, forced=[("audio", 3)]))
    with pytest.raises(EngineError, match="must end with <audiogen_start_baichuan>"):
        eng.submit(Request(env.inputs["prompt_ids"]["tts"][:-1], "tts"))


def _asr_turn(env, eng, sid):
    """The fixture's ASR run as a turn of session sid: its length is known (final_kv_len)."""
    h = eng.submit(env.request("asr", session_id=sid))
    eng.run_until_idle()
    return h.drain()[-1]


def test_prefix_reuse_equals_full_prefill(protocol_env):
    """Turn 2 of a session prefills only what its prompt adds to the cached tokens, and
    gives the same result as a fresh engine prefilling everything."""
    env = protocol_env
    b = _builder(env)
    codes = _codes(env)
    N = len(codes)
    ref = env.outputs["runs"]["asr"]
    turn2 = b.chat([Message("user", [Audio(codes[N // 2:N // 2 + max(1, N // 6)])])], spoken=True)
    ids = list(ref["final_sequence"]) + turn2.ids
    all_codes = torch.cat([codes, turn2.audio_codes])
    forced = [("text", 3), ("audio", 4), ("text", 2)]
    r2 = Request(ids, "spoken", all_codes, greedy=True, forced=forced)
    max_len = max(env.context, _bound(env, r2))
    eng = env.engine(max_len=max_len, trace=True)
    sid = eng.open_session()
    first = _asr_turn(env, eng, sid)
    assert first.final_sequence == tuple(ref["final_sequence"])
    h = eng.submit(Request(ids, "spoken", all_codes, session_id=sid, greedy=True, forced=forced))
    eng.run_until_idle()
    reused = h.drain()
    kv = ref["final_kv_len"]
    assert reused[-1].prefix_reused == first.kv_len == kv
    first_fwd = [t for t in eng.trace if t[0] == h.request_id][0]
    assert first_fwd[1:3] == (len(ids) - kv, kv)           # only the new tokens, after the cached ones

    fresh = env.engine(max_len=max_len)
    h2 = fresh.submit(r2)
    fresh.run_until_idle()
    full = h2.drain()
    assert full[-1].prefix_reused == 0
    assert _comparable(reused) == _comparable(full)


def test_lru_eviction_under_small_budget(protocol_env):
    env = protocol_env
    max_len = env.outputs["runs"]["asr"]["final_kv_len"]            # what an ASR turn needs
    cache = KVCache.for_config(env.model.cfg, 1, max_len, dtype=torch.float32)     # one static slot
    cache_bytes = cache.blocks_per_slot * KVCache.block_bytes(env.model.cfg, cache.block_size, torch.float32)
    eng = env.engine(num_slots=8, max_len=max_len, kv_budget_bytes=2 * cache_bytes + 1)
    assert eng.num_slots == 2
    s1, s2, s3 = (eng.open_session(f"s{i}") for i in (1, 2, 3))
    for s in (s1, s2):
        assert _asr_turn(env, eng, s).prefix_reused == 0
    assert _asr_turn(env, eng, s1).prefix_reused > 0      # s1 kept its KV
    assert _asr_turn(env, eng, s3).prefix_reused == 0     # takes s2's slot (least recent)
    assert eng.sessions.evictions == 1
    assert _asr_turn(env, eng, s2).prefix_reused == 0     # evicted: full prefill; evicts s1
    assert _asr_turn(env, eng, s3).prefix_reused > 0
    assert eng.sessions.evictions == 2
    eng.close_session(s3)
    assert len(eng.sessions.free) == 1
    with pytest.raises(EngineError, match="holds no slot"):
        env.engine(max_len=max_len, kv_budget_bytes=cache_bytes - 1)


def test_background_thread(protocol_env):
    env = protocol_env
    seen = []
    eng = env.engine()
    eng.on_event = seen.append
    eng.run_forever()
    try:
        h = eng.submit(env.request("asr"))
        done = h.result(timeout=120)
    finally:
        eng.stop()
    assert done.final_sequence == tuple(env.outputs["runs"]["asr"]["final_sequence"])
    assert seen[-1] == done


# ---------------------------------------------------------------------------- the 500-frame cap

class NeverEndingAudio(torch.nn.Module):
    """A stand-in with AudioLLM's engine-facing API whose audio head never picks
    end-of-audio; text: <audiogen_start> first, then <|endoftext|> (the repetition penalty
    on the now-seen <audiogen_start> tips it). No real compute: 500 frames in seconds."""

    def __init__(self, cfg, eos, start):
        super().__init__()
        self.cfg = cfg
        self.lm_head = torch.nn.Linear(1, 1)
        V = cfg.llm.vocab_size
        self.text = torch.zeros(V)
        self.text[start], self.text[eos] = 10.0, 9.6
        sizes = cfg.audio.codebook_sizes
        self.audio = [torch.linspace(1.0, 2.0, K + (1 if k == 0 else 0)) for k, K in enumerate(sizes)]
        self.audio[0][sizes[0]] = -100.0                   # end-of-audio never wins

    def new_cache(self, num_slots, max_len, **kw):
        return KVCache.for_config(self.cfg, num_slots, max_len, dtype=torch.float32, **kw)

    def embed(self, ids, codes=None, check=True):
        return torch.zeros(*ids.shape, 1)

    def embed_decode(self, ids, codes):
        return torch.zeros(*ids.shape, 1)

    def forward(self, x, positions, cache, slots, cache_pos, n_new=None, kv_len=None):
        return x

    @staticmethod
    def last_hidden(h, n_new=None):
        return h[:, -1]

    def logits(self, h):
        return self.text.expand(h.shape[0], -1)

    def audio_frame(self, h, choose):
        return torch.stack([choose(k, a.expand(h.shape[0], -1)) for k, a in enumerate(self.audio)], dim=1)


def test_500_frame_cap(protocol_env):
    env = protocol_env
    base = env.engine(num_slots=1)
    t, cap = base.tokens, base.protocol_config.spoken_audio.max_new          # the reference's 500
    fake = NeverEndingAudio(env.model.cfg, t.eos, t.audio.audiogen_start)
    prompt = _builder(env).encode("Hello")              # plain text: no special id the fake's logits favour
    P = len(prompt)
    final_len = P + 1 + cap + 1                          # <audiogen_start>, the pads, <|endoftext|>
    eng = Engine(fake, env.tokenizer, generation_config=env.gen_config,
                 config=EngineConfig(num_slots=1, max_len=final_len))
    h = eng.submit(Request(prompt, "spoken", greedy=True))
    eng.run_until_idle()
    events = h.drain()
    audio = _ends(events, "audio")
    assert len(audio) == 1 and len(audio[0].codes) == cap and audio[0].reason == "max_new"
    assert sum(isinstance(e, AudioFrame) for e in events) == cap
    done = events[-1]
    a = env.model.cfg.audio_tokens
    # the last frame's pad was never forwarded: the host wrote audiogen_end over it
    assert done.final_sequence[P:P + 2] == (a.audiogen_start, a.audio_pad)
    assert done.final_sequence[-3:] == (a.audio_pad, a.audiogen_end, t.eos)
    assert len(done.final_sequence) == final_len and done.reason == "eos"


def test_bf16_model(protocol_env):
    """The GPU dtype: bf16 weights, bf16 audio logits through the sampler, fp32 text logits.
    (Fixture 06 is fp32 only, so this checks the run, not the tokens.)"""
    import copy
    env = protocol_env
    model = copy.deepcopy(env.model).to(torch.bfloat16)
    # bf16 replies may differ from the fixture's and run out of room ("length" is accepted)
    max_len = env.context
    eng = Engine(model, env.tokenizer, generation_config=env.gen_config,
                 config=EngineConfig(num_slots=4, max_len=max_len))
    assert eng.cache.k.dtype == torch.bfloat16
    hs = [eng.submit(env.request(run, max_audio_frames=20)) for run in RUNS]
    hs.append(eng.submit(Request(env.inputs["prompt_ids"]["spoken"], "spoken", _codes(env),
                                 forced=[("text", 2), ("audio", 3)], seed=5)))
    # a running sequence forwards >= 1 token a step, so each ends within max_len steps
    eng.run_until_idle(max_steps=len(hs) * max_len)
    sizes = env.model.cfg.audio.codebook_sizes
    for h in hs:
        events = h.drain()
        assert isinstance(events[-1], Done) and events[-1].reason in ("eos", "forced", "max_new", "length")
        for e in _ends(events, "audio"):
            c = torch.tensor(e.codes)
            assert (c >= 0).all() and (c < torch.tensor(sizes)).all()


def test_forget_idle_sessions_keeps_busy_and_cached_ones(protocol_env):
    env = protocol_env
    eng = env.engine(num_slots=2)
    for i in range(6):
        eng.open_session(f"s{i}")
    assert _asr_turn(env, eng, "s1").prefix_reused == 0                 # s1 now holds a slot (its KV)
    eng.sessions.reserve("s2")                                         # s2 runs a turn
    assert eng.forget_idle_sessions(keep=3) == 3
    assert {s for s in ("s0", "s1", "s2", "s3", "s4", "s5") if eng.has_session(s)} == {"s1", "s2", "s5"}


@pytest.mark.parametrize("run", ["spoken", "text"])
def test_a_reply_continued_from_what_was_published_is_the_same_reply(protocol_env, run):
    """A greedy reply whose replica died after any of its published entries, continued on a
    fresh engine from the record (continuation.py: the decisions replayed on the prompt, one
    prefill of prompt and reply so far), decides exactly what it would have: the fixture's run,
    events and all. The record whole: the replay ends the reply, and the engine says Done at once."""
    import json

    from services.llm.continuation import decisions
    from services.llm.publisher import ChunkPolicy, TurnPublisher

    env = protocol_env
    eng = env.engine(num_slots=1)
    h = eng.submit(env.request(run))
    eng.run_until_idle()
    events = h.drain()
    items = []
    pub = TurnPublisher("t", "s", lambda *_: None, chunks=ChunkPolicy(2, 2.0, 8),
                        recorded=lambda _t, _e, item: items.append(json.loads(item)))
    for ev in events:
        pub.feed(ev)
    rules = eng.rules
    cuts = sorted({0, 1, len(items) // 3, len(items) // 2, len(items) - 1, len(items)})
    for cut in cuts:
        so_far = decisions(items[:cut], rules.eoa, rules.num_codebooks)
        fresh = env.engine(num_slots=1)
        h2 = fresh.submit(env.request(run, replay=so_far.decisions, seed=99))
        if h2.done is None:
            fresh.run_until_idle()
            check_run(env, run, h2.drain())
            continue
        # the replay ended the reply (the record whole, or its last decision out but not its end)
        assert cut >= len(items) - 1 and not fresh.has_work()       # nothing was forwarded
        done, want = h2.drain()[-1], events[-1]
        assert (done.final_sequence, done.host_writes, done.history, done.reply_codes) == \
            (want.final_sequence, want.host_writes, want.history, want.reply_codes)
