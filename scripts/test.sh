#!/usr/bin/env bash
# Run the test suite (CPU; GPU tests are skipped without a GPU), setting up first if needed.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
"$here/scripts/bootstrap.sh"
cd "$here"
export HF_HUB_OFFLINE=1
exec "${GRAPHWISE_VENV:-.venv}/bin/python" -m pytest "$@"
