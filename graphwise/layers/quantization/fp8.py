"""FP8 W8A8 (e4m3) linear layers: per-tensor, per-channel and 128 x 128 block weight scales.

Storage: `weight` fp8 [out, in] (the checkpoint's layout) and `weight_scale` fp32:
- per-tensor and per-channel scales are both kept per output row ([out]): a packed qkv whose
  shards carry one scale each then needs no requantization, and the GEMM takes row scales;
- block scales are kept per (128-row block, 128-column block), or per (row, 128-column block)
  when a packed layer's shards do not start on a block boundary (tiny models; TP slices).
Static activation scales (`input_scale`, one per shard) are folded to their maximum.

Compute:
- CUDA (compute capability >= 8.9): activations quantized per token (or with the checkpoint's
  static scale) by one Triton kernel, then `torch._scaled_mm` with row-wise scales, bf16 out;
  the block format quantizes activations per (token, 128 columns) and runs the Triton
  block-scaled GEMM (graphwise/kernels/fp8.py).
- CPU: the weight is dequantized (fp8 x scale, in fp32) and multiplied in the model dtype:
  correct, not fast, and without activation quantization, so the CPU path equals the
  checkpoint's weights run in full precision (the reference the tests compare against).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from graphwise.core.device import require_fp8_gpu
from graphwise.kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    MIN_SCALE,
    dequantize_blockwise,
    fp8_skinny_matmul,
    per_token_group_quant_fp8,
    w8a8_block_fp8_matmul,
)
from graphwise.layers.quantization.base import UNQUANTIZED, LinearMethod, ShardSpec, copy_rows
from graphwise.layers.quantization.config import FORMATS, QuantizationConfig, matches, one_method

if TYPE_CHECKING:
    from graphwise.layers.linear import Linear

WEIGHT_STRATEGIES = ("tensor", "channel", "block")
# Up to this many rows, row-scaled FP8 weights multiply bf16 activations directly in a Triton
# kernel (no activation quantization kernel, weights read once in fp8); above, _scaled_mm.
# Measured on an H200 at Qwen2.5-7B's shapes, batch 1: 10-50 us per projection against 13-65
# us for quantize + _scaled_mm (benchmarks/fp8_gemm_bench.py). GRAPHWISE_FP8_SKINNY_MAX_M
# overrides it (0 turns the kernel off) for measurements.
SKINNY_MAX_M = int(os.environ.get("GRAPHWISE_FP8_SKINNY_MAX_M") or 16)
# "token": dynamic per-token scales; "tensor": a static per-tensor scale from the checkpoint;
# "group": dynamic per (token, block_k columns) scales (the block format); None: weight-only.
ACTIVATION_SCHEMES = ("token", "tensor", "group", None)


def check_fp8_device(device: torch.device) -> None:
    """FP8 GEMMs need Ada/Hopper or newer (compute capability 8.9)."""
    require_fp8_gpu(device, "FP8 weights", "use an unquantized checkpoint")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (fp8 [N, K], fp32 scale per row [N])."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
    q = (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_blocks(
    w: torch.Tensor, block_n: int, block_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (fp8 [N, K], fp32 scale per (block_n, block_k) block)."""
    N, K = w.shape
    nb, kb = -(-N // block_n), -(-K // block_k)
    wf = F.pad(w.float(), (0, kb * block_k - K, 0, nb * block_n - N))
    blocks = wf.view(nb, block_n, kb, block_k)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=MIN_SCALE)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nb * block_n, kb * block_k)[:N, :K].contiguous(), scale


