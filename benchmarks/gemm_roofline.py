"""Decode GEMMs against both roofs: why a decode step at large batch cannot reach its byte floor.

The byte floor (weights + KV over copy bandwidth) assumes a step is bound by memory. At batch B
each weight byte feeds 2B/2 = B flops (bf16), so past B of a few hundred the GEMMs are bound by
arithmetic instead. For Qwen2.5-7B's decode GEMMs (qkv, o, gate_up, down, LM head) at each batch
this times cuBLAS (torch.nn.functional.linear, as graphwise runs it, as CUDA-graph replays) and
reports achieved TB/s and TFLOP/s, next to a large square matmul (the practical arithmetic peak)
and the copy bandwidth. The per-step "roofline floor" sums max(bytes / bandwidth, flops / peak)
over the model's GEMMs.
    PYTHONPATH=. python3 benchmarks/gemm_roofline.py [--batches 64,128,256] [--output FILE]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from graphwise.insight.system import copy_bandwidth, cuda_graph_ms, environment
from graphwise.models.loader import PRESET_DIR


def gemm_shapes(cfg: dict) -> dict[str, tuple[int, int, int]]:
    """name -> (N, K, count per step) for the decode GEMMs of one step."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    return {
        "qkv": (h + 2 * kv, h, layers),
        "o": (h, h, layers),
        "gate_up": (2 * i, h, layers),
        "down": (h, i, layers),
        "lm_head": (cfg["vocab_size"], h, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2.5-7b")
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    dt = torch.bfloat16
    cfg = json.loads((PRESET_DIR / f"{args.preset}.json").read_text())
    bandwidth = copy_bandwidth(dev)
    n = 8192
    a, b = torch.randn(n, n, dtype=dt, device=dev), torch.randn(n, n, dtype=dt, device=dev)
    peak = 2 * n**3 / (cuda_graph_ms(lambda: a @ b, calls=5, reps=10) / 1e3)
    del a, b
    print(
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul {n}^3 {peak / 1e12:.0f} TFLOP/s"
    )
    rows = []
    for batch in [int(x) for x in args.batches.split(",")]:
        step = {"gemm_ms": 0.0, "byte_floor_ms": 0.0, "flop_floor_ms": 0.0, "roofline_ms": 0.0}
        for name, (nn, k, count) in gemm_shapes(cfg).items():
            w = torch.randn(nn, k, dtype=dt, device=dev) * 0.02
            x = torch.randn(batch, k, dtype=dt, device=dev)
            ms = cuda_graph_ms(lambda: F.linear(x, w), calls=10, reps=10)
            nbytes = 2 * (nn * k + batch * k + batch * nn)
            flops = 2 * batch * nn * k
            byte_ms, flop_ms = nbytes / bandwidth * 1e3, flops / peak * 1e3
            row = {
                "batch": batch,
                "gemm": name,
                "n": nn,
                "k": k,
                "count": count,
                "ms": ms,
                "tb_per_s": nbytes / ms / 1e9,
                "tflop_per_s": flops / ms / 1e9,
                "byte_floor_ms": byte_ms,
                "flop_floor_ms": flop_ms,
                "x_roofline": ms / max(byte_ms, flop_ms),
            }
            rows.append(row)
            step["gemm_ms"] += ms * count
            step["byte_floor_ms"] += byte_ms * count
            step["flop_floor_ms"] += flop_ms * count
            step["roofline_ms"] += max(byte_ms, flop_ms) * count
            print(
                f"B={batch:>4} {name:>8} {ms * 1e3:8.1f} us  {row['tb_per_s']:5.2f} TB/s  "
                f"{row['tflop_per_s']:5.0f} TFLOP/s  {row['x_roofline']:.2f}x roofline"
            )
            del w, x
        step["batch"] = batch
        rows.append({"batch": batch, "gemm": "step", **step})
        print(
            f"B={batch:>4}     step GEMMs {step['gemm_ms']:.2f} ms; byte floor "
            f"{step['byte_floor_ms']:.2f}, flop floor {step['flop_floor_ms']:.2f}, roofline "
            f"{step['roofline_ms']:.2f} ms"
        )
    result = {
        "benchmark": "gemm_roofline",
        "preset": args.preset,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "matmul_peak_flop_per_s": peak,
        "environment": environment(dev),
        "rows": rows,
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
