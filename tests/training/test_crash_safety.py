"""Crash safety of adapter saves (issue 8 proof): a process saving one adapter in a loop is SIGKILLed at random
instants, many times. After every kill the adapter is complete (PEFT config + safetensors that parse, metadata that
matches the weights) and is the last version the process reported saved or the one it was writing; the next start
removes what the killed save left behind, so no temp files pile up. At the end the adapter loads on the real model
server and serves a chat.

The writer is a real PEFT adapter for SmolLM2 whose tensors are scaled by (1 + step / 1000), so the weights say
which version they are."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file

from claas.training.storage import LoraStore

pytestmark = pytest.mark.slow

KILLS = 24
LORA_ID = "crash/adapter"

_WRITER = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    from safetensors.numpy import load_file, save_file
    from claas.training.storage import LoraMetadata, LoraStore

    root, source = Path(sys.argv[1]), Path(sys.argv[2])
    base = load_file(str(source / "adapter_model.safetensors"))
    store = LoraStore(root)  # the start: removes leftovers of the previous, killed run
    lora_id = "crash/adapter"
    meta = LoraMetadata(lora_id=lora_id, base_model="smollm2-135m", rank=8, alpha=16,
                        target_modules=["q_proj", "v_proj"])

    def writer(step):
        def write(directory):
            shutil.copy(source / "adapter_config.json", directory / "adapter_config.json")
            scale = 1.0 + step / 1000.0
            save_file({k: v * scale for k, v in base.items()}, str(directory / "adapter_model.safetensors"))
            (directory / "optimizer_state.pt").write_bytes(b"x" * 65536)
        return write

    if not store.exists(lora_id):
        meta.step = 0
        store.create(lora_id, writer(0), meta)
    step = store.read_metadata(lora_id).step
    print(f"ready {step}", flush=True)
    sys.stdin.readline()  # the parent has checked the start's clean-up
    while True:
        step += 1
        meta.step = step
        store.save(lora_id, writer(step), meta)
        print(f"saved {step}", flush=True)
    """
)


def _leftovers(root: Path) -> list[Path]:
    """Temp snapshot dirs, temp links, and snapshots no link points at beyond the current one."""
    found = [p for p in root.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".tmp")]
    snapshots = root / ".snapshots" / LORA_ID.replace("/", "%2F")
    if snapshots.is_dir() and (root / LORA_ID).is_symlink():
        current = Path(os.path.realpath(root / LORA_ID)).name
        seq = int(current.split("-")[0])
        found += [p for p in snapshots.iterdir() if p.name[:1].isdigit() and int(p.name.split("-")[0]) > seq]
    return found


def _check_complete(root: Path, base: dict[str, np.ndarray], confirmed: int) -> int:
    """The adapter is complete and the old or the new version; returns its step."""
    store = LoraStore(root, recover=False)
    snapshot = store.snapshot_path(LORA_ID)
    step = store.read_metadata(LORA_ID).step
    assert step in (confirmed, confirmed + 1), (step, confirmed)
    assert (snapshot / "adapter_config.json").read_text().strip().startswith("{")
    weights = load_file(str(snapshot / "adapter_model.safetensors"))
    assert weights.keys() == base.keys()
    for key, tensor in weights.items():
        np.testing.assert_array_equal(tensor, base[key] * (1.0 + step / 1000.0))  # the weights are that version
    assert (snapshot / "optimizer_state.pt").stat().st_size == 65536
    return step


def test_sigkill_during_saves_leaves_the_old_or_the_new_adapter(
    tmp_path: Path, lora_adapter_dir: Path, model_server: Any
) -> None:
    root = tmp_path / "loras"
    base = load_file(str(lora_adapter_dir / "adapter_model.safetensors"))
    rng = random.Random(8)  # fixed seed: the same kill instants every run
    confirmed = 0
    dirty_starts = 0  # kills that left something for the next start to clean (they hit a save midway)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for kill in range(KILLS):
        leftovers = _leftovers(root)
        dirty_starts += bool(leftovers)
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(lora_adapter_dir)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env)
        assert child.stdout is not None and child.stdin is not None
        ready = child.stdout.readline()
        assert ready.startswith("ready"), child.stderr.read() if child.stderr else ready
        assert int(ready.split()[1]) in (confirmed, confirmed + 1)
        assert _leftovers(root) == [], f"start {kill} left {leftovers}"  # the start removed them
        child.stdin.write("go\n")
        child.stdin.flush()
        time.sleep(rng.uniform(0.02, 0.5))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved")]
        previous = confirmed
        confirmed = saved[-1] if saved else max(confirmed, int(ready.split()[1]))
        step = _check_complete(root, base, confirmed)
        confirmed = step  # the next run starts from whatever version is on disk
        assert step >= previous
    assert dirty_starts > 0, "no kill hit a save midway: the test proved nothing"
    LoraStore(root)  # a last start cleans the last kill's leftovers
    assert _leftovers(root) == []
    # The adapter the kills left is a real one: the model server loads it and serves a chat with it.
    name = f"crash-{os.getpid()}"
    with httpx.Client(base_url=model_server.base_url, timeout=300) as client:
        load = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(root / LORA_ID)})
        assert load.status_code == 200, load.text
        try:
            chat = client.post("/v1/chat/completions", json={
                "model": name, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
            assert chat.status_code == 200, chat.text
        finally:
            client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    print(f"crash safety: {KILLS} kills, {dirty_starts} hit a save midway, final step {confirmed}")
