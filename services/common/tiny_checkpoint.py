"""`make-tiny-checkpoint`: a tiny random Baichuan-Audio checkpoint in exactly the real
Hugging Face layout, for the demo, the end-to-end tests and the benchmarks.

Files written (reference-model.md §2.1): config.json, generation_config.json, the tokenizer
(tokenizer.json, tokenizer_config.json, special_tokens_map.json), `model-0000k-of-0000n.safetensors`
shards with `model.safetensors.index.json` (every key of `model_schema`: parameters bf16, the
sinusoid buffers fp32), and the vocoder as `hift.pt` (a plain fp32 state dict) + `hift_config.json`.

Weights are random (the fixtures' recipe: matrices N(0,1)/sqrt(fan_in), biases 0.1 N(0,1),
norm weights 1 + 0.2 N(0,1), embeddings and codebooks N(0,1), Snake alpha and weight-norm g
U(0.5, 1.5)), drawn from one generator per key seeded from (seed, key), so the files are a
pure function of the seed. Then a few weights are shaped so that a generated reply ends
within seconds (see `shape_protocol_weights`).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.common.checkpoint import HIFT_CONFIG, INDEX_FILE, PREFIX
from services.common.checkpoint_schema import BUFFER, Schema, hift_schema, model_schema, sinusoid_table
from services.common.model_config import HiFTConfig, ModelConfig
from services.common.text_tokenizer import (
    ALL_SPECIALS, ENDOFTEXT, build_tiny_tokenizer, special_token_layout,
)

# Baichuan-Audio's ids (§2.3) shifted into the tiny vocab: <|endoftext|> 151643 -> 600, so the
# special block sits inside the BPE ids (600..636 of 768) as in the real tokenizer.
TINY_VOCAB = 768
TINY_ID_OFFSET = 151643 - 600
_REAL_AUDIO_IDS = {
    "audio_start": 151657, "audio_end": 151658, "audio_pad": 151659, "audio_delim": 151674,
    "audiotext_start": 151675, "audiotext_end": 151676, "audiotext_pad": 151677,
    "audiogen_start": 151678, "audiogen_end": 151679,
}

TINY_HIFT = HiFTConfig(base_channels=32, f0_cond_channels=32)


def reference_cfm_params() -> dict:
    """The published `flow_matching_config.cfm_params` (reference-model.md §2.2)."""
    return {"sigma_min": 1e-6, "solver": "euler", "t_scheduler": "cosine",
            "training_cfg_rate": 0.2, "inference_cfg_rate": 0.7, "reg_loss_type": "l1"}


def legacy_vocoder_config(width: int) -> dict:
    """The published `vocoder_config` (§2.2) with `width` channels in each of its 5 stages (256 in
    the real model). Only num_mel_bins and channels matter: they shape the unused post_net keys."""
    return {"enable": True, "enable_multi_scale": True, "max_audio_seconds": 30, "sampling_rate": 16000,
            "hop_length": 256, "split_overlap": 0.0, "n_fft": 1024, "num_mel_bins": 80,
            "channels": [width] * 5}


def tiny_config_dict(seed: int = 0) -> dict:
    """A tiny config.json in the real format. Dimensions are small but keep every structural
    constraint of the reference (hidden % 128 == 0 for the audio head, prenet_in_dim ==
    d_model, even sinusoid widths, 8 codebooks). `seed` is recorded for provenance only."""
    audio_ids = {f"{k}_token_id": v - TINY_ID_OFFSET for k, v in _REAL_AUDIO_IDS.items()}
    return {
        "architectures": ["OmniForCausalLM"],
        "model_type": "omni",
        "omni_tokenizer_type": "auto",
        "attention_qkv_bias": True,
        "attention_qkv_pack": True,
        "hidden_act": "silu",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": TINY_VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "position_embedding_type": "rope",
        "initializer_range": 0.02,
        "sparse_attention_heads": None,
        "sparse_attention_layers": [],
        "tie_word_embeddings": False,
        "use_norm_head": False,
        "use_cache": False,
        "torch_dtype": "bfloat16",
        # The published values (Baichuan legacy ids); generation uses generation_config.json.
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "multimodal": ["audio", "audiogen"],
        "multimodal_special_token_list": sorted(audio_ids.values()),
        "audio_config": {
            "enable": True,
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "decoder_layers": 2,
            "decoder_attention_heads": 4,
            "decoder_ffn_dim": 128,
            "decoder_kernel_size": 3,
            "decoder_stride_size": 2,
            "kernel_size": 3,
            "stride_size": 2,
            "avg_pooler": 4,
            "num_mel_bins": 128,
            "n_fft": 400,
            "hop_length": 160,
            "sampling_rate": 16000,
            "max_audio_seconds": 30,
            "split_overlap": 0.0,
            "audio_head_transformer_layers": 3,
            "vq_config": {"enable": True, "codebook_sizes": [128, 64, 32, 32, 32, 32, 32, 32]},
            **audio_ids,
        },
        "flow_matching_config": {
            "enable": True,
            "use_hires_mel": True,
            "sampling_rate": 24000,
            "hop_length": 480,
            "max_audio_seconds": 30,
            "split_overlap": 0.1,
            "use_hidden_states_before_dconv2": True,
            "prenet_in_dim": 64,
            "prenet_out_dim": 80,
            "prenet_d_model": 32,
            "prenet_attention_heads": 2,
            "prenet_ffn_dim": 64,
            "prenet_nlayers": 2,
            "prenet_activation_function": "gelu",
            "prenet_max_source_positions": 5000,
            "prenet_target_mel_length_scale_ratio": 1.0,
            "prenet_loss_weight": 1.0,
            "unet_use_omni_attn": False,
            "loss_weight": 1.0,
            "in_channels": 80,
            "spk_emb_dim": 0,
            "diffusion_steps": 10,
            "channels": [32],
            "dropout": 0.0,
            "attention_head_dim": 16,
            "n_blocks": 2,
            "num_mid_blocks": 2,
            "num_heads": 2,
            "act_fn": "gelu",
            "cal_mel_mae": True,
            "cfm_params": reference_cfm_params(),
        },
        "vocoder_config": legacy_vocoder_config(32),
        "visual_config": {"enable": False},
        "video_config": {"enable": False},
        "tiny_checkpoint": {"seed": seed, "note": "random weights for tests and demos; not a trained model"},
    }


# ---------------------------------------------------------------------- random init
def _generator(seed: int, file: str, key: str) -> torch.Generator:
    """One generator per tensor: values depend on (seed, file, key) only, not on draw order."""
    h = hashlib.sha256(f"{seed}/{file}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2 ** 63 - 1))


def _random_tensor(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """The fixtures' random init for one tensor, by the role its name gives it (fp32)."""
    name = key.rsplit(".", 1)[-1]
    if name == "cluster_size":
        return 1 + 10 * torch.rand(shape, generator=g)
    if name in ("alpha", "weight_g"):                      # Snake alpha, weight-norm magnitude
        return 0.5 + torch.rand(shape, generator=g)
    if name in ("embed", "embed_avg") or "embed_tokens" in key or "audio_embed_layers" in key:
        return torch.randn(shape, generator=g)
    if name.endswith("bias"):                               # .bias, in_proj_bias
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1:                                     # every 1-D weight is a norm weight
        return 1 + 0.2 * torch.randn(shape, generator=g)
    fan_in = math.prod(shape[1:])                           # torch's convention (conv: in * k)
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def random_model_state(cfg: ModelConfig, seed: int, schema: Schema | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of `model_schema(cfg)`: parameters as bf16, sinusoid buffers as fp32."""
    schema = schema or model_schema(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, spec in schema.items():
        if spec.kind == BUFFER:
            out[key] = sinusoid_table(*spec.shape)
        else:
            out[key] = _random_tensor(key, spec.shape, _generator(seed, "model", key)).to(torch.bfloat16)
    return out


def random_hift_state(cfg: HiFTConfig, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of `hift_schema(cfg)` in fp32 (bf16-representable values), with the
    fixture-05 adjustments that keep a random vocoder's output audible rather than clipped:
    conv_post g x0.25 and magnitude bias -2, f0 classifier x512 (speech-like Hz)."""
    out = {}
    for key, spec in hift_schema(cfg).items():
        t = _random_tensor(key, spec.shape, _generator(seed, "hift", key))
        out[key] = t.to(torch.bfloat16).float()
    with torch.no_grad():
        out["conv_post.weight_g"] *= 0.25
        n_mag = cfg.istft_n_fft // 2 + 1
        out["conv_post.bias"][:n_mag] -= 2.0
        out["f0_predictor.classifier.weight"] *= 512
        out["f0_predictor.classifier.bias"] *= 512
    return out


# ---------------------------------------------------------------------- protocol shaping
# A random LLM would babble until every budget runs out (50 tokens a text segment, 500
# frames an audio segment, 100 rounds). These edits make a reply short and structured:
# a few text tokens, AUDIO_FRAMES audio frames, a few segments, then <|endoftext|>.
#
# Text: a constant "bias feature". Channel BIAS_CHANNEL of every input embedding (text rows,
# and 1/n of it in each of the n audio-code tables, so summed audio rows match) holds
# BIAS_FEATURE; no layer reads it (zero input columns of W_pack / gate_proj / up_proj) or
# writes it (zero output rows of o_proj / down_proj), so it reaches the final RMSNorm
# unchanged and h[BIAS_CHANNEL] = BIAS_FEATURE / rms(x) is nearly constant (measured with these
# dims: mean BIAS_H, sd ~0.6). Column BIAS_CHANNEL of lm_head then acts as a per-token logit
# bias (lm_head has no bias parameter). Biases in logits, against random logits of sd ~1
# whose maximum over the vocab is ~3:
# - <audiogen_start> and <|endoftext|> rows are pure bias, so their order is fixed: unused,
#   <audiogen_start> (3.0) beats <|endoftext|> (2.93), and the first text segment ends by
#   switching to audio; once <audiogen_start> is in the sequence the text repetition penalty
#   (1.05 / 1.1) puts it below <|endoftext|> (3.0 / 1.05 = 2.86), so a later segment ends the
#   reply unless a stop character wins first (in a later turn, whose history already holds
#   <audiogen_start>, the first segment ends the reply). Each is the greedy choice in about
#   a quarter of the steps, so segments have a few tokens.
# - the single-token stop characters keep their random rows plus a smaller bias.
# - special ids that must never be emitted as text (a generated <audio_pad> would need audio
#   codes) get a zero row and a large negative bias.
# - the reply's first token is never <|endoftext|> (an empty reply, and a spoken one without
#   audio): channel ASSISTANT_CHANNEL, set only in the embedding of <C_A> (the prompt's last
#   token) and likewise never read or written by a layer, carries a -10 bias on that row.
BIAS_CHANNEL = 0
ASSISTANT_CHANNEL = 1
BIAS_FEATURE = 4.0
BIAS_H = 2.7
TEXT_LOGIT_BIAS = {"audiogen_start": 3.0, "endoftext": 2.93, "stop": 1.5, "never": -30.0,
                   "endoftext_first": -10.0}
STOP_PIECES = (",", "!", "?", ".", "，", "。", "！", "？")
# Audio: AUDIO_FRAMES codes of codebook 0 get +AUDIO_BOOST, the end-of-audio class (index K0)
# +AUDIO_EOS_BIAS. Unused boosted codes win (60 > 52); the audio repetition penalty (1.3, over
# this segment's codebook-0 history) divides a used one to 60/1.3 = 46 < 52, so each segment
# ends by code-0 EOS after AUDIO_FRAMES frames. Margins (8 and 6) are several times the
# spread of the random head logits (~1). Without the repetition penalty a segment runs to
# the 500-frame budget.
AUDIO_FRAMES = 5
AUDIO_BOOST = 60.0
AUDIO_EOS_BIAS = 52.0


def shape_protocol_weights(state: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer) -> dict[str, torch.Tensor]:
    """Apply the edits described above to `state` in place (values rounded to bf16).
    `tokenizer` is the checkpoint's `tokenizers.Tokenizer` (for the stop-character ids)."""
    p, c, a = PREFIX["llm"], BIAS_CHANNEL, ASSISTANT_CHANNEL
    n_cb = cfg.audio.num_codebooks
    layout = special_token_layout(cfg)
    eos, ag, assistant = layout[ENDOFTEXT], cfg.audio_tokens.audiogen_start, layout["<C_A>"]

    def edit(key: str, fn) -> None:
        t = state[key].float()
        fn(t)
        state[key] = t.to(state[key].dtype)

    feat = [c, a]

    def norm(t: torch.Tensor) -> None:
        t[feat] = 1.0                                    # so h[c] = BIAS_FEATURE / rms(x)
    edit(p + "norm.weight", norm)

    def embed(t: torch.Tensor) -> None:
        t[:, c] = BIAS_FEATURE
        t[:, a] = 0.0
        t[assistant, a] = BIAS_FEATURE
    edit(p + "embed_tokens.weight", embed)

    def audio_embed(t: torch.Tensor) -> None:
        t[:, c] = BIAS_FEATURE / n_cb                   # n tables summed give BIAS_FEATURE
        t[:, a] = 0.0
    for k in range(n_cb):
        edit(f"{p}audio_embed_layers.{k}.weight", audio_embed)

    def no_read(t: torch.Tensor) -> None:
        t[:, feat] = 0.0

    def no_write(t: torch.Tensor) -> None:
        t[feat, :] = 0.0
    for i in range(cfg.llm.num_hidden_layers):
        q = f"{p}layers.{i}."
        for name in ("self_attn.W_pack.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"):
            edit(q + name, no_read)
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            edit(q + name, no_write)

    stop_ids = _stop_ids(tokenizer)

    def lm(t: torch.Tensor) -> None:
        for token in ALL_SPECIALS:
            i = layout[token]
            t[i].zero_()
            t[i, c] = TEXT_LOGIT_BIAS["never"] / BIAS_H
        t[eos, c] = TEXT_LOGIT_BIAS["endoftext"] / BIAS_H
        t[eos, a] = TEXT_LOGIT_BIAS["endoftext_first"] / BIAS_H
        t[ag, c] = TEXT_LOGIT_BIAS["audiogen_start"] / BIAS_H
        for i in stop_ids:
            t[i, c] = TEXT_LOGIT_BIAS["stop"] / BIAS_H
    edit(PREFIX["lm_head"] + "weight", lm)

    K0 = cfg.audio.codebook_sizes[0]
    boosted = [(3 + j * max(1, K0 // AUDIO_FRAMES)) % K0 for j in range(AUDIO_FRAMES)]

    def head0(t: torch.Tensor) -> None:
        t[boosted] = AUDIO_BOOST
        t[K0] = AUDIO_EOS_BIAS
    edit(PREFIX["audio_head"] + "heads.0.bias", head0)
    return state


def _stop_ids(tokenizer) -> list[int]:
    """Ids of the stop characters that this vocab encodes as one token."""
    out = set()
    for ch in STOP_PIECES:
        ids = tokenizer.encode(ch, add_special_tokens=False).ids
        if len(ids) == 1:
            out.add(ids[0])
    return sorted(out)


# ---------------------------------------------------------------------- writing
def _shard_plan(keys: list[str], sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Contiguous groups of keys (reference module order) of roughly equal bytes, none empty."""
    if not 1 <= shards <= len(keys):
        raise ValueError(f"shards must be between 1 and {len(keys)}, got {shards}")
    total = sum(sizes.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for k in keys:
        groups[min(shards - 1, done * shards // total)].append(k)
        done += sizes[k]
    if any(not g for g in groups):  # one tensor larger than a shard: split by count instead
        n = len(keys)
        groups = [keys[i * n // shards:(i + 1) * n // shards] for i in range(shards)]
    return groups


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, shards: int = 3) -> Path:
    """Write a complete tiny checkpoint to `out_dir` (created if needed) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config_dict(seed)
    cfg = ModelConfig.from_dict(config)
    _write_json(out / "config.json", config)

    build_tiny_tokenizer(out, cfg, cfg.llm.vocab_size)
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = tokenizer.token_to_id(ENDOFTEXT)
    _write_json(out / "generation_config.json", {"bos_token_id": eos, "eos_token_id": eos, "max_new_tokens": 2048})

    schema = model_schema(cfg)
    state = shape_protocol_weights(random_model_state(cfg, seed, schema), cfg, tokenizer)
    sizes = {k: t.numel() * t.element_size() for k, t in state.items()}
    groups = _shard_plan(list(schema), sizes, shards)
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in keys}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    _write_json(out / INDEX_FILE, {"metadata": {"total_size": sum(sizes.values())},
                                   "weight_map": dict(sorted(weight_map.items()))})

    torch.save(random_hift_state(TINY_HIFT, seed), str(out / "hift.pt"))
    _write_json(out / HIFT_CONFIG, TINY_HIFT.to_dict())
    return out
