"""`graphwise bench offline`: in-process generation throughput through `graphwise.LLM`.

The fixed workload: 256 sequences, input and output lengths uniform in 100-1024 (inclusive),
random token ids from the tokenizer's vocabulary (special tokens excluded), seed 0, `ignore_eos`,
temperature 0. `--num-prompts`, `--input-len-range` and `--output-len-range` shrink it. A short
warm-up generation of 16 of its prompts (not timed, prefix cache reset after) goes first, so lazy
compilation does not land in the timing.

    graphwise bench offline --preset qwen2.5-7b --load-format dummy --output offline.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from graphwise.bench.datasets import allowed_token_ids, random_token_workload
from graphwise.config import EngineConfig, add_engine_args, engine_config_from_args
from graphwise.insight.system import environment as system_environment
from graphwise.insight.system import git_commit

logger = logging.getLogger(__name__)

DEFAULT_NUM_PROMPTS = 256
DEFAULT_LEN_RANGE = (100, 1024)
WARMUP_TOKENS = 4
WARMUP_PROMPTS = 16


def parse_len_range(text: str) -> tuple[int, int]:
    """'LOW-HIGH', 'LOW,HIGH' or 'N' (inclusive) -> (low, high)."""
    parts = text.replace(",", "-").split("-")
    try:
        values = [int(p) for p in parts if p.strip()]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not 1 <= values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return values[0], values[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    w = parser.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS)
    w.add_argument(
        "--input-len-range",
        type=parse_len_range,
        default=DEFAULT_LEN_RANGE,
        metavar="LOW-HIGH",
        help="prompt lengths, uniform and inclusive (default 100-1024)",
    )
    w.add_argument(
        "--output-len-range",
        type=parse_len_range,
        default=DEFAULT_LEN_RANGE,
        metavar="LOW-HIGH",
        help="output lengths, uniform and inclusive (default 100-1024)",
    )
    w.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one short untimed generation first (default: on)",
    )
    w.add_argument(
        "--compare-async-scheduling",
        action="store_true",
        help="run the workload twice, async scheduling on then off, and report both",
    )
    w.add_argument(
        "--step-breakdown",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="record each step's host and wait time, decode steps against their floor",
    )
    w.add_argument(
        "--save-step-records",
        action="store_true",
        help="also write every step's record (seqs, tokens, host and wait times) to the JSON",
    )
    w.add_argument("--output", default=None, metavar="FILE", help="write the result JSON here")
    w.add_argument("--disable-tqdm", action="store_true")


def engine_kwargs(config: EngineConfig) -> dict[str, Any]:
    """The options that differ from EngineConfig's defaults, as `LLM(**kwargs)` takes them."""
    defaults = EngineConfig()
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(EngineConfig)
        if f.name != "extra" and getattr(config, f.name) != getattr(defaults, f.name)
    }


def environment() -> tuple[dict[str, Any], dict[str, Any]]:
    """(device, versions) of this process: insight.system's report in vLLM's layout."""
    env = system_environment()
    versions = {k: env.get(k) for k in ("graphwise", "torch", "cuda", "transformers", "triton")}
    versions["python"] = env["python"]
    if env["device_type"] == "cuda":
        device = {
            "type": "cuda",
            "name": env["device_name"],
            "count": env["device_count"],
            "capability": env["capability"],
            "memory_gib": round(env["gpu_memory_bytes"] / 2**30, 1),
            "driver": env["driver"],
        }
    else:
        device = {
            "type": "cpu",
            "name": env["device_name"],
            "cores": env["cpu_cores"],
            "torch_threads": env["cpu_threads"],
        }
    return device, versions


def _model_name(config: EngineConfig) -> str:
    if config.preset:
        return config.preset
    if config.model:
        return config.model
    try:
        from graphwise.models.default import DEFAULT_MODEL_NAME
    except ImportError:
        return "default"
    return f"{DEFAULT_MODEL_NAME} (embedded)"


def format_result(result: dict[str, Any]) -> str:
    device = result["device"]
    lines = [
        " Offline Throughput ".center(50, "="),
        f"{'Model:':<32}{result['model']}",
        f"{'Device:':<32}{device.get('name')} ({device.get('type')})",
        f"{'Requests:':<32}{result['num_requests']}",
        f"{'Input / output tokens:':<32}{result['total_input_tokens']} / "
        f"{result['total_output_tokens']}",
        f"{'Elapsed (s):':<32}{result['elapsed_time']:.2f}",
        f"{'Requests/s:':<32}{result['requests_per_second']:.2f}",
        f"{'Output tokens/s:':<32}{result['output_tokens_per_second']:.1f}",
        f"{'Total tokens/s:':<32}{result['tokens_per_second']:.1f}",
        *(
            f"{'Async scheduling ' + ('on' if r['async_scheduling'] else 'off') + ':':<32}"
            f"{r['output_tokens_per_second']:.1f} output tok/s, {r['elapsed_time']:.2f} s"
            for r in result.get("runs", [])
        ),
        f"{'Versions:':<32}"
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v is not None),
        "=" * 50,
    ]
    return "\n".join(lines)


