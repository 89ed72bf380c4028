"""Quantized weights behind the linear layers: a `QuantizationConfig` (from the checkpoint's
`quantization_config` or `quantization=`) gives each linear layer a `LinearMethod`.

Formats: "fp8" (online, or the block-wise fp8 checkpoint format), "compressed-tensors"
(FP8 float-quantized), "awq" and "gptq" (INT4 checkpoints, int4.py). A new format registers its parser in `config.FORMATS` (import its
module here) and implements `LinearMethod` (base.py).
"""

from graphwise.layers.quantization import compressed_tensors, fp8, int4  # noqa: F401  (register)
from graphwise.layers.quantization.base import (
    UNQUANTIZED,
    LinearMethod,
    ShardSpec,
    UnquantizedLinearMethod,
)
from graphwise.layers.quantization.config import (
    FORMATS,
    QuantizationConfig,
    building,
    check_name,
    current,
    resolve,
    supported_names,
)

__all__ = [
    "FORMATS",
    "UNQUANTIZED",
    "LinearMethod",
    "QuantizationConfig",
    "ShardSpec",
    "UnquantizedLinearMethod",
    "building",
    "check_name",
    "current",
    "resolve",
    "supported_names",
]
