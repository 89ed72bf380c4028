"""INT4 weight-only checkpoints: AWQ (AutoAWQ's GEMM format) and GPTQ (v1, desc_act=False).

Storage (the checkpoint's own tensors, kept packed; kernels/int4_quant.py has the layouts):
- AWQ:  `qweight` int32 [in, out / 8], `qzeros` int32 [in / group, out / 8], `scales` [in / group, out]
- GPTQ: `qweight` int32 [in / 8, out], `qzeros` int32 [in / group, out / 8], `scales` [in / group, out]
The output runs along dim 1 of every tensor, so a packed layer (qkv, gate/up) concatenates its
shards along dim 1 and a column-parallel rank keeps a range of dim-1 columns (8 outputs per
packed column; shards and TP parts must be multiples of 8 outputs). A row-parallel rank keeps a
range of whole groups along dim 0 (a split that cuts a group is refused). `scales` stay fp16
(the checkpoint's dtype): a bf16 model does not round them again. GPTQ's `g_idx` is checked
(act-order is refused) and not kept.

Compute: CUDA runs `int4_linear` (Triton: GEMV / fused GEMM, dequantize + cuBLAS for GPTQ
prefill). CPU dequantizes each layer once at `process_after_loading` (the torch reference) and
keeps that matrix as a plain attribute beside the packed parameters: F.linear on the exact
checkpoint weights (what the tests compare against HF), not fast, and the memory plan counts the
packed bytes (what a GPU reads), not the CPU's extra copy.

`quantization="awq"` / `"gptq"` without a quantized checkpoint only works with
`load_format="dummy"` (random packed weights: benchmarks on presets); these formats cannot
quantize at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from graphwise.kernels.int4_quant import (
    check_gptq_g_idx,
    dequantize,
    int4_linear,
    int4_shapes,
)
from graphwise.layers.quantization.base import UNQUANTIZED, LinearMethod, ShardSpec, copy_rows
from graphwise.layers.quantization.config import FORMATS, QuantizationConfig, one_method

if TYPE_CHECKING:
    from graphwise.layers.linear import Linear

SCALE_DTYPE = torch.float16


@dataclass(frozen=True, eq=True)
class Int4LinearMethod(LinearMethod):
    """One AWQ or GPTQ layer; `group_size` -1 means one group per (whole) input row."""

    fmt: str = "gptq"
    group_size: int = 128

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.fmt

    # ---- storage ----------------------------------------------------------------------
    def _group(self, layer: Linear) -> int:
        """The group size on this rank (a per-channel checkpoint: the local input width)."""
        return layer.in_features if self.group_size == -1 else self.group_size

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        out, inp = layer.out_features, layer.in_features
        specs = layer.shard_specs()
        fmt = self.fmt.upper()
        if self.group_size != -1 and inp % self.group_size:
            split = specs[0].in_count
            raise ValueError(
                f"{fmt}: {inp} input features"
                + (f" per rank (tensor_parallel_size={split})" if split > 1 else "")
                + f" are not a multiple of group_size={self.group_size}"
                + ("; use another tensor_parallel_size" if split > 1 else "")
            )
        for s in specs:
            if s.out_offset % 8 or s.out_size % 8:
                what = f"shard {s.name!r}" if s.name else "the layer"
                raise ValueError(
                    f"{fmt}: {what} has {s.out_size} output features on this rank, not a "
                    "multiple of 8 (the packing unit); use another tensor_parallel_size"
                )
        shapes = int4_shapes(self.fmt, inp, out, self._group(layer))
        layer.qweight = nn.Parameter(
            torch.zeros(shapes["qweight"], dtype=torch.int32), requires_grad=False
        )
        layer.qzeros = nn.Parameter(
            torch.zeros(shapes["qzeros"], dtype=torch.int32), requires_grad=False
        )
        layer.scales = nn.Parameter(
            torch.zeros(shapes["scales"], dtype=SCALE_DTYPE), requires_grad=False
        )
        if layer.has_bias:
            layer.bias = nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False)
        layer.int4_dtype = dtype

    def checkpoint_leaves(self, layer: Linear) -> set[str]:
        leaves = {"qweight", "qzeros", "scales"}
        if self.fmt == "gptq":
            leaves.add("g_idx")  # AutoGPTQ / GPTQModel always write it
        if layer.has_bias:
            leaves.add("bias")
        return leaves

    def load(self, layer: Linear, leaf: str, tensor: torch.Tensor, spec: ShardSpec) -> None:
        if leaf == "bias":
            copy_rows(layer.bias, tensor, spec, leaf, cols=False)
            return
        if leaf == "g_idx":
            check_gptq_g_idx(tensor, spec.in_full, self._full_group(spec))
            return
        if leaf not in ("qweight", "qzeros", "scales"):
            raise ValueError(f"checkpoint tensor {leaf!r} has no place in an {self.fmt} layer")
        group = self._full_group(spec)
        expect = int4_shapes(self.fmt, spec.in_full, spec.out_full, group)[leaf]
        if tuple(tensor.shape) != expect:
            raise ValueError(
                f"{self.fmt} {leaf} has shape {tuple(tensor.shape)}, expected {expect} "
                f"(in_features={spec.in_full}, out_features={spec.out_full}, group_size={group})"
            )
        if leaf == "scales":
            tensor = tensor.to(SCALE_DTYPE)
        elif tensor.dtype != torch.int32:
            raise ValueError(f"{self.fmt} {leaf} has dtype {tensor.dtype}, expected int32")
        # Outputs per dim-1 column, and inputs per dim-0 row, of this tensor.
        out_per_col = 8 if leaf == "qzeros" or (leaf == "qweight" and self.fmt == "awq") else 1
        if leaf == "qweight":
            in_per_row = 1 if self.fmt == "awq" else 8
        else:
            in_per_row = group
        # Input part (row parallelism): whole rows of this tensor; a per-channel checkpoint's
        # single group of scales/zeros is the same on every rank.
        if spec.in_count > 1 and not (leaf != "qweight" and self.group_size == -1):
            rows = spec.in_full // spec.in_count // in_per_row
            tensor = tensor[spec.in_index * rows : (spec.in_index + 1) * rows]
        # Output part (column parallelism) and the shard's columns in the packed layer.
        size = spec.out_size // out_per_col
        start = spec.out_index * size
        part = tensor[:, start : start + size]
        if part.shape[1] < size:  # a padded last part: zero scales make its outputs zero
            part = torch.cat([part, part.new_zeros(part.shape[0], size - part.shape[1])], 1)
        dest_all = getattr(layer, leaf).data
        first = spec.out_offset // out_per_col
        dest = dest_all[:, first : first + size]
        if dest.shape != part.shape:
            raise ValueError(
                f"{self.fmt} {leaf} of shape {tuple(tensor.shape)} does not fit the layer's "
                f"{tuple(dest.shape)} on this rank"
            )
        dest.copy_(part)

    def _full_group(self, spec: ShardSpec) -> int:
        return spec.in_full if self.group_size == -1 else self.group_size

    def init_dummy(self, layer: Linear, generator: torch.Generator) -> None:
        """Random packed words (every 4-bit code uniform in 0..15), zero point 8 everywhere,
        scales in [2e-3, 3e-3]: weights within about +-0.024, like the unquantized dummy
        weights. Drawn as int32 words: no [in, out] code matrix (a 7B layer fills at once)."""
        device = layer.qweight.device
        layer.qweight.data.copy_(
            torch.randint(
                -(2**31),
                2**31,
                layer.qweight.shape,
                generator=generator,
                device=device,
                dtype=torch.int32,
            )
        )
        # zero point 8 in every nibble: AWQ stores it, GPTQ stores zero - 1 = 7
        word = 0x88888888 - 2**32 if self.fmt == "awq" else 0x77777777
        layer.qzeros.data.fill_(word)
        scales = torch.empty(layer.scales.shape, dtype=torch.float32, device=device)
        scales.uniform_(0.002, 0.003, generator=generator)
        layer.scales.data.copy_(scales)
        if layer.bias is not None:
            layer.bias.data.uniform_(-0.02, 0.02, generator=generator)

    def process_after_loading(self, layer: Linear) -> None:
        if layer.qweight.device.type == "cuda":
            layer.int4_weight = None
            return
        # CPU: dequantize once (fp32 reference), [out, in] in the model dtype.
        w = dequantize(layer.qweight, layer.scales, layer.qzeros, self._group(layer), self.fmt)
        layer.int4_weight = w.t().contiguous().to(layer.int4_dtype)

    # ---- compute ----------------------------------------------------------------------
    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.int4_weight is not None:
            return F.linear(x, layer.int4_weight.to(x.dtype), bias)
        y = int4_linear(x, layer.qweight, layer.scales, layer.qzeros, self._group(layer), self.fmt)
        return y if bias is None else y + bias


def _int(cfg: dict[str, Any], *keys: str, default: int) -> int:
    for key in keys:
        if cfg.get(key) is not None:
            return int(cfg[key])
    return default


class _Int4Config(QuantizationConfig):
    """The shared part of the AWQ and GPTQ configs: bits, group size, unconverted modules."""

    fmt = ""

    def __init__(self, hf_config: dict[str, Any] | None) -> None:
        # No checkpoint config: quantization="awq"/"gptq" on an unquantized model, which only
        # load_format="dummy" can honour (random packed weights, group size 128).
        self.requires_checkpoint = hf_config is None
        cfg = hf_config or {}
        bits = _int(cfg, "bits", "w_bit", default=4)
        if bits != 4:
            raise ValueError(
                f"{self.fmt} checkpoints with bits={bits} are not supported (4-bit only)"
            )
        self.group_size = _int(cfg, "group_size", "q_group_size", default=128)
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(
                f"{self.fmt} group_size={self.group_size} is not supported (a multiple of 8, or -1)"
            )
        self.unconverted = list(cfg.get("modules_to_not_convert") or [])
        self.method = Int4LinearMethod(self.fmt, self.group_size)

    def linear_method(self, prefixes: list[str]) -> LinearMethod:
        return one_method(
            prefixes,
            lambda p: (
                UNQUANTIZED
                if p.split(".")[-1] == "lm_head" or any(m in p for m in self.unconverted)
                else self.method
            ),
            self.fmt,
        )

    def describe(self) -> str:
        return f"{self.fmt} (4-bit, group {self.group_size})"


class AwqConfig(_Int4Config):
    """AutoAWQ checkpoints: `quant_method` "awq", `version` "gemm", `zero_point` true."""

    name = fmt = "awq"

    def __init__(self, hf_config: dict[str, Any] | None) -> None:
        cfg = hf_config or {}
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(
                f"AWQ version {cfg.get('version')!r} is not supported (only 'gemm': "
                "AutoAWQ's GEMM packing; GEMV/Marlin/exllama exports pack differently)"
            )
        if cfg.get("zero_point", True) is False:
            raise ValueError(
                "AWQ checkpoints without zero points (zero_point=false) are not supported"
            )
        super().__init__(hf_config)


class GptqConfig(_Int4Config):
    """AutoGPTQ / GPTQModel v1 checkpoints with `desc_act` false."""

    name = fmt = "gptq"

    def __init__(self, hf_config: dict[str, Any] | None) -> None:
        cfg = hf_config or {}
        if cfg.get("desc_act"):
            raise ValueError(
                "GPTQ checkpoints with desc_act=true (act-order) are not supported; use a "
                "desc_act=false export"
            )
        fmt = str(cfg.get("checkpoint_format", "gptq")).lower()
        if fmt != "gptq":
            raise ValueError(
                f"GPTQ checkpoint_format {cfg.get('checkpoint_format')!r} is not supported "
                "(only 'gptq', the v1 packing)"
            )
        if cfg.get("lm_head"):
            raise ValueError("GPTQ checkpoints with a quantized lm_head are not supported")
        if cfg.get("dynamic"):
            raise ValueError(
                "GPTQ checkpoints with per-module 'dynamic' settings are not supported"
            )
        super().__init__(hf_config)


FORMATS["awq"] = AwqConfig
FORMATS["gptq"] = GptqConfig
