"""CUDA-graph capture cost for every bucket up to 256 (issue 3: <= 5 s, pool <= 256 MB).
PYTHONPATH=. python3 benchmarks/capture_bench.py --output FILE
"""

from __future__ import annotations

import argparse
import json

from graphwise import LLM
from graphwise.insight.system import environment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2.5-7b")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    llm = LLM(
        preset=args.preset,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        cuda_graph="on",
    )
    engine = llm.llm_engine
    stats = engine.runner.graph_runner.stats
    result = {
        "benchmark": "cuda_graph_capture",
        "preset": args.preset,
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": args.max_model_len,
        "buckets": stats.buckets,
        "capture_seconds": stats.seconds,
        "pool_bytes": stats.pool_bytes,
        "failed": stats.failed,
        "memory_plan": engine.memory_plan.as_dict(),
        "environment": environment(engine.device),
    }
    print(
        f"{len(stats.buckets)} graphs (1..{stats.buckets[-1]}) captured in {stats.seconds:.2f} s, "
        f"pool {stats.pool_bytes / 2**20:.1f} MiB"
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
