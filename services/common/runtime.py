"""What every stage replica does at start: settings, checkpoint, device.

The settings travel to replicas as the YAML path or dict given to the app builder; the
checkpoint is `model.path`, or the tiny random checkpoint (built once per machine, atomically,
so replicas starting together do not race) when no path is configured."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from services.common.checkpoint import Checkpoint
from services.common.dtypes import default_dtype
from services.common.settings import Settings

TINY_SEED = 0


def tiny_checkpoint_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "baichuan-audio" / f"tiny-seed{TINY_SEED}"


def ensure_tiny_checkpoint() -> Path:
    """The tiny checkpoint directory, written on first use (write to a temp dir, then rename)."""
    from services.common.tiny_checkpoint import write_tiny_checkpoint

    target = tiny_checkpoint_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    write_tiny_checkpoint(tmp, seed=TINY_SEED)
    try:
        tmp.rename(target)
    except OSError:  # another replica won the race: use its copy
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_settings(source: Any = None) -> Settings:
    """Settings from a YAML path, an already-built Settings, or None (file from env/defaults)."""
    if isinstance(source, Settings):
        return source
    if isinstance(source, dict):
        source = source.get("config")
    return Settings.load(source)


def start_replica(source: Any = None) -> Settings:
    """What every replica does first: its settings, then telemetry as they configure it."""
    from services.common.telemetry import setup_telemetry

    settings = load_settings(source)
    setup_telemetry(settings)
    return settings


def open_checkpoint(settings: Settings) -> Checkpoint:
    path = settings.model.path or str(ensure_tiny_checkpoint())
    return Checkpoint(path)


def device_and_dtype(settings: Settings) -> tuple[torch.device, torch.dtype]:
    """cuda if this replica has a GPU; dtype 'auto' = bf16 on CUDA, fp32 on CPU (as the reference)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = settings.model.dtype
    if dt == "auto":
        dtype = default_dtype(device)
    else:
        dtype = getattr(torch, dt)
    return device, dtype
