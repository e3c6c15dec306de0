"""Helpers shared by the model-server tests: reading /metrics text, writing adapter variants.

Adapter variants are written with `safetensors.numpy`, so the test process stays free of torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.numpy import load_file, save_file

WEIGHTS = "adapter_model.safetensors"


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` whose labels include `labels` (every label set when none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def variant(src: Path, dst: Path, *, scale_b: float = 1.0, rank: int | None = None, config: str | None = None) -> str:
    """A copy of the adapter at `src` with lora_B scaled (other weights), truncated to `rank` (other structure), or
    with `config` as its adapter_config.json text."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / WEIGHTS))
    out = {}
    for key, value in tensors.items():
        if rank is not None:
            value = value[:rank] if "lora_A" in key else value[:, :rank]
        out[key] = (value * scale_b).astype(value.dtype) if "lora_B" in key else value
    save_file(out, str(dst / WEIGHTS))
    if rank is not None:
        cfg = json.loads((src / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, "r": rank}))
    if config is not None:
        (dst / "adapter_config.json").write_text(config)
    return str(dst)
