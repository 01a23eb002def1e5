"""Read a Hugging Face Baichuan-Audio checkpoint directory and hand each stage its weights.

Layout (reference-model.md §2.1): config.json, generation_config.json, tokenizer files,
`model.safetensors.index.json` + `model-0000k-of-0000n.safetensors` shards (or a single
`model.safetensors`). The HiFT vocoder lives in its own file (`hift.pt` or
`hift.safetensors`, keys without prefix, §10.7), optionally with `hift_config.json`.

Each stage asks for its prefixes (§2.4); only the shards holding those keys are opened.
Loading is strict: a key the module expects but the checkpoint lacks, or a key under the
stage's prefix that no module takes, is an error that names the key (and its shard),
except the documented unused keys of §12 item 17.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from services.common.model_config import HiFTConfig, ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HIFT_FILES = ("hift.safetensors", "hift.pt")
HIFT_CONFIG = "hift_config.json"

# State-dict prefixes of the reference module tree (§2.4).
PREFIX = {
    "encoder": "audio_tokenizer.audio_model.",
    "bridge": "audio_tokenizer.audio_bridge_model.",
    "audio_decoder": "audio_tokenizer.audio_decoder.",
    "flow": "audio_tokenizer.audio_flow_matching_decoder.",
    "llm": "model.",
    "lm_head": "lm_head.",
    "audio_head": "audio_head.",
}

# Present in real checkpoints, never used at inference (§12 item 17): accepted and skipped.
UNUSED = tuple(re.compile(p) for p in (
    r"^audio_tokenizer\.audio_decoder\.dconv2\.",
    r"^audio_tokenizer\.audio_decoder\.post_net\.",
    r"^audio_head\.transformer_layers\.\d+\.linear[12]\.bias$",
    r"^audio_tokenizer\.audio_bridge_model\.vq_list\.\d+\.codebook\.(embed_avg|cluster_size|initted)$",
    r"^audio_tokenizer\.audio_flow_matching_decoder\.prenet\.positional_embedding$",
    r"^(visual_model|visual_bridge_model)\.",  # Omni's vision tower, absent in Baichuan-Audio
))


def is_unused(key: str) -> bool:
    return any(p.search(key) for p in UNUSED)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the offending keys and files."""


@dataclass
class LoadReport:
    loaded: list[str]
    skipped_unused: list[str]


class Checkpoint:
    """A checkpoint directory. Cheap to open: reads config and index, not the weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint {self.path}: not a directory")
        self.config = ModelConfig.from_file(self.path / "config.json")
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        elif (self.path / SINGLE_FILE).is_file():
            with safe_open(str(self.path / SINGLE_FILE), "pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise CheckpointError(f"checkpoint {self.path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self.weight_map: dict[str, str] = weight_map
        for shard in sorted(set(weight_map.values())):
            if not (self.path / shard).is_file():
                raise CheckpointError(f"checkpoint {self.path}: shard {shard} named in the index is missing")

    # ---------------------------------------------------------------- reading
    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.weight_map if k.startswith(prefix))

    def shards_for(self, prefixes: Iterable[str]) -> list[str]:
        prefixes = tuple(prefixes)
        return sorted({s for k, s in self.weight_map.items() if k.startswith(prefixes)})

    def tensors(self, prefixes: Iterable[str], *, skip_unused: bool = True) -> dict[str, torch.Tensor]:
        """Every tensor under the given prefixes (full keys), opening only their shards.
        The documented unused keys are not read unless skip_unused=False (codebook EMA
        statistics alone are ~200 MB in a real checkpoint)."""
        prefixes = tuple(prefixes)
        by_shard: dict[str, list[str]] = {}
        for k, s in self.weight_map.items():
            if k.startswith(prefixes) and not (skip_unused and is_unused(k)):
                by_shard.setdefault(s, []).append(k)
        out: dict[str, torch.Tensor] = {}
        for shard, keys in sorted(by_shard.items()):
            with safe_open(str(self.path / shard), "pt") as f:
                present = set(f.keys())
                for k in keys:
                    if k not in present:
                        raise CheckpointError(f"key {k} is listed in {INDEX_FILE} for {shard} but is not in that shard")
                    out[k] = f.get_tensor(k)
        return out

    # ---------------------------------------------------------------- loading
    def load_module(self, module: torch.nn.Module, prefix: str, *, partial: bool = False,
                    optional: Iterable[str] = ()) -> LoadReport:
        """Strictly load `module` from the keys under `prefix` (stripped).

        partial=True: the module takes only a part of the prefix (e.g. the decoder stage takes
        the codebooks and proj_decoder of the bridge); keys under the prefix that it does not
        declare are then not errors, but keys it declares must all be present.
        optional: module keys (relative) that may be absent; the module keeps its own value
        (the sinusoid buffers of §12 item 16, computed by the module when not stored)."""
        return load_state(module, self.tensors([prefix]), prefix, source=str(self.path),
                          shard_of=self.weight_map, partial=partial, optional=optional)

    # ---------------------------------------------------------------- side files
    @property
    def tokenizer_dir(self) -> Path:
        return self.path

    def generation_config(self) -> dict:
        p = self.path / "generation_config.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def hift_path(self) -> Path:
        for name in HIFT_FILES:
            if (self.path / name).is_file():
                return self.path / name
        raise CheckpointError(f"checkpoint {self.path}: no HiFT vocoder file ({' or '.join(HIFT_FILES)})")

    def hift_config(self) -> HiFTConfig:
        p = self.path / HIFT_CONFIG
        return HiFTConfig.from_dict(json.loads(p.read_text())) if p.is_file() else HiFTConfig()


def load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, *,
               source: str, shard_of: dict[str, str] | None = None, partial: bool = False,
               optional: Iterable[str] = ()) -> LoadReport:
    """Copy `tensors` (full keys under `prefix`) into `module`, strictly, with named errors.

    Values are cast to each parameter's dtype; shapes must match exactly."""
    expected = module.state_dict()
    given: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for full, t in tensors.items():
        if not full.startswith(prefix):
            continue
        if is_unused(full):
            skipped.append(full)
            continue
        given[full[len(prefix):]] = t

    def where(k: str) -> str:
        if shard_of and prefix + k in shard_of:
            return f" (in {shard_of[prefix + k]})"
        return ""

    optional = set(optional)
    missing = sorted(k for k in expected if k not in given and k not in optional)
    unexpected = [] if partial else sorted(k for k in given if k not in expected)
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(prefix + k for k in missing[:20])
                        + (f" and {len(missing) - 20} more" if len(missing) > 20 else ""))
    if unexpected:
        problems.append("unexpected: " + ", ".join(prefix + k + where(k) for k in unexpected[:20])
                        + (f" and {len(unexpected) - 20} more" if len(unexpected) > 20 else ""))
    for k, t in given.items():
        if k in expected and tuple(t.shape) != tuple(expected[k].shape):
            problems.append(f"shape of {prefix + k}{where(k)} is {tuple(t.shape)}, "
                            f"the model expects {tuple(expected[k].shape)}")
    if problems:
        raise CheckpointError(f"checkpoint {source}: " + "; ".join(problems))
    with torch.no_grad():
        for k, dst in expected.items():
            if k in given:
                dst.copy_(given[k].to(dst.dtype))
    return LoadReport(loaded=sorted(prefix + k for k in expected), skipped_unused=sorted(skipped))


def load_hift_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The HiFT state dict from `hift.pt` (a plain state dict) or `hift.safetensors`."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    obj = torch.load(str(p), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: expected a state dict of tensors")
    return obj