def _floor_inputs(engine: Any) -> dict[str, Any]:
    """Weights, KV bytes per token and the copy bandwidth: a decode step's floor is
    (weights + KV read) / bandwidth. The bandwidth is measured on CUDA only."""
    from graphwise.insight.system import copy_bandwidth

    device = engine.device
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    return {
        "weights": engine.memory_plan.weights_bytes,
        "kv_per_token": engine.executor.driver.kv_bytes_per_token(),
        "bandwidth": bandwidth,
    }


def _timed_run(
    llm: Any,
    prompts: list[dict[str, Any]],
    params: list[Any],
    workload: list[tuple[list[int], int]],
    async_scheduling: bool,
    floor: dict[str, Any] | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    from graphwise.engine.engine import LLMEngine
    from graphwise.insight.step_log import StepLog, format_summary

    engine = llm.llm_engine
    single = isinstance(engine, LLMEngine)  # not the data-parallel front (replicas elsewhere)
    log = StepLog() if floor is not None and single else None
    if single:
        engine.drain()  # nothing in flight from an earlier run
        engine.async_scheduling = async_scheduling
        llm.reset_prefix_cache()  # an earlier run of the same prompts must not lend it its KV
        engine.step_log = log
    try:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm)
        elapsed = time.perf_counter() - start
    finally:
        if single:
            engine.step_log = None
    total_input = sum(len(o.prompt_token_ids) for o in outputs)
    total_output = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    expected_output = sum(n for _, n in workload)
    if len(outputs) != len(workload) or total_output != expected_output:
        logger.warning(
            "got %d outputs with %d tokens; expected %d with %d tokens",
            len(outputs),
            total_output,
            len(workload),
            expected_output,
        )
    run: dict[str, Any] = {
        "async_scheduling": async_scheduling,
        "num_requests": len(outputs),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "total_num_tokens": total_input + total_output,
        "elapsed_time": elapsed,
        "requests_per_second": len(outputs) / elapsed,
        "output_tokens_per_second": total_output / elapsed,
        "tokens_per_second": (total_input + total_output) / elapsed,
    }
    if log is not None and floor is not None:
        run["step_breakdown"] = log.summary(
            floor["weights"], floor["kv_per_token"], floor["bandwidth"]
        )
        if args.save_step_records:
            run["step_records"] = log.to_json()
        print(f"async scheduling {'on' if async_scheduling else 'off'}: where the time went")
        print(format_summary(run["step_breakdown"]))
    return run


def run(args: argparse.Namespace) -> int:
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be positive, got {args.num_prompts}")
    config = engine_config_from_args(args)
    single = config.data_parallel_size == 1
    if not single and args.compare_async_scheduling:  # refused before anything loads
        raise ValueError("--compare-async-scheduling needs data_parallel_size 1")
    kwargs = engine_kwargs(config)
    from graphwise import LLM, SamplingParams

    logger.info("building LLM(%s)", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
    llm = LLM(**kwargs)
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:  # a preset with dummy weights: any id of the model's vocabulary
        vocab = np.arange(llm.llm_engine.model_config.vocab_size, dtype=np.int64)
    else:
        vocab = allowed_token_ids(tokenizer)
    workload = random_token_workload(
        vocab, args.num_prompts, args.input_len_range, args.output_len_range, seed=config.seed
    )
    prompts = [{"prompt_token_ids": ids} for ids, _ in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in workload]

    if args.warmup:
        # A few of the workload's prompts, so that chunked prefill mixed with decode (and any
        # kernel compilation for those shapes) happens before the clock starts.
        llm.generate(
            prompts[:WARMUP_PROMPTS],
            SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS, ignore_eos=True),
            use_tqdm=False,
        )
    engine = llm.llm_engine
    if not single and args.step_breakdown:
        logger.info("data parallelism: no step breakdown (the replicas' steps run elsewhere)")
    floor = _floor_inputs(engine) if args.step_breakdown and single else None
    modes = [True, False] if args.compare_async_scheduling else [config.async_scheduling]
    runs = []
    for mode in modes:
        runs.append(_timed_run(llm, prompts, params, workload, mode, floor, args))

    first = runs[0]
    expected_output = sum(n for _, n in workload)
    device, versions = environment()
    result = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "model": _model_name(config),
        "engine_args": kwargs,
        "num_prompts": args.num_prompts,
        "input_len_range": list(args.input_len_range),
        "output_len_range": list(args.output_len_range),
        "seed": config.seed,
        # The first run's figures at the top level, as vLLM's throughput JSON has them.
        **{k: v for k, v in first.items() if k not in ("step_breakdown",)},
        "expected_output_tokens": expected_output,
        "copy_bandwidth_bytes_per_s": floor["bandwidth"] if floor else None,
        "weights_bytes": floor["weights"] if floor else None,
        "kv_bytes_per_token": floor["kv_per_token"] if floor else None,
        "runs": runs,
        "device": device,
        "versions": versions,
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    }
    print(format_result(result))
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"saved {path}")
    return 0
