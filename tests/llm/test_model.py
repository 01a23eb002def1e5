"""AudioLLM / KVCache behaviour on a tiny random model (no fixtures needed).

Numerical parity with the reference is in test_parity_llm.py; these tests pin the
slotted-cache semantics the engine relies on: chunking, slots, right padding, key names."""
from __future__ import annotations

import pytest
import torch

from services.common.checkpoint import CheckpointError
from services.llm.bench import synthetic_config
from services.llm.kv_cache import KVCache
from services.llm.model import AudioLLM, attention_math, attention_sdpa


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cfg():
    return synthetic_config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, intermediate_size=192, vocab_size=256,
                            codebook_sizes=(16, 8, 8, 8, 8, 8, 8, 8), audio_head_transformer_layers=2)


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return AudioLLM(cfg).eval()


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to fp32 accumulation order (other matmul shapes or kernels), relative to the
    tensor's scale above 1."""
    atol = rel * max(1.0, expected.float().abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def _run(model, embeds, positions, cache, slot, cache_pos, **kw):
    B = embeds.shape[0]
    return model(embeds, positions, cache, torch.full((B,), slot), torch.full((B,), cache_pos), **kw)


def test_state_dict_keys_are_the_checkpoint_keys(model, cfg):
    keys = set(model.state_dict())
    c = cfg.llm
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    sd = model.state_dict()
    assert sd["model.layers.0.self_attn.W_pack.weight"].shape == (q + 2 * kv, c.hidden_size)
    assert sd["model.layers.0.self_attn.W_pack.bias"].shape == (q + 2 * kv,)
    assert "model.layers.0.self_attn.o_proj.bias" not in keys
    for k, K in enumerate(cfg.audio.codebook_sizes):
        assert sd[f"model.audio_embed_layers.{k}.weight"].shape == (K + 1, c.hidden_size)
        assert sd[f"audio_head.heads.{k}.bias"].shape == (K + 1,)
    E, D = c.hidden_size, len(cfg.audio.codebook_sizes)
    assert sd["audio_head.transformer_layers.0.linear1.weight"].shape == (2 * E, D * E)
    assert sd["audio_head.transformer_layers.0.linear2.weight"].shape == (E, 2 * E * D)
    assert sd["audio_head.transformer_layers.0.self_attention.in_proj_weight"].shape == (3 * E, E)
    assert not [k for k in keys if k.endswith(("linear1.bias", "linear2.bias"))]
    assert all(k.startswith(("model.", "lm_head.", "audio_head.")) for k in keys)
    assert not list(model.buffers())                      # RoPE is computed, nothing to mis-cast


def test_load_skips_unused_biases_and_names_missing_keys(cfg, model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    E = cfg.llm.hidden_size
    sd["audio_head.transformer_layers.0.linear1.bias"] = torch.zeros(2 * E)
    sd["audio_tokenizer.audio_model.conv1.weight"] = torch.zeros(1)     # another stage's key: ignored
    fresh = AudioLLM(cfg)
    rep = fresh.load_tensors(sd, source="test")
    assert rep.skipped_unused == ["audio_head.transformer_layers.0.linear1.bias"]
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    del sd["audio_head.heads.3.weight"]
    with pytest.raises(CheckpointError, match=r"audio_head\.heads\.3\.weight"):
        AudioLLM(cfg).load_tensors(sd, source="test")


def test_embed_replaces_pads_in_batch_major_order(model, cfg):
    pad = cfg.audio_tokens.audio_pad
    ids = torch.tensor([[5, pad, pad, 7], [pad, 9, pad, 11]])            # any text ids around the pads
    sizes = cfg.audio.codebook_sizes
    codes = torch.randint(0, min(sizes), (4, len(sizes)))
    with torch.no_grad():
        x = model.embed(ids, codes)
        a = model.audio_embed(codes)
        text = model.model.embed_tokens(ids)
    order = [(0, 1), (0, 2), (1, 0), (1, 2)]                            # flattened batch-major
    for j, (b, t) in enumerate(order):
        assert torch.equal(x[b, t], a[j])
    for b, t in [(0, 0), (0, 3), (1, 1), (1, 3)]:
        assert torch.equal(x[b, t], text[b, t])
    with pytest.raises(ValueError, match=rf"4 audio_pad tokens \(id {pad}\) but 3 audio code frames"):
        model.embed(ids, codes[:3])
    with pytest.raises(ValueError, match="0 audio code frames"):
        model.embed(ids, None)


def test_audio_embed_sums_in_model_dtype_in_order(model):
    m = AudioLLM(model.cfg)
    m.load_state_dict(model.state_dict())
    m = m.to(torch.bfloat16)
    sizes = m.cfg.audio.codebook_sizes
    codes = torch.randint(0, min(sizes), (6, len(sizes)))
    tables = m.model.audio_embed_layers
    expect = tables[0](codes[:, 0])
    for k in range(1, len(sizes)):
        expect = expect + tables[k](codes[:, k])                          # rounded to bf16 after every add
    assert torch.equal(m.audio_embed(codes), expect)


def test_chunked_prefill_and_decode_match_one_shot(model, cfg):
    H = cfg.llm.hidden_size
    torch.manual_seed(1)
    e = torch.randn(1, 12, H)
    pos = torch.arange(1, 13)[None]
    with torch.no_grad():
        one = _run(model, e, pos, model.new_cache(2, 16), 0, 0)
        cache = model.new_cache(2, 16)
        parts = [_run(model, e[:, :5], pos[:, :5], cache, 1, 0), _run(model, e[:, 5:9], pos[:, 5:9], cache, 1, 5)]
        parts += [_run(model, e[:, i:i + 1], pos[:, i:i + 1], cache, 1, i, kv_len=12) for i in range(9, 12)]
    _close(torch.cat(parts, 1), one)


def test_batched_rows_in_any_slots_match_single_rows(model, cfg):
    """Two sequences of different lengths, right-padded into one batch with n_new, in slots
    3 and 1, equal each sequence run alone; pads leave the slots untouched."""
    H = cfg.llm.hidden_size
    torch.manual_seed(2)
    a, b = torch.randn(1, 9, H), torch.randn(1, 4, H)
    with torch.no_grad():
        ra = _run(model, a, torch.arange(1, 10)[None], model.new_cache(1, 12), 0, 0)
        rb = _run(model, b, torch.arange(1, 5)[None], model.new_cache(1, 12), 0, 0)
        cache = model.new_cache(4, 12)
        cache.k.fill_(7.0)
        cache.v.fill_(7.0)
        E = torch.zeros(2, 9, H)
        E[0], E[1, :4] = a[0], b[0]
        pos = torch.arange(1, 10).expand(2, 9)
        h = model(E, pos, cache, torch.tensor([3, 1]), torch.tensor([0, 0]), n_new=torch.tensor([9, 4]))
    _close(h[0], ra[0])
    _close(h[1, :4], rb[0])
    k1, v1 = cache.slot(1)
    assert (k1[:, :, 4:] == 7.0).all() and (v1[:, :, 4:] == 7.0).all()
    assert all((cache.slot(s)[0] == 7.0).all() for s in (0, 2))        # other slots never touched
    assert torch.equal(AudioLLM.last_hidden(h, torch.tensor([9, 4])), torch.stack([h[0, 8], h[1, 3]]))


def test_right_padded_chunk_may_overhang_the_cache_end(model, cfg):
    """A row with 2 valid tokens at cache_pos 8 in a 4-wide chunk of a 10-long cache: the
    pads fall past the end and are not written (they wrap onto old data, rewritten as is)."""
    H = cfg.llm.hidden_size
    cache = model.new_cache(1, 10)
    cache.k.fill_(3.0)
    with torch.no_grad():
        model(torch.randn(1, 4, H), torch.arange(9, 13)[None], cache, torch.tensor([0]), torch.tensor([8]),
              n_new=torch.tensor([2]))
    k0 = cache.slot(0)[0]
    assert (k0[:, :, :8] == 3.0).all()
    assert (k0[:, :, 8:] != 3.0).all()


def test_sdpa_matches_math_in_fp32():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 5, 32), torch.randn(2, 2, 11, 32), torch.randn(2, 2, 11, 32)
    mask = torch.arange(11)[None, None, :] <= (torch.tensor([6, 3])[:, None] + torch.arange(5))[:, :, None]
    _close(attention_sdpa(q, k, v, mask), attention_math(q, k, v, mask))


def test_math_attention_is_fp32_softmax_attention():
    """bf16 inputs: scores, softmax and P·V in fp32 over the repeated KV heads, one rounding at the end."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 4, 3, 16).bfloat16(), torch.randn(1, 2, 3, 16).bfloat16(),
               torch.randn(1, 2, 3, 16).bfloat16())
    mask = torch.ones(3, 3, dtype=torch.bool).tril()[None]
    kr, vr = k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1)
    s = (q.float() @ kr.transpose(-1, -2)) / 4.0
    ref = (s.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ vr).bfloat16()
    out = attention_math(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    # at most one bf16 rounding apart (ulp(m) <= 2^-7 m), whatever the fp32 kernels' order
    assert (out.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()


@pytest.mark.parametrize("paged", [False, True])
def test_kv_cache_write_read_layout(paged):
    """Token i of a slot lands at its block table[slot, i // bs], offset i % bs; reads gather
    the blocks back in order, so a slot reads the same whatever blocks back it."""
    kw = {"block_size": 2, "num_blocks": 20} if paged else {"block_size": 2}
    c = KVCache(num_layers=2, num_slots=3, max_len=6, num_kv_heads=2, head_dim=4, dtype=torch.float32, **kw)
    assert c.k.shape == (2, 1 + (20 if paged else 3 * 3), 2, 2, 4)
    assert c.nbytes() == 2 * c.k.numel() * 4
    if paged:                      # blocks in a scrambled order, and slot 1 shorter
        for slot, blocks in ((0, [7, 3, 12]), (1, [5]), (2, [19, 1, 8])):
            c.set_blocks(slot, blocks)
        assert c.table[1].tolist() == [5, 0, 0]
    k = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).view(2, 2, 3, 4)   # (B, kv_heads, T, d)
    c.write(1, torch.tensor([2, 0]), torch.tensor([[1, 2, 3], [0, 1, 2]]), k, -k)
    k2, v2 = c.slot(2)
    assert torch.equal(k2[1, :, 1:4], k[0]) and torch.equal(v2[1, :, 1:4], -k[0])
    assert torch.equal(c.slot(0)[0][1, :, 0:3], k[1])
    if paged:                      # where it went: slot 2's index 1 is block 19, offset 1
        assert torch.equal(c.k[1, 19, 1], k[0, :, 0]) and torch.equal(c.k[1, 1, 0], k[0, :, 1])
    rk, rv = c.read(1, torch.tensor([0]), 3)
    assert torch.equal(rk[0], k[1]) and rk.shape == (1, 2, 3, 4) and rk.is_contiguous()
    sk, _ = c.read(1, torch.tensor([0]), 3, contiguous=False)
    assert torch.equal(sk, rk)
    if paged:
        c.set_blocks(1, [4, 9])
    c.copy_slot(0, 1, 3)
    assert torch.equal(c.slot(1, 3)[0], c.slot(0, 3)[0])
    c.clear(torch.tensor([1]))
    assert not c.slot(1, 3 if paged else None)[0].any()


def test_paged_and_static_caches_give_the_same_hidden_states(model, cfg):
    """Two sequences prefilled and decoded in a paged cache whose blocks are scattered equal the
    same run in a static cache (the blocks only move data)."""
    H = cfg.llm.hidden_size
    torch.manual_seed(4)
    e = torch.randn(2, 9, H)
    pos = torch.arange(1, 10).expand(2, 9)
    outs = []
    for kw in ({}, {"block_size": 4, "num_blocks": 9}):
        cache = model.new_cache(2, 12, **kw)
        if kw:
            cache.set_blocks(0, [8, 2, 5])
            cache.set_blocks(1, [1, 9, 3])
        with torch.no_grad():
            h = [model(e[:, :6], pos[:, :6], cache, torch.tensor([1, 0]), torch.tensor([0, 0]))]
            h += [model(e[:, i:i + 1], pos[:, i:i + 1], cache, torch.tensor([1, 0]), torch.tensor([i, i]), kv_len=12)
                  for i in range(6, 9)]
        outs.append(torch.cat(h, 1))
    assert torch.equal(outs[0], outs[1])


def test_unsupported_config_is_named(cfg):
    import dataclasses
    bad = dataclasses.replace(cfg, raw={**cfg.raw, "sparse_attention_layers": [3]})
    with pytest.raises(ValueError, match="sparse_attention_layers"):
        AudioLLM(bad)
