#!/usr/bin/env bash
# Load-test an already running servicer (e.g. `make serve`) with each ghz config in deploy/ghz:
# with ghz when it is on PATH, else with the Python driver that reads the same configs (bench/load.py).
# Usage: bench/loadtest.sh [CONFIG...]      (default: deploy/ghz/text.json deploy/ghz/image.json)
# Environment: HOST, PORT (target, default 127.0.0.1:50051), VENV (default .venv),
#              CONCURRENCY, DURATION (override the configs' concurrency and duration, e.g. 64 and 10s).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${HOST:-127.0.0.1}:${PORT:-50051}"
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(deploy/ghz/text.json deploy/ghz/image.json)
extra=()
[ -z "${CONCURRENCY:-}" ] || extra+=(-c "$CONCURRENCY")
[ -z "${DURATION:-}" ] || extra+=(-z "$DURATION")
status=0
for cfg in "${configs[@]}"; do
  if command -v ghz >/dev/null 2>&1; then
    echo "== ghz $cfg -> $target"
    ghz --config "$cfg" "${extra[@]}" "$target" || status=1
  else
    echo "== bench.load $cfg -> $target (ghz not on PATH)"
    "${VENV:-.venv}/bin/python" -m bench.load "$cfg" --host "$target" "${extra[@]}" || status=1
  fi
done
exit $status
