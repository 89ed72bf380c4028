"""`graphwise bench latency`: per-iteration decode time, graphwise eager vs graph vs HF transformers.

The seed's experiment: fixed batch, short prompt, long output, every decode step timed. Each
figure is also shown as a multiple of the step's floor: the bytes a decode step must read
(weights plus the KV cache so far) over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from graphwise.config import add_engine_args, engine_config_from_args

logger = logging.getLogger(__name__)
# "-sync": async scheduling off for that run (each step waits for its own tokens).
# "-sampling": every request also asks for what --sampling names (logprobs and penalties by
# default), to price the sampling features against the plain step in the same run.
MODES = (
    "eager",
    "graph",
    "eager-sync",
    "graph-sync",
    "eager-sampling",
    "graph-sampling",
    "hf",
    "hf-static",
)
DEFAULT_SAMPLING = {
    "logprobs": 5,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.1,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--warmup-steps", type=int, default=5, help="decode steps not timed")
    parser.add_argument("--compare", default="eager,graph,hf", help=f"any of {','.join(MODES)}")
    parser.add_argument("--output", default=None, help="write the JSON result here")
    parser.add_argument(
        "--sampling",
        default=json.dumps(DEFAULT_SAMPLING),
        help="JSON object of SamplingParams fields every request of a -sampling mode adds",
    )
    add_engine_args(parser)


def parse_sampling(text: str) -> dict[str, Any]:
    """--sampling as SamplingParams fields, checked by building one (a clear error if not)."""
    from graphwise.sampling_params import SamplingParams

    try:
        extra = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--sampling is not valid JSON: {exc}") from exc
    if not isinstance(extra, dict):
        raise ValueError(f"--sampling must be a JSON object, got {text!r}")
    try:
        SamplingParams(**extra)
    except TypeError as exc:
        raise ValueError(f"--sampling: {exc}") from exc
    return extra


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _summary(step_s: list[float], prefill_s: float, warmup: int) -> dict[str, Any]:
    timed = step_s[warmup:] or step_s
    return {
        "prefill_ms": prefill_s * 1e3,
        "decode_median_ms": statistics.median(timed) * 1e3,
        "decode_p90_ms": _percentile(timed, 0.9) * 1e3,
        "decode_mean_ms": statistics.fmean(timed) * 1e3,
        "decode_steps_timed": len(timed),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_graphwise(
    engine: Any,
    batch: int,
    input_len: int,
    output_len: int,
    use_graph: bool,
    seed: int,
    async_scheduling: bool | None = None,
    sampling: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time every engine.step() of one batch. With async scheduling a step() call launches a
    step and waits for the previous one, so in steady state its duration is the pipeline's
    period; the prefill figure is the time until every sequence's first token is known."""
    from graphwise.sampling_params import SamplingParams

    engine.drain()  # nothing in flight from an earlier run
    saved_async = engine.async_scheduling
    if async_scheduling is not None:
        engine.async_scheduling = async_scheduling
    engine.set_cuda_graphs_enabled(use_graph)
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(
        temperature=0, max_tokens=output_len, ignore_eos=True, **(sampling or {})
    )
    waiting_first = {
        engine.add_request(None, params, [rng.randrange(vocab) for _ in range(input_len)])
        for _ in range(batch)
    }
    graph_steps = engine.get_stats().steps_graph
    prefill_s, steps, with_logprobs = 0.0, [], 0
    try:
        _sync(engine.device)
        while engine.has_unfinished_requests():
            prefilling = bool(waiting_first)
            t = time.perf_counter()
            outputs = engine.step()  # ends in the host sync for a step's sampled tokens
            dt = time.perf_counter() - t
            waiting_first.difference_update(o.request_id for o in outputs)
            # Proof the -sampling modes did the work they price: logprobs came back.
            with_logprobs += sum(1 for o in outputs if o.finished and o.outputs[0].logprobs)
            if prefilling:
                prefill_s += dt
            else:
                steps.append(dt)
    finally:
        engine.set_cuda_graphs_enabled(True)
        used_async = engine.async_scheduling
        engine.async_scheduling = saved_async
    m = getattr(engine, "num_micro_batches", 1)
    if m > 1:
        # Pipeline micro-batches: each step() runs one of m batches, so every sequence gets its
        # next token once per m steps: that is the decode period (one token of the batch).
        steps = [sum(steps[i : i + m]) for i in range(0, len(steps) - m + 1, m)]
    return {
        "prefill_s": prefill_s,
        "steps": steps,
        "graph_replays": engine.get_stats().steps_graph - graph_steps,
        "async_scheduling": used_async,
        "requests_with_logprobs": with_logprobs,
    }


