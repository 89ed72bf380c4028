"""`graphwise explain`: per batch size, where a decode step's time goes and whether CUDA graphs
pay here, with the reason. See graphwise/insight/explain.py and docs/why.md.

    graphwise explain --preset qwen2.5-7b --batch-sizes 1,8,32,128 --output-dir out/
    graphwise explain --preset qwen2.5-7b --emulate-bandwidth 1.0e12   # a 4090-like card
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from graphwise.config import add_engine_args, engine_config_from_args

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", default="1,8,32,128", help="comma-separated")
    parser.add_argument(
        "--context-len", type=int, default=256, help="tokens of context per sequence"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode and size")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument(
        "--engine-steps",
        type=int,
        default=8,
        help="also time this many decode steps through engine.step() (0: skip)",
    )
    parser.add_argument("--output-dir", default="explain-out")
    parser.add_argument(
        "--emulate-bandwidth",
        type=float,
        default=None,
        metavar="BYTES_PER_S",
        help="add GPU-side delay per layer as if memory bandwidth were this (e.g. 1.0e12)",
    )
    parser.add_argument(
        "--nvtx", action="store_true", help="NVTX ranges around engine phases (Nsight Systems)"
    )
    parser.add_argument("--no-trace", dest="trace", action="store_false")
    add_engine_args(parser)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(b) for b in str(text).split(",") if b.strip()})
    except ValueError as exc:
        raise ValueError(f"--batch-sizes must list integers, got {text!r}") from exc
    if not sizes or sizes[0] < 1:
        raise ValueError("--batch-sizes must list positive integers")
    return sizes


def run(args: argparse.Namespace) -> int:
    from graphwise.engine.engine import LLMEngine
    from graphwise.insight.explain import ExplainSettings, format_report, run_explain

    sizes = _batch_sizes(args.batch_sizes)
    if args.context_len < 2:
        raise ValueError("--context-len must be at least 2")
    if args.tensor_parallel_size * args.pipeline_parallel_size > 1:
        # It times rank 0's forward alone: under TP/PP the other ranks would not join its
        # collectives (the step would hang).
        raise ValueError("explain runs on one GPU: drop --tensor/--pipeline-parallel-size")
    if args.steps < 1 or args.warmup_steps < 0 or args.engine_steps < 0:
        raise ValueError("--steps must be >= 1, --warmup-steps and --engine-steps >= 0")
    if args.emulate_bandwidth is not None and args.emulate_bandwidth <= 0:
        raise ValueError("--emulate-bandwidth must be positive bytes per second")
    block = args.block_size
    max_model_len = args.max_model_len or args.context_len + args.engine_steps + 2 * block
    if max_model_len <= args.context_len:
        raise ValueError("--max-model-len must exceed --context-len")
    overrides: dict[str, Any] = dict(
        max_num_seqs=max(sizes),
        max_model_len=max_model_len,
        enable_prefix_caching=False,
        # explain captures its own graphs, one per batch size asked; the engine captures none
        cuda_graph="off",
        enforce_eager=False,
    )
    if args.kv_cache_memory is None and args.num_gpu_blocks_override is None:
        per_seq = -(-max_model_len // block)
        overrides["num_gpu_blocks_override"] = max(sizes) * per_seq + 1
    engine = LLMEngine(engine_config_from_args(args, **overrides))
    settings = ExplainSettings(
        batch_sizes=sizes,
        context_len=args.context_len,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        engine_steps=args.engine_steps,
        min_speedup=args.cuda_graph_min_speedup,
        emulate_bandwidth=args.emulate_bandwidth,
        nvtx=args.nvtx,
        graphs=args.cuda_graph != "off" and not args.enforce_eager,
        output_dir=Path(args.output_dir),
        trace=args.trace,
    )
    report = run_explain(engine, settings)
    print(format_report(report))
    print(f"wrote {Path(args.output_dir) / 'explain.json'}")
    return 0
