"""Every tensor of a real Baichuan-Audio checkpoint, with its shape, as a function of the config.

`model_schema(cfg)` lists the sharded `model-*.safetensors` keys (reference-model.md §2.4,
§4-§9 key tables), including the documented unused keys (§12 item 17: audio-decoder dconv2 /
post_net, audio-head linear1/linear2 biases, codebook embed_avg / cluster_size, prenet
positional_embedding), because a real checkpoint carries them and a strict loader must
accept them. `hift_schema(cfg)` lists the vocoder's `hift.pt` keys (§10.7, legacy
weight_norm: `weight_g` / `weight_v`).

Kinds: PARAM is a trained parameter (stored bf16 in the model shards); BUFFER is one of the
reference's persistent fp32 sinusoid tables (`*.positional_embedding`), stored fp32.
The module tree and its construction arithmetic follow the reference classes named in the
comments; only shapes are described here, never values (except `sinusoid_table`, which is
what the BUFFER entries hold).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from services.common.checkpoint import PREFIX
from services.common.layers import sinusoids
from services.common.model_config import ConfigError, HiFTConfig, ModelConfig, check_llm_supported

PARAM = "param"
BUFFER = "buffer"


class TensorSpec(NamedTuple):
    shape: tuple[int, ...]
    kind: str  # PARAM or BUFFER


Schema = dict[str, TensorSpec]


def _p(*shape: int) -> TensorSpec:
    return TensorSpec(tuple(shape), PARAM)


def sinusoid_table(length: int, channels: int) -> torch.Tensor:
    """The reference `sinusoids(length, channels)` buffer (§4) as stored, in fp32: (length, channels).

    `services.common.layers.sinusoids` in fp32 arithmetic, which matches the stored tables bit
    for bit; an odd width is a config error here."""
    if channels % 2:
        raise ConfigError(f"sinusoid table needs an even channel count, got {channels}")
    return sinusoids(length, channels, torch.float32)


# ------------------------------------------------------------------ shared blocks
def _linear(s: Schema, name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    s[f"{name}.weight"] = _p(n_out, n_in)
    if bias:
        s[f"{name}.bias"] = _p(n_out)


def _norm(s: Schema, name: str, dim: int, bias: bool = True) -> None:
    s[f"{name}.weight"] = _p(dim)
    if bias:
        s[f"{name}.bias"] = _p(dim)


def _whisper_layer(s: Schema, p: str, d: int, ffn: int, rms: bool) -> None:
    """`OmniWhisperTransformerLayer`: k_proj has no bias; RMSNorm (prenet) has no bias."""
    _linear(s, p + "self_attn.k_proj", d, d, bias=False)
    _linear(s, p + "self_attn.v_proj", d, d)
    _linear(s, p + "self_attn.q_proj", d, d)
    _linear(s, p + "self_attn.out_proj", d, d)
    _norm(s, p + "self_attn_layer_norm", d, bias=not rms)
    _linear(s, p + "fc1", d, ffn)
    _linear(s, p + "fc2", ffn, d)
    _norm(s, p + "final_layer_norm", d, bias=not rms)


# ------------------------------------------------------------------ stages
def _encoder(s: Schema, cfg: ModelConfig) -> None:
    a, p = cfg.audio, PREFIX["encoder"]
    s[p + "positional_embedding"] = TensorSpec((a.max_source_positions, a.d_model), BUFFER)
    s[p + "conv1.weight"] = _p(a.d_model, a.num_mel_bins, a.kernel_size)
    s[p + "conv1.bias"] = _p(a.d_model)
    s[p + "conv2.weight"] = _p(a.d_model, a.d_model, a.kernel_size)
    s[p + "conv2.bias"] = _p(a.d_model)
    for i in range(a.encoder_layers):
        _whisper_layer(s, f"{p}layers.{i}.", a.d_model, a.encoder_ffn_dim, rms=False)
    _norm(s, p + "layer_norm", a.d_model)


def _bridge(s: Schema, cfg: ModelConfig) -> None:
    a, p = cfg.audio, PREFIX["bridge"]
    D = a.bridge_dim  # d_model * avg_pooler
    s[p + "gate_proj.weight"] = _p(D, a.d_model, a.avg_pooler)
    s[p + "up_proj.weight"] = _p(D, a.d_model, a.avg_pooler)
    s[p + "down_proj.weight"] = _p(D, D)
    _norm(s, p + "layer_norm", D)
    _linear(s, p + "proj_decoder", D, a.d_model)
    for i, K in enumerate(a.codebook_sizes):
        q = f"{p}vq_list.{i}.codebook."
        s[q + "cluster_size"] = _p(K)      # EMA state, unused at inference
        s[q + "embed_avg"] = _p(K, D)      # EMA state, unused at inference
        s[q + "embed"] = _p(K, D)


def _audio_decoder(s: Schema, cfg: ModelConfig) -> None:
    a, v, p = cfg.audio, cfg.legacy_vocoder, PREFIX["audio_decoder"]
    s[p + "positional_embedding"] = TensorSpec((a.decoder_max_positions, a.d_model), BUFFER)
    # ConvTranspose1d weights are (in, out, k).
    s[p + "dconv1.conv.weight"] = _p(a.d_model, a.d_model, a.decoder_kernel_size)
    s[p + "dconv1.conv.bias"] = _p(a.d_model)
    _norm(s, p + "dconv1.norm", a.d_model)
    for i in range(a.decoder_layers):
        _whisper_layer(s, f"{p}layers.{i}.", a.d_model, a.decoder_ffn_dim, rms=False)
    _norm(s, p + "layer_norm", a.d_model)
    # Unused by the flow path (§8 step 4), present in the checkpoint.
    s[p + "dconv2.conv.weight"] = _p(a.d_model, v.num_mel_bins, a.decoder_kernel_size)
    s[p + "dconv2.conv.bias"] = _p(v.num_mel_bins)
    _norm(s, p + "dconv2.norm", v.num_mel_bins)
    # MelSpecRefineNet: [Conv1d k5, GroupNorm, Mish] per channels[:-1], then a 1x1 projector.
    c_in, idx = v.num_mel_bins, 0
    for c_out in v.channels[:-1]:
        s[f"{p}post_net.layers.{idx}.weight"] = _p(c_out, c_in, 5)
        s[f"{p}post_net.layers.{idx}.bias"] = _p(c_out)
        _norm(s, f"{p}post_net.layers.{idx + 1}", c_out)
        c_in, idx = c_out, idx + 3
    s[f"{p}post_net.layers.{idx}.weight"] = _p(v.num_mel_bins, c_in, 1)
    s[f"{p}post_net.layers.{idx}.bias"] = _p(v.num_mel_bins)


def _prenet(s: Schema, cfg: ModelConfig) -> None:
    f, p = cfg.flow, PREFIX["flow"] + "prenet."
    d = f.prenet_d_model
    s[p + "positional_embedding"] = TensorSpec((f.prenet_max_source_positions, d), BUFFER)  # never read
    _linear(s, p + "in_mlp.0", f.prenet_in_dim, 4 * d)   # width 4*d_model (Correction 2)
    _linear(s, p + "in_mlp.2", 4 * d, d)
    for i in range(f.prenet_nlayers):
        _whisper_layer(s, f"{p}transformer_layers.{i}.", d, f.prenet_ffn_dim, rms=True)
    _norm(s, p + "final_norm", d, bias=False)
    _linear(s, p + "out_proj", d, f.prenet_out_dim, bias=False)


def _causal_block(s: Schema, p: str, dim: int, dim_out: int) -> None:
    """CausalBlock1D: [CausalConv1d k3, Transpose, LayerNorm, Transpose, Mish]."""
    s[p + "block.0.weight"] = _p(dim_out, dim, 3)
    s[p + "block.0.bias"] = _p(dim_out)
    _norm(s, p + "block.2", dim_out)


def _resnet(s: Schema, p: str, dim: int, dim_out: int, t_dim: int) -> None:
    """CausalResnetBlock1D: time MLP [Mish, Linear], two causal blocks, 1x1 residual conv."""
    _linear(s, p + "mlp.1", t_dim, dim_out)
    _causal_block(s, p + "block1.", dim, dim_out)
    _causal_block(s, p + "block2.", dim_out, dim_out)
    s[p + "res_conv.weight"] = _p(dim_out, dim, 1)
    s[p + "res_conv.bias"] = _p(dim_out)


def _transformer_block(s: Schema, p: str, dim: int, heads: int, head_dim: int) -> None:
    """diffusers BasicTransformerBlock (self-attention only, GELU feed-forward, mult 4)."""
    inner = heads * head_dim
    _norm(s, p + "norm1", dim)
    for n in ("to_q", "to_k", "to_v"):
        _linear(s, f"{p}attn1.{n}", dim, inner, bias=False)
    _linear(s, p + "attn1.to_out.0", inner, dim)
    _norm(s, p + "norm3", dim)
    _linear(s, p + "ff.net.0.proj", dim, 4 * dim)
    _linear(s, p + "ff.net.2", 4 * dim, dim)


def _estimator(s: Schema, cfg: ModelConfig) -> None:
    """ConditionalDecoder (causal U-Net), built as OmniAudioFlowMatchingDecoder does:
    in_channels = 2 * mel + spk_emb_dim, out_channels = mel."""
    f, p = cfg.flow, PREFIX["flow"] + "conditional_decoder."
    ch = f.channels
    c_in = 2 * f.in_channels + f.spk_emb_dim
    t_dim = 4 * ch[0]
    _linear(s, p + "time_mlp.linear_1", c_in, t_dim)   # sinusoid width = c_in
    _linear(s, p + "time_mlp.linear_2", t_dim, t_dim)

    def blocks(q: str, dim: int) -> None:
        for j in range(f.n_blocks):
            _transformer_block(s, f"{q}{j}.", dim, f.num_heads, f.attention_head_dim)

    out = c_in
    for i, c in enumerate(ch):
        q = f"{p}down_blocks.{i}."
        _resnet(s, q + "0.", out, c, t_dim)
        out = c
        blocks(q + "1.", c)
        if i < len(ch) - 1:  # Downsample1D: Conv1d(k3, s2, p1) under .conv
            s[q + "2.conv.weight"] = _p(c, c, 3)
            s[q + "2.conv.bias"] = _p(c)
        else:                # CausalConv1d(k3)
            s[q + "2.weight"] = _p(c, c, 3)
            s[q + "2.bias"] = _p(c)
    for i in range(f.num_mid_blocks):
        q = f"{p}mid_blocks.{i}."
        _resnet(s, q + "0.", ch[-1], ch[-1], t_dim)
        blocks(q + "1.", ch[-1])
    up = tuple(ch[::-1]) + (ch[0],)
    for i in range(len(up) - 1):
        q, c = f"{p}up_blocks.{i}.", up[i + 1]
        _resnet(s, q + "0.", 2 * up[i], c, t_dim)  # input is [x ; skip]
        blocks(q + "1.", c)
        if i < len(up) - 2:  # Upsample1D: ConvTranspose1d(k4, s2, p1), weight (in, out, k)
            s[q + "2.conv.weight"] = _p(c, c, 4)
            s[q + "2.conv.bias"] = _p(c)
        else:
            s[q + "2.weight"] = _p(c, c, 3)
            s[q + "2.bias"] = _p(c)
    _causal_block(s, p + "final_block.", up[-1], up[-1])
    s[p + "final_proj.weight"] = _p(f.in_channels, up[-1], 1)
    s[p + "final_proj.bias"] = _p(f.in_channels)


def _llm(s: Schema, cfg: ModelConfig) -> None:
    m, p = cfg.llm, PREFIX["llm"]
    check_llm_supported(cfg.raw)
    q_dim, kv_dim = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    s[p + "embed_tokens.weight"] = _p(m.vocab_size, m.hidden_size)
    for i in range(m.num_hidden_layers):
        q = f"{p}layers.{i}."
        _linear(s, q + "self_attn.W_pack", m.hidden_size, q_dim + 2 * kv_dim, bias=True)
        _linear(s, q + "self_attn.o_proj", q_dim, m.hidden_size, bias=False)
        _linear(s, q + "mlp.gate_proj", m.hidden_size, m.intermediate_size, bias=False)
        _linear(s, q + "mlp.down_proj", m.intermediate_size, m.hidden_size, bias=False)
        _linear(s, q + "mlp.up_proj", m.hidden_size, m.intermediate_size, bias=False)
        _norm(s, q + "input_layernorm", m.hidden_size, bias=False)
        _norm(s, q + "post_attention_layernorm", m.hidden_size, bias=False)
    _norm(s, p + "norm", m.hidden_size, bias=False)
    for k, K in enumerate(cfg.audio.codebook_sizes):  # row K = the end-of-audio code
        s[f"{p}audio_embed_layers.{k}.weight"] = _p(K + 1, m.hidden_size)


def _audio_head(s: Schema, cfg: ModelConfig) -> None:
    E, p = cfg.llm.hidden_size, PREFIX["audio_head"]
    depth = cfg.audio.num_codebooks
    if E % 128:
        # CasualDepthTransformerLayer uses E // 128 attention heads and asserts this.
        raise ConfigError(f"config.json: hidden_size {E} must be a multiple of 128 (audio head uses heads of 128)")
    for i in range(cfg.audio.audio_head_transformer_layers):
        q = f"{p}transformer_layers.{i}."
        s[q + "self_attention.in_proj_weight"] = _p(3 * E, E)
        s[q + "self_attention.in_proj_bias"] = _p(3 * E)
        _linear(s, q + "self_attention.out_proj", E, E)
        _norm(s, q + "layernorm1", E, bias=False)
        _norm(s, q + "layernorm2", E, bias=False)
        _linear(s, q + "linear1", depth * E, 2 * E)       # position-specific FFN; bias unused
        _linear(s, q + "linear2", depth * 2 * E, E)       # bias unused
    _norm(s, p + "headnorm", E, bias=False)
    for k, K in enumerate(cfg.audio.codebook_sizes):
        _linear(s, f"{p}heads.{k}", E, K + 1)


def model_schema(cfg: ModelConfig) -> Schema:
    """Every key of the model shards -> (shape, kind), in the reference module order
    (model, audio_tokenizer, audio_head, lm_head)."""
    s: Schema = {}
    _llm(s, cfg)
    _encoder(s, cfg)
    _bridge(s, cfg)
    _audio_decoder(s, cfg)
    _prenet(s, cfg)
    _estimator(s, cfg)
    _audio_head(s, cfg)
    s[PREFIX["lm_head"] + "weight"] = _p(cfg.llm.vocab_size, cfg.llm.hidden_size)
    return s


def sinusoid_buffers(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The fp32 values of every BUFFER entry of `model_schema(cfg)`."""
    return {k: sinusoid_table(*spec.shape) for k, spec in model_schema(cfg).items() if spec.kind == BUFFER}


