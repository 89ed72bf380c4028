"""Microbenchmark of the packed-weight GEMV/GEMM kernels (GGUF and INT4) against bf16 F.linear.

For each format at Qwen2.5-7B-like shapes and each M: kernel time (triton.testing.do_bench,
median), GB/s of the packed weight bytes, the bf16 F.linear time of the same shape, and the
max error against an fp32 dequantize-then-matmul reference, relative to max |reference|.
Times are CUDA-graph replays (triton.testing.do_bench_cudagraph): the GPU time, without the
host's launch overhead. Writes {"meta", "rows"} JSON to --out.  Needs a CUDA GPU.
  python scripts/quant_kernel_bench.py --out out/quant-kernels.json [--formats Q4_K,awq] [--m 1,8,64]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, out_features, in_features) of one Qwen2.5-7B layer (hidden 3584, intermediate 18944,
# 28 q heads + 4 kv heads of 128 fused into qkv).
SHAPES = [("qkv", 4608, 3584), ("o", 3584, 3584), ("up", 18944, 3584), ("down", 3584, 18944)]
GGUF_FORMATS = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]
INT4_FORMATS = ["awq", "gptq"]


def _bench(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (as the engine runs decode), so that the
    host's launch overhead of these few-microsecond kernels is not what gets measured."""
    import triton.testing

    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def _gguf_case(fmt: str, n: int, k: int, dev: str):
    from graphwise.kernels import gguf_quant as gq

    packed = gq.random_packed(fmt, n, k, dev, seed=n + k)
    w = gq.dequantize(packed, fmt, k)
    return packed.numel(), w, lambda x: gq.gguf_linear(x, packed, fmt, n, k)


def _int4_case(fmt: str, n: int, k: int, dev: str):
    from graphwise.kernels import int4_quant as iq

    qweight, scales, zeros = iq.random_int4(fmt, n, k, 128, dev, seed=n + k)
    w = iq.dequantize(qweight, scales, zeros, 128, fmt).t()  # [out, in]
    nbytes = qweight.numel() * 4 + scales.numel() * scales.element_size() + zeros.numel() * 4
    return nbytes, w, lambda x: iq.int4_linear(x, qweight, scales, zeros, 128, fmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--formats", default=",".join(GGUF_FORMATS + INT4_FORMATS))
    ap.add_argument("--m", default="1,8,64", help="comma-separated token counts")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument(
        "--grouped-gemv",
        action="store_true",
        help="GGUF M=1 through the per-group-scale GEMV kernel (gguf_quant.GROUPED_GEMV)",
    )
    args = ap.parse_args()
    if args.grouped_gemv:
        from graphwise.kernels import gguf_quant

        gguf_quant.GROUPED_GEMV = True
    if not torch.cuda.is_available():
        raise SystemExit("quant_kernel_bench needs a CUDA GPU")
    dev = "cuda"
    ms = [int(v) for v in args.m.split(",")]
    shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]
    rows = []
    for fmt in args.formats.split(","):
        for sname, n, k in shapes:
            case = _gguf_case if fmt in GGUF_FORMATS else _int4_case
            nbytes, w, fn = case(fmt, n, k, dev)
            w_bf16 = w.to(torch.bfloat16)
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                y = fn(x).float()
                ref = x.float() @ w.float().t()
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                t_q = _bench(partial(fn, x))
                t_bf16 = _bench(partial(F.linear, x, w_bf16))
                row = {
                    "format": fmt,
                    "shape": sname,
                    "out_features": n,
                    "in_features": k,
                    "m": m,
                    "kernel_ms": round(t_q, 5),
                    "bf16_linear_ms": round(t_bf16, 5),
                    "speedup_vs_bf16": round(t_bf16 / t_q, 3),
                    "packed_bytes": nbytes,
                    "packed_gbps": round(nbytes / t_q / 1e6, 1),
                    "bf16_gbps": round(n * k * 2 / t_bf16 / 1e6, 1),
                    "max_rel_err": err,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            del w, w_bf16
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import os

    import triton

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": os.environ.get("GRAPHWISE_COMMIT", "unknown"),
        "gguf_grouped_gemv": args.grouped_gemv,
        "timing": "triton.testing.do_bench_cudagraph median, ms",
        "max_rel_err": "max|y - ref| / max|ref|, ref = fp32 x @ fp32 dequant(W)^T; bf16 x",
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
