from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _free_gpu_memory_between_tests():
    """An LLM a test does not shut down lives on in reference cycles (engine, runner, threads)
    until the collector runs, holding its KV pool: the next test's memory plan then finds no
    memory for its own (seen on the H200: "no memory is left for the KV cache" after the
    quantization tests). Collect and return cached blocks after every test."""
    yield
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()
