"""Decode-attention launch settings for a bf16 and an FP8 KV cache, at one serving shape.

Issue 17 item 5: at batch 64 and 4096 tokens of context (Qwen2.5-7B's 28 x 4 KV heads of 128),
the FP8 cache read half the bytes but the decode kernel took as long as with bf16 (3.88 ms bf16
vs 4.12 ms fp8 a step on the H200, benchmarks/results/kv-fp8-h200.json): the kernel streamed
bf16 at ~3.9 TB/s and fp8 at ~1.8. One suspect is the tile: BLOCK_N comes from the query's
element size, so an FP8 tile moves half the bytes per loop step. This sweeps BLOCK_N, warps and
stages for both caches, one layer's kernel timed with CUDA events, and writes the table.

    python3 scripts/decode_tile_sweep.py --output out/decode-tiles-h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from graphwise.kernels.decode_attention import decode_attention


def _time(fn, iters: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--q-heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    b, ctx, hq, hkv, d, ps = (
        args.batch, args.context, args.q_heads, args.kv_heads, args.head_dim, args.page_size
    )  # fmt: skip
    blocks_per_seq = ctx // ps
    num_blocks = b * blocks_per_seq
    # Shuffled block ids: a serving cache's pages are not contiguous.
    tables = torch.randperm(num_blocks, device=dev, dtype=torch.int32).view(b, blocks_per_seq)
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=dev)
    k16 = torch.randn(num_blocks, ps, hkv, d, dtype=torch.bfloat16, device=dev)
    v16 = torch.randn_like(k16)
    k8, v8 = k16.to(torch.float8_e4m3fn), v16.to(torch.float8_e4m3fn)
    ref = decode_attention(q, k8.to(torch.bfloat16), v8.to(torch.bfloat16), tables, seq_lens, 0.088)
    rows = []
    for name, (k, v) in {"bf16": (k16, v16), "fp8": (k8, v8)}.items():
        kv_bytes = 2 * k.numel() * k.element_size()
        for block_n, warps, stages in itertools.product((32, 64, 128, 256), (4, 8), (2, 3, 4)):
            try:
                out = decode_attention(
                    q, k, v, tables, seq_lens, 0.088,
                    block_n=block_n, num_warps=warps, num_stages=stages,
                )  # fmt: skip
                ms = _time(
                    lambda k=k, v=v, bn=block_n, w=warps, s=stages: decode_attention(
                        q, k, v, tables, seq_lens, 0.088, block_n=bn, num_warps=w, num_stages=s
                    )
                )
            except Exception as error:  # out of shared memory / registers: record and go on
                rows.append({"kv": name, "block_n": block_n, "num_warps": warps,
                             "num_stages": stages, "error": str(error)[:200]})  # fmt: skip
                continue
            err = float((out.float() - ref.float()).abs().max()) if name == "fp8" else None
            row = {
                "kv": name, "block_n": block_n, "num_warps": warps, "num_stages": stages,
                "ms": round(ms, 4), "tb_per_s": round(kv_bytes / ms / 1e9, 3), "max_err": err,
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    best = {}
    for name in ("bf16", "fp8"):
        ok = [r for r in rows if r["kv"] == name and "ms" in r]
        if ok:
            best[name] = min(ok, key=lambda r: r["ms"])
    out = {
        "benchmark": "decode attention launch settings, bf16 vs fp8 KV (issue 17 item 5)",
        "shape": vars(args),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "git_commit": os.environ.get("GRAPHWISE_COMMIT"),
        "rows": rows,
        "best": best,
    }
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2)
    print("best", json.dumps(best))


if __name__ == "__main__":
    main()
