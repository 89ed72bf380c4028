"""Triton kernels for graphwise, plus pure-PyTorch references (``graphwise.kernels.reference``).

The Triton wrappers are exported only when Triton is installed; use ``triton_available()`` to
decide between them and the references at run time. Triton decides at import time whether to
interpret kernels on the CPU, so ``TRITON_INTERPRET=1`` must be set before this package is
first imported when running without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from graphwise.kernels import reference

__all__ = ["reference", "triton_available"]


def triton_available() -> bool:
    """True when Triton imports and can run: on a CUDA GPU, or interpreted (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


if importlib.util.find_spec("triton") is not None:
    from graphwise.kernels.activation import gelu_tanh_and_mul, silu_and_mul
    from graphwise.kernels.decode_attention import (
        alloc_decode_workspace,
        choose_num_splits,
        decode_attention,
    )
    from graphwise.kernels.extend_attention import extend_attention
    from graphwise.kernels.kv_store import store_kv
    from graphwise.kernels.rmsnorm import fused_add_rmsnorm, head_rmsnorm_, rmsnorm
    from graphwise.kernels.rope import rope_qkv_

    __all__ += [
        "alloc_decode_workspace",
        "choose_num_splits",
        "decode_attention",
        "extend_attention",
        "fused_add_rmsnorm",
        "gelu_tanh_and_mul",
        "head_rmsnorm_",
        "rmsnorm",
        "rope_qkv_",
        "silu_and_mul",
        "store_kv",
    ]
