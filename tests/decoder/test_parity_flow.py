"""Parity of the decoder stage's modules with fixture 04 (fp32 and bf16), stage by stage.

Every stage starts from the reference's stored input of that stage, so a failure points at one
module: proj_decoder_out -> audio decoder; stored hidden -> Pre-Net; stored (x, mu, t) ->
estimator; stored mu + noise -> CFM solve.
"""
from __future__ import annotations

import torch

from services.decoder import cfm
from services.decoder.estimator import time_sinusoid


def _split(packed: torch.Tensor, lengths) -> list[torch.Tensor]:
    return list(torch.split(packed, [int(n) for n in lengths]))


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


@torch.inference_mode()
def test_parity_audio_decoder_single(stage):
    o = stage.out
    lens = torch.tensor([o["single.proj_decoder_out"].shape[0]])
    h, out_len = stage.decoder(o["single.proj_decoder_out"][None], lens)
    assert out_len.tolist() == o["single.output_length_before_dconv2"].tolist()
    stage.check(h[0], o["single.hidden_states_before_dconv2"], "single.hidden_states_before_dconv2")


# The fixture's segments alone: segment a is `single.*`, segment b is `solo_b.*` (README 04).
SOLO = {0: "single", 1: "solo_b"}


@torch.inference_mode()
def test_parity_audio_decoder_batch_per_segment(stage):
    """Segments a and b in one padded batch: each equals itself decoded alone; the longest (from the
    fixture's lengths) also equals the reference batch."""
    o, i = stage.out, stage.inputs
    lens = i["bridge_length_batch"]
    n_single = int(i["bridge_length_single"][0])
    assert lens.numel() == len(SOLO)
    assert torch.equal(i["codes_single"], i["codes_batch"][:n_single]), "single must be segment a"
    h, out_len = stage.decoder(_pad(_split(o["batch.proj_decoder_out"], lens)), lens)
    assert out_len.tolist() == o["batch.output_length_before_dconv2"].tolist()
    ref_batch = _split(o["batch.hidden_states_before_dconv2"], out_len)
    longest = max(out_len.tolist())
    name = "batch.hidden_states_before_dconv2"
    for j, t in enumerate(out_len.tolist()):
        solo = o[f"{SOLO[j]}.hidden_states_before_dconv2"]
        stage.check(h[j, :t], solo, name)
        assert bool((h[j, t:] == 0).all()), "frames beyond a segment's length must be zero"
        if t == longest:
            stage.check(h[j, :t], ref_batch[j], name)
        # A shorter segment is not compared with the reference batch: its batch GroupNorm couples
        # segments (max 0.93 in the public fp32 fixture), per-segment statistics are wanted, and
        # matching the solo decode within tolerance already rules out a coupling larger than it.


@torch.inference_mode()
def test_parity_prenet_from_stored_hidden(stage):
    o = stage.out
    for case, lens in (("single", o["single.output_length_before_dconv2"]),
                       ("batch", o["batch.output_length_before_dconv2"])):
        hs = _pad(_split(o[f"{case}.hidden_states_before_dconv2"], lens))
        mu = stage.prenet(hs, lens)
        stage.check(mu, o[f"{case}.prenet_mu"], f"{case}.prenet_mu_from_stored_hidden")


@torch.inference_mode()
def test_parity_estimator(stage):
    o = stage.out
    x, mu, t = o["estimator.x"], o["estimator.mu"], o["estimator.t"]
    assert t.dtype == stage.dtype
    est = stage.estimator
    mask = torch.ones(1, 1, x.shape[-1])                            # float32, as the reference's call
    # fp32 in both variants (only s = 1000 t is rounded to bf16), so the fp32 tolerance applies,
    # relative to the largest angle s (an ulp of the exp'd frequencies grows with it)
    stage.check(time_sinusoid(t, est.time_dim), o["estimator.time_sinusoid"], "estimator.time_sinusoid", "fp32",
                scale=1000 * abs(float(t)))
    stage.check(est.time_embedding(t), o["estimator.time_mlp_out"], "estimator.time_mlp_out")
    stage.check(est(x, mask, mu, t), o["estimator.out"], "estimator.out")
    stage.check(est(x, mask, torch.zeros_like(mu), t), o["estimator.out_zero_mu"], "estimator.out_zero_mu")


