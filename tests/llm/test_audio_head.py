"""The incremental audio head (`frame`) against the reference-style full re-run
(`forward_full`), on a tiny random model (no fixtures needed)."""
from __future__ import annotations

import pytest
import torch

from services.llm.bench import synthetic_config
from services.llm.model import AudioLLM

SIZES = (16, 8, 8, 12, 8, 8, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fp32_model():
    cfg = synthetic_config(hidden_size=256, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=128, intermediate_size=64, vocab_size=128, codebook_sizes=SIZES,
                           audio_head_transformer_layers=3)
    torch.manual_seed(0)
    m = AudioLLM(cfg).eval()
    with torch.no_grad():                                   # non-zero biases, non-unit norms
        for name, p in m.audio_head.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.normal_(1, 0.2)
    return m


@pytest.fixture(params=["fp32", "bf16"])
def model(request, fp32_model):
    if request.param == "fp32":
        return fp32_model
    m = AudioLLM(fp32_model.cfg)
    m.load_state_dict(fp32_model.state_dict())
    return m.to(torch.bfloat16).eval()


def _full_teacher_forced(head, x, tables, codes):
    """The reference loop: re-run the whole head for codebook k with t = [codes < k, zeros]."""
    out, t = [], torch.zeros_like(codes)
    for k in range(head.depth):
        lg = head.forward_full(x, t, tables)[k]
        out.append(lg if k == 0 else lg[:, :-1])
        t[:, k] = codes[:, k]
    return out


@pytest.mark.parametrize("batched_rounding", [False, True])
def test_fast_frame_equals_full_rerun_teacher_forced(model, batched_rounding):
    head, tables = model.audio_head, model.model.audio_embed_layers
    head.batched_reference_rounding = batched_rounding
    try:
        torch.manual_seed(1)
        B, E = 3, model.cfg.llm.hidden_size
        x = torch.randn(B, E).to(model.lm_head.weight.dtype)
        codes = torch.stack([torch.randint(0, K, (B,)) for K in SIZES], 1)
        codes[1, 0] = SIZES[0]                              # the EOS row of table 0 is a valid input
        seen = {}

        def choose(k, logits):
            seen[k] = logits
            return codes[:, k]

        with torch.no_grad():
            got = head.frame(x, tables, choose)
            ref = _full_teacher_forced(head, x, tables, codes)
    finally:
        head.batched_reference_rounding = False
    assert torch.equal(got, codes)
    for k in range(head.depth):
        assert seen[k].dtype == x.dtype                     # audio logits are not upcast
        assert seen[k].shape == (B, SIZES[k] + 1 if k == 0 else SIZES[k])
        # same math, different matmul shapes: equal up to accumulation order
        tol = 1e-5 if x.dtype == torch.float32 else 2 ** -6 * seen[k].float().abs().max().item()
        torch.testing.assert_close(seen[k].float(), ref[k].float(), rtol=0, atol=tol)


def test_fast_greedy_equals_full_greedy(model):
    head, tables = model.audio_head, model.model.audio_embed_layers
    torch.manual_seed(2)
    x = torch.randn(5, model.cfg.llm.hidden_size).to(model.lm_head.weight.dtype)
    with torch.no_grad():
        fast = head.frame(x, tables, lambda k, lg: lg.argmax(-1))
        t = torch.zeros_like(fast)
        for k in range(head.depth):
            lg = head.forward_full(x, t, tables)[k]
            t[:, k] = (lg if k == 0 else lg[:, :-1]).argmax(-1)
    assert torch.equal(fast, t)
    assert (fast[:, 1:] < torch.tensor(SIZES[1:])).all()     # codebooks 1..7 never emit EOS


def test_frame_is_batch_invariant(model):
    """Default rounding: a row's logits do not depend on its batch mates."""
    head, tables = model.audio_head, model.model.audio_embed_layers
    torch.manual_seed(3)
    x = torch.randn(4, model.cfg.llm.hidden_size).to(model.lm_head.weight.dtype)
    logits = {}

    def rec(tag):
        def choose(k, lg):
            logits[(tag, k)] = lg
            return lg.argmax(-1)
        return choose

    with torch.no_grad():
        batched = head.frame(x, tables, rec("all"))
        single = torch.cat([head.frame(x[i:i + 1], tables, rec(i)) for i in range(4)])
    assert torch.equal(batched, single)
    for k in range(head.depth):
        one = torch.cat([logits[(i, k)] for i in range(4)])
        torch.testing.assert_close(logits[("all", k)].float(), one.float(), rtol=0,
                                   atol=1e-5 if x.dtype == torch.float32 else 1e-2)


def test_head_declares_no_unused_biases(fp32_model):
    keys = set(fp32_model.audio_head.state_dict())
    assert "transformer_layers.0.linear1.weight" in keys
    assert not [k for k in keys if "linear1.bias" in k or "linear2.bias" in k]
    assert {"transformer_layers.0.self_attention.in_proj_weight", "transformer_layers.0.self_attention.in_proj_bias",
            "transformer_layers.0.self_attention.out_proj.weight", "transformer_layers.0.self_attention.out_proj.bias",
            "transformer_layers.0.layernorm1.weight", "transformer_layers.0.layernorm2.weight",
            "headnorm.weight", "heads.7.weight", "heads.7.bias"} <= keys


def test_hidden_size_must_fit_128_wide_heads():
    cfg = synthetic_config(hidden_size=96, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=48, intermediate_size=64, vocab_size=128, codebook_sizes=SIZES)
    with pytest.raises(ValueError, match="multiple of 128"):
        AudioLLM(cfg)
