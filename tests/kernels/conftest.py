"""Kernel tests run on a CUDA GPU when there is one, else through Triton's CPU interpreter.

Triton chooses interpreter or compiler when a kernel is decorated (at import), so the
environment variable must be set here, before anything imports triton or graphwise.kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def kern():
    """The ``graphwise.kernels`` package with its Triton wrappers; skips without triton."""
    pytest.importorskip("triton", reason="triton is not installed: Triton kernel tests skipped")
    import graphwise.kernels as kernels

    assert kernels.triton_available()
    return kernels


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
