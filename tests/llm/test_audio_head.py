"""The incremental audio head (`frame`) against the reference-style full re-run
(`forward_full`), on a tiny random model (no fixtures needed)."""
from __future__ import annotations

import pytest
import torch

from services.llm.bench import synthetic_config
from services.llm.model import AudioLLM
from tests.llm.greedy import assert_greedy_frame, teacher_forced

SIZES = (16, 8, 8, 12, 8, 8, 8, 8)     # this test's own model: 8 codebooks of unequal sizes


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


def _tol(logits: torch.Tensor, bf16_ulps: int = 4) -> float:
    """How far two op orders of the same head may put its logits apart, relative to the logit
    scale: a few fp32 roundings (seen: <= 5e-7), or `bf16_ulps` bf16 roundings (2^-8 each)."""
    rel = 1e-5 if logits.dtype == torch.float32 else bf16_ulps * 2 ** -8
    return rel * max(1.0, logits.float().abs().max().item())


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
        sizes = model.cfg.audio.codebook_sizes
        x = torch.randn(B, E).to(model.lm_head.weight.dtype)
        codes = torch.stack([torch.randint(0, K, (B,)) for K in sizes], 1)
        codes[1, 0] = sizes[0]                              # the EOS row of table 0 is a valid input
        seen = {}

        def choose(k, logits):
            seen[k] = logits
            return codes[:, k]

        with torch.no_grad():
            got = head.frame(x, tables, choose)
            ref = _full_teacher_forced(head, x, tables, codes)
    finally:
        head.batched_reference_rounding = False
    assert torch.equal(got, codes)                          # the forced codes, handed back
    for k in range(head.depth):
        assert seen[k].dtype == x.dtype                     # audio logits are not upcast
        assert seen[k].shape == (B, sizes[k] + 1 if k == 0 else sizes[k])
        # same math, different matmul shapes: equal up to accumulation order
        torch.testing.assert_close(seen[k].float(), ref[k].float(), rtol=0, atol=_tol(ref[k]))


def test_fast_greedy_equals_full_greedy(model):
    """Greedy codes agree up to each row's first near-tie (`assert_greedy_frame`)."""
    head, tables = model.audio_head, model.model.audio_embed_layers
    torch.manual_seed(2)
    x = torch.randn(5, model.cfg.llm.hidden_size).to(model.lm_head.weight.dtype)
    with torch.no_grad():
        fast = head.frame(x, tables, lambda k, lg: lg.argmax(-1))
        t = torch.zeros_like(fast)
        for k in range(head.depth):
            lg = head.forward_full(x, t, tables)[k]
            t[:, k] = (lg if k == 0 else lg[:, :-1]).argmax(-1)
        logits = teacher_forced(head, x, tables, t)
    assert_greedy_frame(t, logits, lambda k, lg: _tol(lg), fast, what="fast vs full")
    assert (fast[:, 1:] < torch.tensor(model.cfg.audio.codebook_sizes[1:])).all()   # later codebooks never emit EOS


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
        along = teacher_forced(head, x, tables, single)
    for k in range(head.depth):
        one = torch.cat([logits[(i, k)] for i in range(4)])
        if torch.equal(batched[:, :k], single[:, :k]):      # same codes so far: same inputs
            torch.testing.assert_close(logits[("all", k)].float(), one.float(), rtol=0, atol=_tol(one, 1))
    # the codes: equal up to each row's first near-tie (batch shapes change only the rounding)
    assert_greedy_frame(single, along, lambda k, lg: _tol(lg, 1), batched, what="batched vs single")


def test_head_declares_no_unused_biases(fp32_model):
    keys = set(fp32_model.audio_head.state_dict())
    assert "transformer_layers.0.linear1.weight" in keys
    assert not [k for k in keys if "linear1.bias" in k or "linear2.bias" in k]
    assert {"transformer_layers.0.self_attention.in_proj_weight", "transformer_layers.0.self_attention.in_proj_bias",
            "transformer_layers.0.self_attention.out_proj.weight", "transformer_layers.0.self_attention.out_proj.bias",
            "transformer_layers.0.layernorm1.weight", "transformer_layers.0.layernorm2.weight",
            "headnorm.weight", f"heads.{len(SIZES) - 1}.weight", f"heads.{len(SIZES) - 1}.bias"} <= keys


def test_hidden_size_must_fit_128_wide_heads():
    cfg = synthetic_config(hidden_size=96, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=48, intermediate_size=64, vocab_size=128, codebook_sizes=SIZES)
    with pytest.raises(ValueError, match="multiple of 128"):
        AudioLLM(cfg)