def build_hf_model(engine: Any) -> Any:
    """HF transformers' model on exactly the weights graphwise runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(engine.model_config.raw)
    raw["num_hidden_layers"] = engine.model_config.num_hidden_layers
    model_type = (
        raw.pop("model_type", None)
        or {
            "LlamaForCausalLM": "llama",
            "Qwen2ForCausalLM": "qwen2",
            "Qwen2MoeForCausalLM": "qwen2_moe",
            "Qwen3ForCausalLM": "qwen3",
            "Gemma2ForCausalLM": "gemma2",
            "Gemma3ForCausalLM": "gemma3_text",
            "Phi3ForCausalLM": "phi3",
        }[engine.model_config.architecture]
    )
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "gguf_architecture")}
    hf_config = AutoConfig.for_model(model_type, **raw)
    with torch.device(engine.device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=engine.dtype)
    ours = engine.executor.driver.model.hf_state_dict()
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [m for m in missing if "rotary" not in m and not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"HF weight mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()


def measure_hf(
    model: Any, batch: int, input_len: int, output_len: int, static: bool, seed: int
) -> dict[str, Any]:
    from transformers import LogitsProcessor, LogitsProcessorList

    device = next(model.parameters()).device
    stamps: list[float] = []

    class Stamp(LogitsProcessor):  # called once per generated token: marks step boundaries
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            _sync(device)
            stamps.append(time.perf_counter())
            return scores

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, input_len), generator=gen).to(device)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        do_sample=False,
        attention_mask=torch.ones_like(ids),
        pad_token_id=0,
        logits_processor=LogitsProcessorList([Stamp()]),
    )
    if static:
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        if static:  # its compilation happens on the first calls: keep it out of the numbers
            t = time.perf_counter()
            model.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})
            warm = time.perf_counter() - t
            stamps.clear()
        _sync(device)
        start = time.perf_counter()
        model.generate(ids, **kwargs)
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    out: dict[str, Any] = {"prefill_s": stamps[0] - start, "steps": steps}
    if static:
        out["warmup_s"] = warm
    out["hf_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    out["hf_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    return out


def run(args: argparse.Namespace) -> int:
    from graphwise.engine.engine import LLMEngine
    from graphwise.insight.system import copy_bandwidth, environment

    batch_sizes = sorted({int(b) for b in str(args.batch_sizes).split(",") if b})
    modes = [m.strip() for m in str(args.compare).split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"--compare: unknown mode {m!r} (choose from {', '.join(MODES)})")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("--batch-sizes must list positive integers")
    if args.input_len < 1 or args.output_len < 2:
        raise ValueError("--input-len must be >= 1 and --output-len >= 2")
    want_graph = any(m.startswith("graph") for m in modes)
    sampling = parse_sampling(args.sampling)
    overrides: dict[str, Any] = dict(
        max_num_seqs=max(batch_sizes),
        max_model_len=args.max_model_len or args.input_len + args.output_len + args.block_size,
        max_num_batched_tokens=max(
            args.max_num_batched_tokens or 0, max(batch_sizes) * args.input_len, 2048
        ),
        enable_prefix_caching=False,  # every run pays its own prefill
    )
    if args.cuda_graph == "auto":
        overrides["cuda_graph"] = "on" if want_graph and torch.cuda.is_available() else "off"
    if any(m.startswith("hf") for m in modes) and args.gpu_memory_utilization == 0.9:
        overrides["gpu_memory_utilization"] = 0.5  # leave room for HF's copy of the weights
    engine = LLMEngine(engine_config_from_args(args, **overrides))
    device = engine.device
    has_graphs = engine.capture_stats is not None
    if want_graph and not has_graphs:
        logger.warning("graph mode skipped: CUDA graphs are not available on %s", device)
        modes = [m for m in modes if not m.startswith("graph")]

    bandwidth = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 27))
    weights_bytes = engine.memory_plan.weights_bytes
    kv_per_token = engine.model_config.kv_bytes_per_token(engine.kv_cache_dtype)
    hf_model = build_hf_model(engine) if any(m.startswith("hf") for m in modes) else None

    rows: list[dict[str, Any]] = []
    for b in batch_sizes:
        # Mean bytes per decode step: the weights (only the experts a batch picks), plus every
        # sequence's KV so far.
        mean_context = args.input_len + args.output_len / 2
        floor_bytes = engine.model_config.decode_step_bytes(
            weights_bytes, engine.dtype, b, mean_context, engine.kv_cache_dtype
        )
        floor_ms = floor_bytes / bandwidth * 1e3
        for mode in modes:
            logger.info("batch %d: %s", b, mode)
            if not mode.startswith("hf"):
                r = measure_graphwise(
                    engine,
                    b,
                    args.input_len,
                    args.output_len,
                    mode.startswith("graph"),
                    seed=b,
                    async_scheduling=False if mode.endswith("-sync") else None,
                    sampling=sampling if mode.endswith("-sampling") else None,
                )
            else:
                r = measure_hf(hf_model, b, args.input_len, args.output_len, mode == "hf-static", b)
            timings = _summary(r.pop("steps"), r.pop("prefill_s"), args.warmup_steps)
            row = {"batch_size": b, "mode": mode, "floor_ms": floor_ms, **timings, **r}
            row["x_floor"] = row["decode_median_ms"] / floor_ms
            rows.append(row)

    result = {
        "benchmark": "latency",
        "model": engine.model_name,
        "num_layers": engine.model_config.num_hidden_layers,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "quantization": getattr(args, "quantization", None),
        "kv_cache_dtype": str(engine.kv_cache_dtype).removeprefix("torch."),
        "settings": {
            "batch_sizes": batch_sizes,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "warmup_steps": args.warmup_steps,
            "compare": modes,
            "sampling": sampling if any(m.endswith("-sampling") for m in modes) else None,
        },
        "environment": environment(device),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "weights_bytes": weights_bytes,
        "kv_bytes_per_token": kv_per_token,
        "cuda_graph_capture": vars(engine.capture_stats) if has_graphs else None,
        "rows": rows,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(format_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.output}")
    return 0


def format_table(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"{result['model']} ({result['num_layers']} layers, {result['dtype']}) on "
        f"{env['device_name']}; copy bandwidth {result['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s",
        f"{'batch':>5} {'mode':>10} {'prefill ms':>10} {'median ms':>10} {'p90 ms':>8} "
        f"{'floor ms':>9} {'x floor':>8}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['batch_size']:>5} {r['mode']:>10} {r['prefill_ms']:>10.2f} "
            f"{r['decode_median_ms']:>10.3f} {r['decode_p90_ms']:>8.3f} {r['floor_ms']:>9.3f} "
            f"{r['x_floor']:>8.2f}"
        )
    return "\n".join(lines)
