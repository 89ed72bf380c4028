#!/usr/bin/env bash
# Run the graphwise CLI, setting up the environment first if needed.
#   scripts/graphwise.sh generate "What is the capital of France?"
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
"$here/scripts/bootstrap.sh"
exec "$here/${GRAPHWISE_VENV:-.venv}/bin/graphwise" "$@"
