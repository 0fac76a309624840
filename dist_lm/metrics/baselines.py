"""Single-device throughput baselines, the denominators of a multi-rank run's scaling efficiency.

A one-device run with train.record_baseline=true (or `dist-lm bench train`) records its tokens/s
in one JSON table ($DIST_LM_BASELINES, default ~/.cache/dist-lm/baselines.json) under a key of
everything tokens/s depends on (baseline_key); a multi-rank run of the same key reads it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ..fileio import write_text_atomic


def baselines_path() -> Path:
    """Where single-device tokens/s are recorded ($DIST_LM_BASELINES overrides)."""
    env = os.environ.get("DIST_LM_BASELINES")
    return Path(env) if env else Path.home() / ".cache" / "dist-lm" / "baselines.json"


def device_kind(device) -> str:
    """'cpu', or the GPU's name (an H100's baseline says nothing about an A100)."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def baseline_key(model_cfg: dict, vocab_size: int, micro_batch: int, bptt: int, dtype: str,
                 device: str) -> str:
    """Same model and vocabulary, per-device batch and window, dtype and device kind -> same key
    (tokens/s depend on every one of them)."""
    blob = json.dumps({"model": model_cfg, "vocab": vocab_size, "micro": micro_batch,
                       "bptt": bptt, "dtype": dtype, "device": device}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_baseline(key: str) -> float:
    p = baselines_path()
    try:
        return float(json.loads(p.read_text()).get(key, {}).get("tokens_per_s", 0.0))
    except (OSError, ValueError, AttributeError):
        return 0.0


def record_baseline(key: str, tokens_per_s: float, source: str) -> None:
    p = baselines_path()
    try:
        table = json.loads(p.read_text()) if p.is_file() else {}
    except ValueError:
        table = {}
    table[key] = {"tokens_per_s": tokens_per_s, "source": source, "time": time.time()}
    write_text_atomic(p, json.dumps(table, indent=2) + "\n")
