"""Typed view of a Baichuan-Audio `config.json` (reference-model.md §2.2).

Every dimension and token id the stages use comes from here; nothing is a constant.
Unknown fields are ignored (the real config carries training-only and vision blocks).
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that cannot describe a Baichuan-Audio model."""


def _req(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"config.json: field {where}.{key} is missing")
    return d[key]


def _section(cls: type, d: dict, where: str, **given: Any) -> Any:
    """`cls` from its config.json section `d`: a field without a default is required, one with a
    default may be absent, JSON lists become tuples; `given` fields are computed by the caller."""
    kw = dict(given)
    for f in fields(cls):
        if f.name in kw:
            continue
        if f.name in d:
            v = d[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) else v
        elif f.default is MISSING and f.default_factory is MISSING:
            _req(d, f.name, where)      # raises, naming the key
    return cls(**kw)


@dataclass(frozen=True)
class LLMConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 8192

    @classmethod
    def from_dict(cls, d: dict) -> "LLMConfig":
        heads, hidden = _req(d, "num_attention_heads", ""), _req(d, "hidden_size", "")
        return _section(cls, d, "", num_key_value_heads=d.get("num_key_value_heads", heads),
                        head_dim=d.get("head_dim") or hidden // heads)


@dataclass(frozen=True)
class AudioTokenIds:
    """The audio special-token ids of `audio_config` (§2.3); never Omni's."""

    audio_start: int
    audio_end: int
    audio_pad: int
    audio_delim: int
    audiotext_start: int
    audiotext_end: int
    audiotext_pad: int
    audiogen_start: int
    audiogen_end: int

    @classmethod
    def from_audio_config(cls, a: dict) -> "AudioTokenIds":
        names = [f.name for f in cls.__dataclass_fields__.values()]  # type: ignore[attr-defined]
        return cls(**{n: _req(a, f"{n}_token_id", "audio_config") for n in names})


@dataclass(frozen=True)
class AudioConfig:
    """`audio_config`: Whisper-style encoder, VQ bridge, RVQ, audio decoder, audio head."""

    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_layers: int
    decoder_attention_heads: int
    decoder_ffn_dim: int
    decoder_kernel_size: int
    avg_pooler: int
    num_mel_bins: int
    n_fft: int
    hop_length: int
    sampling_rate: int
    max_audio_seconds: int
    audio_head_transformer_layers: int
    codebook_sizes: tuple[int, ...]
    split_overlap: float = 0.0
    kernel_size: int = 3
    stride_size: int = 2
    decoder_stride_size: int = 2

    @property
    def max_source_positions(self) -> int:
        # encoder positional table rows: 30 s of 100 Hz mel after the stride-2 conv
        return self.max_audio_seconds * self.sampling_rate // self.hop_length // self.stride_size

    @property
    def decoder_max_positions(self) -> int:
        return self.max_audio_seconds * self.sampling_rate // self.hop_length

    @property
    def bridge_dim(self) -> int:
        return self.d_model * self.avg_pooler

    @property
    def num_codebooks(self) -> int:
        return len(self.codebook_sizes)

    @classmethod
    def from_dict(cls, a: dict) -> "AudioConfig":
        vq = _req(a, "vq_config", "audio_config")
        return _section(cls, a, "audio_config",
                        codebook_sizes=tuple(_req(vq, "codebook_sizes", "audio_config.vq_config")))


@dataclass(frozen=True)
class CFMParams:
    sigma_min: float = 1e-6
    solver: str = "euler"
    t_scheduler: str = "cosine"
    inference_cfg_rate: float = 0.7


@dataclass(frozen=True)
class FlowConfig:
    """`flow_matching_config`: Pre-Net + causal U-Net CFM estimator (§9)."""

    prenet_in_dim: int
    prenet_out_dim: int
    prenet_d_model: int
    prenet_attention_heads: int
    prenet_ffn_dim: int
    prenet_nlayers: int
    in_channels: int
    channels: tuple[int, ...]
    attention_head_dim: int
    n_blocks: int
    num_mid_blocks: int
    num_heads: int
    prenet_max_source_positions: int = 5000
    prenet_target_mel_length_scale_ratio: float = 1.0
    spk_emb_dim: int = 0
    diffusion_steps: int = 10
    sampling_rate: int = 24000
    hop_length: int = 480
    cfm: CFMParams = field(default_factory=CFMParams)

    @classmethod
    def from_dict(cls, f: dict) -> "FlowConfig":
        w = "flow_matching_config"
        return _section(cls, f, w, cfm=_section(CFMParams, f.get("cfm_params", {}), f"{w}.cfm_params"))


@dataclass(frozen=True)
class LegacyVocoderConfig:
    """`vocoder_config`: only the shapes of the unused dconv2/post_net weights depend on it."""

    num_mel_bins: int
    channels: tuple[int, ...]

    @classmethod
    def from_dict(cls, v: dict) -> "LegacyVocoderConfig":
        return _section(cls, v, "vocoder_config")


@dataclass(frozen=True)
class ModelConfig:
    llm: LLMConfig
    audio: AudioConfig
    flow: FlowConfig
    legacy_vocoder: LegacyVocoderConfig
    audio_tokens: AudioTokenIds
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        a = _req(d, "audio_config", "")
        return cls(
            llm=LLMConfig.from_dict(d),
            audio=AudioConfig.from_dict(a),
            flow=FlowConfig.from_dict(_req(d, "flow_matching_config", "")),
            legacy_vocoder=LegacyVocoderConfig.from_dict(_req(d, "vocoder_config", "")),
            audio_tokens=AudioTokenIds.from_audio_config(a),
            raw=d,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: no config.json there") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        return cls.from_dict(d)


@dataclass(frozen=True)
class HiFTConfig:
    """HiFT generator (CosyVoice2 24 kHz, §10.1). Defaults are the real vocoder's values;
    a checkpoint may carry a `hift_config.json` with the constructor kwargs (fixture 05 layout)."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_cond_channels: int = 512

    @property
    def hop_samples(self) -> int:
        n = self.istft_hop_len
        for r in self.upsample_rates:
            n *= r
        return n

    @classmethod
    def from_dict(cls, d: dict) -> "HiFTConfig":
        g = d.get("HiFTGenerator", d)
        f0 = d.get("ConvRNNF0Predictor", {})
        ist = g.get("istft_params", {})
        kw: dict[str, Any] = {}
        for name in ("in_channels", "base_channels", "nb_harmonics", "sampling_rate", "nsf_alpha",
                     "nsf_sigma", "nsf_voiced_threshold", "lrelu_slope", "audio_limit"):
            if name in g:
                kw[name] = g[name]
        for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes",
                     "source_resblock_kernel_sizes"):
            if name in g:
                kw[name] = tuple(g[name])
        for name in ("resblock_dilation_sizes", "source_resblock_dilation_sizes"):
            if name in g:
                kw[name] = tuple(tuple(x) for x in g[name])
        if "n_fft" in ist:
            kw["istft_n_fft"] = ist["n_fft"]
        if "hop_len" in ist:
            kw["istft_hop_len"] = ist["hop_len"]
        if "cond_channels" in f0:
            kw["f0_cond_channels"] = f0["cond_channels"]
        return cls(**kw)

    def to_dict(self) -> dict:
        return {
            "HiFTGenerator": {
                "in_channels": self.in_channels, "base_channels": self.base_channels,
                "nb_harmonics": self.nb_harmonics, "sampling_rate": self.sampling_rate,
                "nsf_alpha": self.nsf_alpha, "nsf_sigma": self.nsf_sigma,
                "nsf_voiced_threshold": self.nsf_voiced_threshold,
                "upsample_rates": list(self.upsample_rates),
                "upsample_kernel_sizes": list(self.upsample_kernel_sizes),
                "istft_params": {"n_fft": self.istft_n_fft, "hop_len": self.istft_hop_len},
                "resblock_kernel_sizes": list(self.resblock_kernel_sizes),
                "resblock_dilation_sizes": [list(x) for x in self.resblock_dilation_sizes],
                "source_resblock_kernel_sizes": list(self.source_resblock_kernel_sizes),
                "source_resblock_dilation_sizes": [list(x) for x in self.source_resblock_dilation_sizes],
                "lrelu_slope": self.lrelu_slope, "audio_limit": self.audio_limit,
            },
            "ConvRNNF0Predictor": {"num_class": 1, "in_channels": self.in_channels,
                                   "cond_channels": self.f0_cond_channels},
        }


def check_llm_supported(raw: dict) -> None:
    """Raise ConfigError naming every config.json LLM setting this implementation does not run
    (the reference's variants that Baichuan-Audio does not use)."""
    bad = []
    if str(raw.get("position_embedding_type", "rope")).lower() != "rope":
        bad.append(f"position_embedding_type={raw['position_embedding_type']!r} (only rope)")
    if raw.get("sparse_attention_layers"):
        bad.append(f"sparse_attention_layers={raw['sparse_attention_layers']} (only dense layers)")
    if raw.get("use_norm_head", False):
        bad.append("use_norm_head=true (only a plain lm_head)")
    if raw.get("tie_word_embeddings", False):
        bad.append("tie_word_embeddings=true (lm_head.weight must be its own tensor)")
    if raw.get("attention_qkv_pack", True) is not True or raw.get("attention_qkv_bias", True) is not True:
        bad.append("attention_qkv_pack/attention_qkv_bias false (only a packed W_pack with bias)")
    if "rotary_emb_base" in raw:
        bad.append("rotary_emb_base is set (the reference would use it instead of rope_theta)")
    if bad:
        raise ConfigError("config.json: unsupported LLM settings: " + "; ".join(bad))
