"""MoE layer time vs the floor of the expert weights it actually reads (issue 9's MoE target).

Qwen2-57B-A14B's MoE shape (64 experts, top-8, H 3584, I 2560, bf16): for each token count,
route random tokens, count the distinct experts hit, and compare the fused Triton layer (timed
as CUDA-graph replays) with the per-expert PyTorch loop and with bytes / copy bandwidth.
    PYTHONPATH=. python3 benchmarks/moe_bench.py [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from graphwise.insight.system import copy_bandwidth, cuda_graph_ms, environment
from graphwise.kernels.fused_moe import fused_moe
from graphwise.layers.moe import SparseMoE


def eager_ms(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,8,32,64,256,1024")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    E, K, H, I = 64, 8, 3584, 2560
    torch.manual_seed(0)
    with torch.device(dev):
        moe = SparseMoE(H, E, K, I, norm_topk_prob=False).to(torch.bfloat16)
        moe.w_gate_up.data.uniform_(-0.02, 0.02)
        moe.w_down.data.uniform_(-0.02, 0.02)
        moe.gate.weight.data.uniform_(-0.02, 0.02)
    bw = copy_bandwidth(dev)
    per_expert = (2 * I * H + H * I) * 2
    rows = []
    for t in [int(v) for v in args.tokens.split(",")]:
        x = torch.randn(t, H, device=dev, dtype=torch.bfloat16)
        weights, ids = moe.route(x)
        hit = int(torch.unique(ids).numel())
        floor_ms = hit * per_expert / bw * 1e3
        fused = cuda_graph_ms(lambda: fused_moe(x, moe.w_gate_up, moe.w_down, weights, ids))
        ref = None
        if t <= 256:  # the per-expert loop (the layer without Triton), for comparison
            ref = eager_ms(lambda: moe.experts_forward(x, weights, ids))
        rows.append(
            {
                "tokens": t,
                "experts_hit": hit,
                "bytes_read": hit * per_expert,
                "floor_ms": floor_ms,
                "fused_ms": fused,
                "x_floor": fused / floor_ms,
                "torch_loop_ms": ref,
            }
        )
        print(
            f"T={t:5d} experts {hit:2d} floor {floor_ms:7.3f} ms  fused {fused:7.3f} ms "
            f"({fused / floor_ms:4.2f}x)  torch loop {ref if ref is None else round(ref, 3)} ms"
        )
    result = {
        "benchmark": "moe_layer",
        "shape": {"experts": E, "top_k": K, "hidden": H, "moe_intermediate": I, "dtype": "bf16"},
        "copy_bandwidth_bytes_per_s": bw,
        "environment": environment(dev),
        "rows": rows,
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
