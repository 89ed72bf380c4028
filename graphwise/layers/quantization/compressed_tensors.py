"""vLLM's "compressed-tensors": checkpoints written by llm-compressor. Read here: the
`float-quantized` (and `naive-quantized` with float weights) FP8 schemes, with per-tensor,
per-channel or block weight scales and static per-tensor or dynamic per-token activations (or
none: weight-only FP8). Other schemes (INT8, packed INT4, sparsity, KV-cache schemes) are
refused with their name.
"""

from __future__ import annotations

from typing import Any

from graphwise.layers.quantization.base import UNQUANTIZED, LinearMethod
from graphwise.layers.quantization.config import FORMATS, QuantizationConfig, matches, one_method
from graphwise.layers.quantization.fp8 import Fp8LinearMethod

_FLOAT_FORMATS = ("float-quantized", "naive-quantized", "dense")


def _scheme_method(name: str, group: dict[str, Any], fmt: str | None) -> Fp8LinearMethod:
    weights = group.get("weights") or {}
    acts = group.get("input_activations")
    wtype, bits = weights.get("type"), weights.get("num_bits")
    group_fmt = group.get("format") or fmt
    if wtype != "float" or bits != 8:
        raise ValueError(
            f"compressed-tensors scheme {name!r} ({bits}-bit {wtype} weights, format "
            f"{group_fmt!r}) is not supported; only FP8 (8-bit float) weights are"
        )
    if group_fmt not in _FLOAT_FORMATS and group_fmt is not None:
        raise ValueError(f"compressed-tensors format {group_fmt!r} is not supported for FP8")
    if not weights.get("symmetric", True) or weights.get("dynamic"):
        raise ValueError(f"compressed-tensors scheme {name!r}: asymmetric or dynamic FP8 weights")
    strategy = weights.get("strategy")
    block = None
    if strategy == "block":
        bs = weights.get("block_structure")
        if not bs or len(bs) != 2:
            raise ValueError(f"compressed-tensors scheme {name!r}: block_structure {bs!r}")
        block = (int(bs[0]), int(bs[1]))
    elif strategy not in ("tensor", "channel"):
        raise ValueError(
            f"compressed-tensors scheme {name!r}: FP8 weight strategy {strategy!r} is not "
            "supported (tensor, channel, block)"
        )
    if group.get("output_activations"):
        raise ValueError(f"compressed-tensors scheme {name!r}: output activation quantization")
    activation: str | None = None
    if acts:
        if acts.get("type") != "float" or acts.get("num_bits") != 8:
            raise ValueError(
                f"compressed-tensors scheme {name!r}: {acts.get('num_bits')}-bit "
                f"{acts.get('type')} activations are not supported (FP8 only)"
            )
        a_strategy, dynamic = acts.get("strategy"), bool(acts.get("dynamic"))
        if dynamic and a_strategy == "token":
            activation = "token"
        elif dynamic and a_strategy == "group" and block is not None:
            activation = "group"
        elif not dynamic and a_strategy == "tensor":
            activation = "tensor"
        else:
            raise ValueError(
                f"compressed-tensors scheme {name!r}: {'dynamic' if dynamic else 'static'} "
                f"per-{a_strategy} FP8 activations are not supported"
            )
    if block is not None and activation not in ("group", None):
        activation = "group"  # block weights run the block GEMM: activations per 128 columns
    return Fp8LinearMethod(strategy, activation, block, checkpoint_fp8=True)


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, hf_config: dict[str, Any] | None) -> None:
        if hf_config is None:
            raise ValueError(
                "quantization='compressed-tensors' needs a compressed-tensors checkpoint "
                "(for online quantization use quantization='fp8')"
            )
        if hf_config.get("sparsity_config"):
            raise ValueError("compressed-tensors sparsity_config (sparse weights) is not supported")
        # kv_cache_scheme (an FP8 KV cache's scales, `k_proj.output_scale` / `v_proj...`) is not
        # a weight format: the model loader gives those scales to the attention layers and the
        # runner checks the scheme (layers/attention/kv_cache_dtype.py).
        fmt = hf_config.get("format")
        self.ignore = list(hf_config.get("ignore") or [])
        self.groups: list[tuple[list[str], Fp8LinearMethod]] = []
        for name, group in (hf_config.get("config_groups") or {}).items():
            targets = list(group.get("targets") or [])
            self.groups.append((targets, _scheme_method(name, group, fmt)))
        if not self.groups:
            raise ValueError("compressed-tensors quantization_config has no config_groups")

    def method_of(self, prefix: str) -> LinearMethod:
        if matches(prefix, self.ignore):
            return UNQUANTIZED
        for targets, method in self.groups:
            if matches(prefix, targets):
                return method
        return UNQUANTIZED

    def linear_method(self, prefixes: list[str]) -> LinearMethod:
        return one_method(prefixes, self.method_of, "compressed-tensors")

    def describe(self) -> str:
        kinds = {f"{m.weight_strategy}/{m.activation or 'weight-only'}" for _, m in self.groups}
        return f"compressed-tensors fp8 ({', '.join(sorted(kinds))})"


FORMATS["compressed-tensors"] = CompressedTensorsConfig
