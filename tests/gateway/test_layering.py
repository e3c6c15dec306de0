"""The serving side validates lora ids with the grammar in `claas.core`, without loading the training store."""

from __future__ import annotations

import subprocess
import sys

from claas.core.lora_ids import InvalidLoraIdError, validate_lora_id
from claas.training import storage


def test_the_proxy_does_not_import_training_storage() -> None:
    code = ("import sys, claas.inference.proxy, claas.routes.inference; "
            "print(any(m.startswith('claas.training.storage') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_store_uses_the_core_grammar() -> None:
    assert storage.validate_lora_id is validate_lora_id and storage.InvalidLoraIdError is InvalidLoraIdError