# ------------------------------------------------------------------ HiFT vocoder
def _wn(s: Schema, name: str, shape: tuple[int, ...], transposed: bool = False) -> None:
    """A legacy torch.nn.utils.weight_norm conv (dim=0) with bias: weight_g keeps dim 0 of the
    weight, which is the *in* channels of a ConvTranspose1d (weight (in, out, k))."""
    s[f"{name}.weight_g"] = _p(shape[0], *([1] * (len(shape) - 1)))
    s[f"{name}.weight_v"] = _p(*shape)
    s[f"{name}.bias"] = _p(shape[1] if transposed else shape[0])


def _hift_resblock(s: Schema, p: str, ch: int, k: int, dilations: tuple[int, ...]) -> None:
    for j in range(len(dilations)):
        _wn(s, f"{p}convs1.{j}", (ch, ch, k))
        _wn(s, f"{p}convs2.{j}", (ch, ch, k))
    for j in range(len(dilations)):
        s[f"{p}activations1.{j}.alpha"] = _p(ch)
        s[f"{p}activations2.{j}.alpha"] = _p(ch)


def hift_schema(cfg: HiFTConfig) -> Schema:
    """Every key of `hift.pt` (HiFTGenerator state dict, no prefix) -> (shape, kind)."""
    s: Schema = {}
    s["m_source.l_linear.weight"] = _p(1, cfg.nb_harmonics + 1)
    s["m_source.l_linear.bias"] = _p(1)
    base, n_fft = cfg.base_channels, cfg.istft_n_fft
    _wn(s, "conv_pre", (base, cfg.in_channels, 7))
    for i, k in enumerate(cfg.upsample_kernel_sizes):
        _wn(s, f"ups.{i}", (base // 2 ** i, base // 2 ** (i + 1), k), transposed=True)
    # Source downsamplers run at the cumulative rates of the remaining upsampling stages.
    rates = (1,) + tuple(cfg.upsample_rates[::-1][:-1])
    cum = [math.prod(rates[: j + 1]) for j in range(len(rates))][::-1]
    for i, (u, k, d) in enumerate(zip(cum, cfg.source_resblock_kernel_sizes,
                                      cfg.source_resblock_dilation_sizes)):
        ch = base // 2 ** (i + 1)
        s[f"source_downs.{i}.weight"] = _p(ch, n_fft + 2, 1 if u == 1 else 2 * u)  # no weight norm
        s[f"source_downs.{i}.bias"] = _p(ch)
        _hift_resblock(s, f"source_resblocks.{i}.", ch, k, d)
    n_k = len(cfg.resblock_kernel_sizes)
    for i in range(len(cfg.upsample_rates)):
        ch = base // 2 ** (i + 1)
        for j, (k, d) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)):
            _hift_resblock(s, f"resblocks.{i * n_k + j}.", ch, k, d)
    _wn(s, "conv_post", (n_fft + 2, base // 2 ** len(cfg.upsample_rates), 7))
    c, f_in = cfg.f0_cond_channels, cfg.in_channels
    for j in range(5):  # 5 x [weight-normed Conv1d k3, ELU]
        _wn(s, f"f0_predictor.condnet.{2 * j}", (c, f_in if j == 0 else c, 3))
    _linear(s, "f0_predictor.classifier", c, 1)
    return s
