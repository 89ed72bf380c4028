# ruff: noqa: B023  (the timed closures run before the loop moves on)
"""FP8 GEMM paths on this GPU at Qwen2.5-7B's projection shapes: bf16 F.linear, W8A8 through
`_scaled_mm` (with its per-token activation quantization kernel), the weight-only Triton
skinny kernel (small M), and the Triton block-scaled GEMM (with its per-group quantization).
Times are CUDA-graph replays (as decode runs them), median of 50.

    python3 benchmarks/fp8_gemm_bench.py --output fp8-gemm-h200.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from graphwise.insight.system import cuda_graph_ms
from graphwise.kernels import fp8 as k
from graphwise.layers.quantization.fp8 import quantize_blocks, quantize_rows

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}


def _time(fn, reps: int = 50) -> float:
    """Median microseconds of one call, as replays of a graph of 10 calls."""
    return cuda_graph_ms(fn, calls=10, reps=reps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default=None)
    ap.add_argument("--ms", default="1,8,16,64")
    args = ap.parse_args()
    rows = []
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        wq, ws = quantize_rows(w)
        wb, wbs = quantize_blocks(w, 128, 128)
        sb = ws.view(1, -1)
        for M in (int(m) for m in args.ms.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)

            def scaled():
                q, sa = k.per_token_group_quant_fp8(x)
                return torch._scaled_mm(q, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

            def block():
                q, sa = k.per_token_group_quant_fp8(x, 128)
                return k.w8a8_block_fp8_matmul(q, wb, sa, wbs, 128, 128, torch.bfloat16)

            row = {
                "shape": name,
                "N": N,
                "K": K,
                "M": M,
                "bf16_us": _time(lambda: F.linear(x, w)),
                "scaled_mm_us": _time(scaled),
                "block_triton_us": _time(block),
                "fp8_bytes_floor_us": N * K / 4.8e12 * 1e6,
            }
            if M <= 16:
                row["skinny_us"] = _time(lambda: k.fp8_skinny_matmul(x, wq, ws))  # auto split-K
                for bn, bk, sk in ((32, 256, 1), (32, 512, None), (64, 256, None)):
                    row[f"skinny_{bn}x{bk}_split{sk}_us"] = _time(
                        lambda bn=bn, bk=bk, sk=sk: k.fp8_skinny_matmul(x, wq, ws, None, bn, bk, sk)
                    )
            rows.append(row)
            print({k_: round(v, 1) if isinstance(v, float) else v for k_, v in row.items()})
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
