"""Which device and dtype an engine runs on (the engine and every rank resolve them alike)."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is not a valid torch device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device, config_dtype: torch.dtype | None) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU: exact and fast enough; also what the HF oracle runs
    if config_dtype in (torch.float16, torch.bfloat16):
        return config_dtype
    return torch.bfloat16


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type for `kv_cache_dtype` (vLLM's names): "auto" is the model's
    dtype, "fp8" / "fp8_e4m3" is e4m3 (`torch.float8_e4m3fn`, one byte per element)."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    raise ValueError(f"kv_cache_dtype must be 'auto', 'fp8' or 'fp8_e4m3', got {name!r}")


def require_fp8_gpu(device: torch.device, what: str, instead: str) -> None:
    """FP8 conversions and GEMMs need compute capability 8.9 (Ada, Hopper and later); other
    devices than CUDA are not checked (their paths work anywhere). `what` needs it; `instead`
    is the advice."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"{what} needs a GPU with FP8 support (compute capability >= 8.9); "
            f"{name} has {major}.{minor}: {instead}"
        )
