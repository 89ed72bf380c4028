"""The MoE layer's two paths at decode sizes: grouped GEMM (moe_align + tl.dot) vs streaming GEMV.

For Mixtral-8x7B's and Qwen3-30B-A3B's expert shapes (bf16) and each token count, routes random
tokens, then times fused_moe with small_m=False and small_m=True as CUDA-graph replays with L2
flushed before each (a model's layers never find the previous layer's experts in L2). Reports
the achieved GB/s of the expert bytes the batch has to read (distinct experts hit x their
gate_up + down bytes) and that floor at the measured copy bandwidth; `dispatch` is the path
fused_moe picks by itself. `sweep` times the GEMV path's launch settings at t <= 16, to tune
moe_gemv's constants (TILE_ELEMS, PROGRAMS_PER_SM, NUM_WARPS).
    PYTHONPATH=. python3 scripts/moe_kernel_bench.py --out FILE [--tokens 1,2,4] [--no-sweep]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch

from graphwise.insight.system import copy_bandwidth, environment
from graphwise.kernels import moe_gemv
from graphwise.kernels.fused_moe import fused_moe

SHAPES = {  # name: (experts, top-k, hidden, moe intermediate, fp32 routing weights)
    "mixtral-8x7b": (8, 2, 4096, 14336, True),
    "qwen3-30b-a3b": (128, 8, 2048, 768, False),
}
SWEEP = [  # GEMV launch settings tried at t <= 16 (the first is moe_gemv's default)
    {
        "tile_elems": moe_gemv.TILE_ELEMS,
        "num_warps": moe_gemv.NUM_WARPS,
        "programs_per_sm": moe_gemv.PROGRAMS_PER_SM,
    },
    {"tile_elems": 4096, "num_warps": 8, "programs_per_sm": 8},
    {"tile_elems": 2048, "num_warps": 4, "programs_per_sm": 8},
    {"tile_elems": 8192, "num_warps": 4, "programs_per_sm": 8},
    {"tile_elems": 8192, "num_warps": 8, "programs_per_sm": 8},
    {"tile_elems": 4096, "num_warps": 4, "programs_per_sm": 4},
    {"tile_elems": 4096, "num_warps": 4, "programs_per_sm": 16},
]


class Timer:
    """Median GPU milliseconds of a CUDA graph's replays, L2 flushed before each."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.flush = torch.empty(512 << 20, dtype=torch.uint8, device=device)
        self.reps = reps

    def __call__(self, fn) -> float:
        fn()  # compile
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        del graph
        return statistics.median(times)


def gemv_with(config: dict, x, wgu, wd, w, ids):
    def fn():
        moe_gemv.PROGRAMS_PER_SM = config["programs_per_sm"]
        return moe_gemv.fused_moe_small_m(
            x,
            wgu,
            wd,
            w,
            ids,
            tile_elems=config["tile_elems"],
            num_warps=config["num_warps"],
        )

    return fn


def bench_shape(name: str, tokens: list[int], timer: Timer, bw: float, sweep_on: bool):
    """(rows, sweep rows) for one expert shape."""
    e, k, h, i, fp32_routing = SHAPES[name]
    dev = timer.flush.device
    torch.manual_seed(0)
    wgu = torch.empty(e, 2 * i, h, device=dev, dtype=torch.bfloat16).uniform_(-0.02, 0.02)
    wd = torch.empty(e, h, i, device=dev, dtype=torch.bfloat16).uniform_(-0.02, 0.02)
    per_expert = (wgu[0].numel() + wd[0].numel()) * wgu.element_size()
    default = SWEEP[0]
    rows, sweep = [], []
    for t in tokens:
        x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
        w, ids = torch.randn(t, e, device=dev).softmax(-1).topk(k, dim=-1)
        if not fp32_routing:
            w = w.bfloat16()
        hit = int(torch.unique(ids).numel())
        nbytes = hit * per_expert
        grouped_fn = functools.partial(fused_moe, x, wgu, wd, w, ids, small_m=False)
        gemv_fn = gemv_with(default, x, wgu, wd, w, ids)
        grouped, gemv = timer(grouped_fn), timer(gemv_fn)
        a, b = grouped_fn().float(), gemv_fn().float()
        picked = "gemv" if moe_gemv.use_small_m(t, k, e) else "grouped"
        row = {
            "shape": name,
            "tokens": t,
            "pairs": t * k,
            "experts_hit": hit,
            "expected_reread": round(moe_gemv.expected_reread(t, k, e), 3),
            "expert_bytes": nbytes,
            "floor_ms": nbytes / bw * 1e3,
            "grouped_ms": grouped,
            "gemv_ms": gemv,
            "grouped_gbps": nbytes / grouped / 1e6,
            "gemv_gbps": nbytes / gemv / 1e6,
            "dispatch": picked,
            "gemv_vs_grouped_rel_diff": float((a - b).norm() / a.norm()),
        }
        rows.append(row)
        print(
            f"{name:14s} t={t:3d} experts {hit:3d} floor {row['floor_ms']:.4f} ms | grouped "
            f"{grouped:.4f} ms {row['grouped_gbps']:5.0f} GB/s | gemv {gemv:.4f} ms "
            f"{row['gemv_gbps']:5.0f} GB/s | picks {picked} | "
            f"diff {row['gemv_vs_grouped_rel_diff']:.1e}",
            flush=True,
        )
        if not sweep_on or t > 16:
            continue
        for config in SWEEP[1:]:
            ms = timer(gemv_with(config, x, wgu, wd, w, ids))
            sweep.append(
                {"shape": name, "tokens": t, **config, "ms": ms, "gbps": nbytes / ms / 1e6}
            )
            print(f"    {config} {ms:.4f} ms {nbytes / ms / 1e6:5.0f} GB/s", flush=True)
        moe_gemv.PROGRAMS_PER_SM = default["programs_per_sm"]
    return rows, sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-sweep", action="store_true", help="skip the GEMV launch-setting sweep")
    args = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, args.reps)
    bw = copy_bandwidth(dev)
    tokens = [int(v) for v in args.tokens.split(",")]
    rows, sweep = [], []
    for name in args.shapes.split(","):
        shape_rows, shape_sweep = bench_shape(name, tokens, timer, bw, not args.no_sweep)
        rows += shape_rows
        sweep += shape_sweep
        torch.cuda.empty_cache()
    # Where the GEMV path wins, and the re-read factor there: what SMALL_M_MAX_REREAD should be.
    crossover = {}
    for name in {r["shape"] for r in rows}:
        wins = [r for r in rows if r["shape"] == name and r["gemv_ms"] < r["grouped_ms"]]
        crossover[name] = {
            "gemv_faster_at_tokens": [r["tokens"] for r in wins],
            "max_expected_reread_won": max((r["expected_reread"] for r in wins), default=None),
        }
        print(f"{name}: GEMV faster at t={crossover[name]['gemv_faster_at_tokens']}", flush=True)
    keys = ["E", "k", "H", "I", "fp32_routing"]
    result = {
        "benchmark": "moe_kernels",
        "what": "fused_moe grouped GEMM vs GEMV path, CUDA-graph replay with L2 flushed, bf16",
        "shapes": {n: dict(zip(keys, s, strict=True)) for n, s in SHAPES.items()},
        "small_m_max_reread": moe_gemv.SMALL_M_MAX_REREAD,
        "gemv_default": SWEEP[0],
        "copy_bandwidth_bytes_per_s": bw,
        "environment": environment(dev),
        "rows": rows,
        "crossover": crossover,
        "sweep": sweep,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
