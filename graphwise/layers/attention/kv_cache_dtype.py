"""The KV cache's element type (vLLM's `kv_cache_dtype`) and an FP8 cache's checkpoint scales.

"auto" stores K/V in the model's dtype. "fp8" (= "fp8_e4m3") stores e4m3 (`torch.float8_e4m3fn`),
one byte per element: the pool holds twice the tokens of bf16 and a decode step reads half the
KV bytes. Entries are x / scale with one scale per layer for K and one for V (vLLM's per-tensor
`k_scale` / `v_scale`), read from the checkpoint when it has them, else 1.0.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from graphwise.config import KV_CACHE_DTYPES, kv_cache_dtype_error
from graphwise.core.device import require_fp8_gpu, resolve_kv_cache_dtype
from graphwise.kernels.reference import FP8_KV_DTYPE


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's torch dtype for a `kv_cache_dtype` name (checked again here: a runner may be
    built from a config that skipped validation)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(kv_cache_dtype_error(name))
    return resolve_kv_cache_dtype(name, model_dtype)


def check_kv_cache_device(kv_dtype: torch.dtype, device: torch.device) -> None:
    """An FP8 cache needs a GPU with fp8 conversions (compute capability 8.9: Ada, Hopper and
    later); the CPU path works anywhere."""
    if kv_dtype == FP8_KV_DTYPE:
        require_fp8_gpu(device, "kv_cache_dtype='fp8'", "use kv_cache_dtype='auto'")


def check_kv_cache_scheme(quantization_config: dict[str, Any] | None) -> None:
    """A compressed-tensors checkpoint's `kv_cache_scheme` must be what this cache is: 8-bit
    float, one scale per tensor. Anything else (int8, per-head or per-token scales) would be
    misread, so it is refused by name."""
    scheme = (quantization_config or {}).get("kv_cache_scheme")
    if not scheme:
        return
    kind, bits = scheme.get("type", "float"), scheme.get("num_bits", 8)
    strategy, dynamic = scheme.get("strategy", "tensor"), scheme.get("dynamic", False)
    if kind != "float" or bits != 8 or strategy != "tensor" or dynamic:
        raise ValueError(
            f"the checkpoint's kv_cache_scheme (type={kind!r}, num_bits={bits}, "
            f"strategy={strategy!r}, dynamic={dynamic}) is not supported: graphwise's FP8 KV "
            "cache takes static per-tensor e4m3 scales"
        )


_LAYER = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(.+)$")
# Checkpoint names of the scales, as vLLM reads them (after `model.layers.N.self_attn.`):
# plain (`k_scale`), already under the attention layer (`attn.k_scale`), ModelOpt's
# (`k_proj.k_scale`), compressed-tensors' outputs of k_proj / v_proj (`k_proj.output_scale`),
# and the deprecated single `kv_scale` (both K and V).
_SCALE_LEAVES = {
    "k_scale": ("k",),
    "v_scale": ("v",),
    "attn.k_scale": ("k",),
    "attn.v_scale": ("v",),
    "k_proj.k_scale": ("k",),
    "v_proj.v_scale": ("v",),
    "k_proj.output_scale": ("k",),
    "v_proj.output_scale": ("v",),
    "kv_scale": ("k", "v"),
    "attn.kv_scale": ("k", "v"),
}


def kv_scale_target(name: str) -> tuple[int, tuple[str, ...]] | None:
    """(layer index, ("k",) / ("v",) / both) when checkpoint tensor `name` is an FP8 KV-cache
    scale; None otherwise."""
    m = _LAYER.match(name)
    if m is None or m.group(2) not in _SCALE_LEAVES:
        return None
    return int(m.group(1)), _SCALE_LEAVES[m.group(2)]


def scale_value(name: str, tensor: torch.Tensor) -> float:
    """The one number of a per-tensor scale (a per-head or per-channel scale is refused)."""
    if tensor.numel() != 1:
        raise ValueError(
            f"checkpoint tensor {name!r} has {tensor.numel()} values: only per-tensor KV-cache "
            "scales (one number) are supported"
        )
    return float(tensor.float().item())