def test_parity_time_embedding_rounds_s_in_bf16(fixtures):
    """Correction 1: in bf16, s = 1000 t is rounded to bf16 (t = 0.30078125 -> s = 300, not 300.78)."""
    t = torch.tensor(0.30078125, dtype=torch.bfloat16)
    emb = time_sinusoid(t, 2 * fixtures.model_config.flow.in_channels)    # the U-Net's sinusoid width
    assert emb.dtype == torch.float32
    assert torch.allclose(emb[0, 0], torch.tensor(300.0).sin()), "s must be bf16(1000 t) = 300"


@torch.inference_mode()
def test_parity_cfm_single_steps(stage):
    """Each Euler step of the single case: t per call, x at the start of each step, v at step 0."""
    o = stage.out
    mu = o["single.prenet_mu"].transpose(1, 2)                      # (1, M, T)
    mask = torch.ones(1, 1, mu.shape[-1], dtype=torch.bool)
    ts, xs, v0 = [], [], {}

    def on_call(step, t, x, v_cond, v_uncond):
        ts.extend([t.clone(), t.clone()])                           # cond and uncond calls share t
        xs.append(x.clone())
        if step == 0:
            v0["cond"], v0["uncond"] = v_cond.clone(), v_uncond.clone()

    mel = cfm.solve(stage.estimator, mu, mask, o["single.noise"], stage.config.flow.diffusion_steps,
                    stage.config.flow.cfm, on_call=on_call)
    t_calls = torch.stack(ts)
    assert t_calls.dtype == stage.dtype
    want = o["single.cfm_t_per_call"]
    if stage.kind == "bf16":
        # Exact: t is accumulated by deterministic bf16 adds from bf16 casts of the fp32 cos schedule,
        # whose ulp-level CPU differences could change a bf16 value only at a rounding tie.
        assert torch.equal(t_calls, want), f"t per call {t_calls} != {want}"
    else:
        stage.check(t_calls, want, "single.cfm_t_per_call")                # fp32 cos: an ulp per CPU
    for k, x in enumerate(xs):
        stage.check(x, o[f"single.cfm_step{k}.x_in"], f"single.cfm_step{k}.x_in")
    stage.check(v0["cond"], o["single.cfm_step0.v_cond"], "single.cfm_step0.v_cond")
    stage.check(v0["uncond"], o["single.cfm_step0.v_uncond"], "single.cfm_step0.v_uncond")
    stage.check(mel.transpose(1, 2), o["single.flow_matching_mel"], "single.flow_matching_mel")


@torch.inference_mode()
def test_parity_cfm_batch_from_stored_mu(stage):
    """The CFM of a padded batch: every segment as the reference (the CFM itself does not couple)."""
    o = stage.out
    lens = o["batch.output_length_before_dconv2"]
    mu = o["batch.prenet_mu"].transpose(1, 2)
    mask = (torch.arange(mu.shape[-1])[None, :] < lens[:, None])[:, None]
    mel = cfm.solve(stage.estimator, mu, mask, o["batch.noise"], stage.config.flow.diffusion_steps,
                    stage.config.flow.cfm).transpose(1, 2)
    for b, n in enumerate(lens.tolist()):
        stage.check(mel[b, :n], o["batch.flow_matching_mel"][b, :n], "batch.flow_matching_mel")


@torch.inference_mode()
def test_cfm_t_schedule_bf16_matches_correction_4():
    """Known answer, independent of the fixture root: 10 steps (this test's choice) give the
    bf16 times of correction 4."""
    ts = cfm.t_span(10, "cosine", torch.bfloat16)
    t, dt, acc = ts[0], ts[1] - ts[0], []
    for k in range(1, 11):
        acc.append(float(t))
        t = t + dt
        if k < 10:
            dt = ts[k + 1] - t
    want = [0, .0123, .0488, .1089, .1914, .2930, .4121, .5469, .6914, .8438]
    assert max(abs(a - b) for a, b in zip(acc, want)) < 5e-4, acc