@dataclass(frozen=True, eq=True)
class Fp8LinearMethod(LinearMethod):
    weight_strategy: str = "channel"
    activation: str | None = "token"
    block: tuple[int, int] | None = None  # (rows, cols) of a weight-scale block
    checkpoint_fp8: bool = True  # False: quantize the checkpoint's full-precision weights
    scale_leaf: str = "weight_scale"  # the block `fp8` format names it weight_scale_inv

    name = "fp8"

    def __post_init__(self) -> None:
        if self.weight_strategy not in WEIGHT_STRATEGIES:
            raise ValueError(f"FP8 weight strategy {self.weight_strategy!r} is not supported")
        if self.activation not in ACTIVATION_SCHEMES:
            raise ValueError(f"FP8 activation scheme {self.activation!r} is not supported")
        if (self.weight_strategy == "block") != (self.block is not None):
            raise ValueError("FP8 block weights need a block size (and only they take one)")
        if self.activation == "group" and self.block is None:
            raise ValueError("per-group FP8 activations need block-wise weights")

    # ---- storage ----------------------------------------------------------------------
    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        out, inp = layer.out_features, layer.in_features
        weight = torch.empty(out, inp, dtype=FP8_DTYPE)
        check_fp8_device(weight.device)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if self.block is not None:
            bn, bk = self.block
            specs = layer.shard_specs()
            if any(s.in_count > 1 for s in specs) and inp % bk:
                raise ValueError(
                    f"FP8 block weights: {inp} input features per rank are not a multiple of "
                    f"the {bk}-column block; use another tensor_parallel_size"
                )
            # Compact scales only when every shard starts on a row-block boundary on this rank.
            compact = all(s.out_offset % bn == 0 and s.out_size % bn == 0 for s in specs) or (
                len(specs) == 1 and specs[0].out_index == 0
            )
            layer.scale_rows = bn if compact else 1
            rows = -(-out // bn) if compact else out
            scale = torch.ones(rows, -(-inp // bk), dtype=torch.float32)
        else:
            scale = torch.ones(out, dtype=torch.float32)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        if self.activation == "tensor":
            layer.input_scale = nn.Parameter(
                torch.zeros(len(layer.shard_specs()), dtype=torch.float32), requires_grad=False
            )
        if layer.has_bias:
            layer.bias = nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False)

    def checkpoint_leaves(self, layer: Linear) -> set[str]:
        leaves = {"weight"}
        if self.checkpoint_fp8:
            leaves.add(self.scale_leaf)
            if self.activation == "tensor":
                leaves.add("input_scale")
        if layer.has_bias:
            leaves.add("bias")
        return leaves

    def load(self, layer: Linear, leaf: str, tensor: torch.Tensor, spec: ShardSpec) -> None:
        if leaf == "bias":
            copy_rows(layer.bias, tensor, spec, leaf, cols=False)
        elif leaf == "weight" and not self.checkpoint_fp8:
            self._load_online(layer, tensor, spec)
        elif leaf == "weight":
            if tensor.dtype != FP8_DTYPE:
                raise ValueError(
                    f"FP8 checkpoint weight has dtype {tensor.dtype}, expected float8_e4m3fn"
                )
            copy_rows(layer.weight, tensor, spec, leaf)
        elif leaf == self.scale_leaf and self.checkpoint_fp8:
            self._load_scale(layer, tensor.float(), spec)
        elif leaf == "input_scale" and self.activation == "tensor":
            index = [s.name for s in layer.shard_specs()].index(spec.name)
            layer.input_scale.data[index] = tensor.float().reshape(-1)[0]
        else:
            raise ValueError(f"checkpoint tensor {leaf!r} has no place in an FP8 layer")

    def _load_online(self, layer: Linear, tensor: torch.Tensor, spec: ShardSpec) -> None:
        if tensor.shape[0] != spec.out_full:
            raise ValueError(
                f"checkpoint weight has {tuple(tensor.shape)}, expected {spec.out_full} rows"
            )
        full_rows = spec.take_rows(tensor).to(layer.weight.device)
        part = spec.take_cols(full_rows)
        rows = slice(spec.out_offset, spec.out_offset + spec.out_size)
        if part.shape != layer.weight[rows].shape:
            raise ValueError(
                f"checkpoint weight has shape {tuple(tensor.shape)}, the layer expects "
                f"{tuple(layer.weight[rows].shape)} on this rank"
            )
        if self.block is not None:
            q, scale = quantize_blocks(part, *self.block)
            self._store_block_scales(layer, scale, spec)
        else:
            # Scales from the whole row, not this rank's columns: the same FP8 weights at any
            # tensor_parallel_size.
            scale = (full_rows.float().abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
            q = (part.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            layer.weight_scale.data[rows] = scale
        layer.weight.data[rows] = q

    def _load_scale(self, layer: Linear, tensor: torch.Tensor, spec: ShardSpec) -> None:
        rows = slice(spec.out_offset, spec.out_offset + spec.out_size)
        if self.weight_strategy == "tensor":
            if tensor.numel() != 1:
                raise ValueError(f"per-tensor weight scale has shape {tuple(tensor.shape)}")
            layer.weight_scale.data[rows] = tensor.reshape(())
        elif self.weight_strategy == "channel":
            copy_rows(layer.weight_scale, tensor.reshape(-1), spec, self.scale_leaf, cols=False)
        else:
            assert self.block is not None
            bn, bk = self.block
            expect = (-(-spec.out_full // bn), -(-spec.in_full // bk))
            if tuple(tensor.shape) != expect:
                raise ValueError(
                    f"block weight scale {self.scale_leaf!r} has shape {tuple(tensor.shape)}, "
                    f"expected {expect}"
                )
            tensor = spec.take_cols(tensor)
            if layer.scale_rows == 1:  # expanded: one scale row per weight row
                tensor = tensor.repeat_interleave(bn, 0)[: spec.out_full]
            self._store_block_scales(layer, spec.take_rows(tensor, layer.scale_rows), spec)

    def _store_block_scales(self, layer: Linear, scale: torch.Tensor, spec: ShardSpec) -> None:
        """`scale`: this rank's part of a shard's scales, per row block (compact) or per row."""
        if layer.scale_rows == 1 and scale.shape[0] != spec.out_size:
            scale = scale.repeat_interleave(self.block[0], 0)[: spec.out_size]  # type: ignore[index]
        start = spec.out_offset // layer.scale_rows
        dest = layer.weight_scale.data[start : start + scale.shape[0]]
        if dest.shape != scale.shape:
            raise ValueError(
                f"block weight scales of shape {tuple(scale.shape)} do not fit the layer's "
                f"{tuple(dest.shape)}"
            )
        dest.copy_(scale)

    def init_dummy(self, layer: Linear, generator: torch.Generator) -> None:
        w = torch.empty(
            layer.out_features, layer.in_features, dtype=torch.bfloat16, device=layer.weight.device
        )
        w.uniform_(-0.02, 0.02, generator=generator)
        if self.block is not None:
            q, scale = quantize_blocks(w, *self.block)
            if layer.scale_rows == 1:
                scale = scale.repeat_interleave(self.block[0], 0)[: layer.out_features]
            layer.weight_scale.data.copy_(scale)
        else:
            q, scale = quantize_rows(w)
            layer.weight_scale.data.copy_(scale)
        layer.weight.data.copy_(q)
        if self.activation == "tensor":
            layer.input_scale.data.fill_(4.0 / FP8_MAX)  # dummy activations are of order 1
        if layer.bias is not None:
            layer.bias.data.uniform_(-0.02, 0.02, generator=generator)

    def process_after_loading(self, layer: Linear) -> None:
        if self.activation == "tensor":
            # One scale for the packed input (vLLM does the same): the largest shard's.
            layer.input_scale = nn.Parameter(
                layer.input_scale.data.max().reshape(1, 1), requires_grad=False
            )
        device = layer.weight.device
        if device.type != "cuda":
            layer.fp8_path = "dequant"
        elif self.activation is None:
            # weight-only: the skinny kernel for decode-sized batches, else dequantize + F.linear
            layer.fp8_path = "dequant" if self.block is not None else "skinny"
        elif self.block is not None:
            layer.fp8_path = "block"
        else:
            layer.fp8_path = "scaled_mm"
            # _scaled_mm takes the weight as [K, N] column-major (our [N, K] transposed) and
            # its scales as [1, N]: views, no copies.
            layer.scale_b = layer.weight_scale.data.view(1, -1)

    # ---- compute ----------------------------------------------------------------------
    def dequantized_weight(self, layer: Linear, dtype: torch.dtype) -> torch.Tensor:
        if self.block is not None:
            return dequantize_blockwise(
                layer.weight, layer.weight_scale, layer.scale_rows, self.block[1], dtype
            )
        return (layer.weight.float() * layer.weight_scale[:, None]).to(dtype)

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        path = layer.fp8_path
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if path == "skinny" or (path == "scaled_mm" and x2.shape[0] <= SKINNY_MAX_M):
            if x2.shape[0] <= 16:
                if x2.stride(-1) != 1:
                    x2 = x2.contiguous()
                y = fp8_skinny_matmul(x2, layer.weight, layer.weight_scale, bias)
                return y.reshape(*shape[:-1], y.shape[-1])
        if path in ("dequant", "skinny"):
            return F.linear(x, self.dequantized_weight(layer, x.dtype), bias)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if path == "block":
            assert self.block is not None
            q, sa = per_token_group_quant_fp8(x2, self.block[1])
            y = w8a8_block_fp8_matmul(
                q, layer.weight, sa, layer.weight_scale, layer.scale_rows, self.block[1], x.dtype
            )
            if bias is not None:
                y = y + bias
        else:
            if self.activation == "tensor":
                scale = layer.input_scale
                q = (x2.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
                sa = scale.expand(x2.shape[0], 1).contiguous()
            else:
                q, sa = per_token_group_quant_fp8(x2)
            fused_bias = bias if x.dtype == torch.bfloat16 else None
            y = torch._scaled_mm(
                q,
                layer.weight.t(),
                scale_a=sa,
                scale_b=layer.scale_b,
                bias=fused_bias,
                out_dtype=torch.bfloat16,
            )
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            if bias is not None and fused_bias is None:
                y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])


class Fp8Config(QuantizationConfig):
    """vLLM's "fp8": a checkpoint with `quant_method: fp8` (128 x 128 block scales named
    weight_scale_inv with dynamic per-token-group activations, as Qwen3-FP8 and DeepSeek ship;
    or per-tensor `weight_scale` with static or dynamic activations), or online quantization
    of a full-precision checkpoint (`hf_config` None): per-channel weights, per-token
    activations."""

    name = "fp8"

    def __init__(self, hf_config: dict[str, Any] | None) -> None:
        self.online = hf_config is None
        cfg = hf_config or {}
        self.ignored = list(cfg.get("ignored_layers") or cfg.get("modules_to_not_convert") or [])
        act = cfg.get("activation_scheme", "dynamic")
        if act not in ("dynamic", "static"):
            raise ValueError(f"fp8 activation_scheme {act!r} is not supported (dynamic, static)")
        block = cfg.get("weight_block_size")
        fmt = cfg.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"fp8 fmt {fmt!r} is not supported (e4m3)")
        if self.online:
            self.method = Fp8LinearMethod("channel", "token", None, checkpoint_fp8=False)
        elif block is not None:
            if len(block) != 2:
                raise ValueError(f"fp8 weight_block_size {block!r} must be [rows, cols]")
            if act != "dynamic":
                raise ValueError("fp8 block-wise weights need activation_scheme 'dynamic'")
            self.method = Fp8LinearMethod(
                "block", "group", (int(block[0]), int(block[1])), scale_leaf="weight_scale_inv"
            )
        else:
            self.method = Fp8LinearMethod("tensor", "tensor" if act == "static" else "token", None)

    def linear_method(self, prefixes: list[str]) -> LinearMethod:
        return one_method(
            prefixes,
            lambda p: (
                UNQUANTIZED
                if matches(p, self.ignored) or p.split(".")[-1] == "lm_head"
                else self.method
            ),
            "fp8",
        )

    def describe(self) -> str:
        return (
            "fp8 (online, per-channel)" if self.online else f"fp8 ({self.method.weight_strategy})"
        )


FORMATS["fp8"] = Fp8Config
