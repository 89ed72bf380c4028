"""`graphwise explain`: why eager decode or CUDA-graph replay is faster on this machine.

For each batch size it measures one fixed decode step (the synthetic step the auto policy times:
`batch_size` sequences with `context_len` tokens of context each; forward, LM head, argmax):

- step time, eager and replayed (CUDA events, the device idle before each step, median);
- CPU enqueue: host wall time of the step call without synchronizing (until the last launch is
  issued); for graphs also the replay call alone (input copies + graph launch);
- from one profiled eager and one profiled graph step (torch.profiler, CPU + CUDA): kernels
  launched, GPU busy (the union of kernel/memcpy/memset intervals), mean launch-API time;
- GPU idle share = 1 - busy / step time;
- optionally the same decode step through the engine (`engine.step()`: scheduling, input upload,
  sampling), eager and graph.

The step-time model: eager ~ max(CPU enqueue, GPU busy) + sync; graph ~ GPU busy + replay + sync.
A step is launch-bound when the host needs longer to enqueue it than the GPU needs to run it:
the GPU then idles between kernels and a graph (one launch) recovers that time. When the GPU is
busier than the host (large batches, slow memory), the launches hide behind the work and a graph
saves little. The verdict follows the measured speedup against `cuda_graph_min_speedup`, the
same rule as `cuda_graph="auto"`.

Writes explain.json (schema `graphwise.explain/1`, see REPORT_SCHEMA), explain.png, and per
batch size a Chrome/Perfetto trace of one eager and one graph step (trace-bs{N}.json).
"""

from __future__ import annotations

import json
import logging
import random
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphwise.runner.step_timing import decode_step, synthetic_decode_inputs, time_steps

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "graphwise.explain/1"
MODES = ("eager", "graph")
KERNEL_LAUNCH_APIS = frozenset(
    {
        "cudaLaunchKernel",
        "cudaLaunchKernelExC",
        "cudaLaunchCooperativeKernel",
        "cuLaunchKernel",
        "cuLaunchKernelEx",
        "cuLaunchCooperativeKernel",
    }
)
GRAPH_LAUNCH_APIS = frozenset({"cudaGraphLaunch", "cuGraphLaunch"})
GPU_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
EMULATION_KERNEL = "spin_kernel"  # torch.cuda._sleep's kernel (bandwidth emulation)


def annotation(mode: str) -> str:
    return f"graphwise/{mode}_step"


# ---- trace analysis (pure) ------------------------------------------------------------------
def _api_name(name: str) -> str:
    return re.sub(r"(_v\d+|_ptsz|_ptds)+$", "", name)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


TOP_KERNELS = 8


def kernel_family(name: str) -> str:
    """A kernel's name without template arguments and parameters, so that one GEMM kernel
    with different tile configurations or one Triton kernel's specializations add up."""
    for cut in ("<", "("):
        name = name.split(cut, 1)[0]
    return name.strip()[:80] or "?"


def parse_trace(events: Sequence[Mapping[str, Any]], windows: Sequence[str]) -> dict[str, dict]:
    """Per annotated step (a `user_annotation` range named in `windows`): kernels launched,
    emulation spins, memcpy/memset count, GPU busy (union of intervals) and span in ms, kernel
    launch-API calls and their mean duration in us, graph launches, torch ops, host ms.

    GPU events are matched to a step through the correlation id of the runtime/driver call that
    launched them (a graph's kernels carry its cudaGraphLaunch's); events with no known
    correlation go to the last step that started before them (steps are synchronized)."""
    spans: dict[str, tuple[float, float]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e.get("name") in windows:
            name = str(e["name"])
            if name not in spans:
                ts = float(e["ts"])
                spans[name] = (ts, ts + float(e.get("dur", 0)))
    order = sorted(spans.items(), key=lambda kv: kv[1][0])

    def inside(ts: float) -> str | None:
        for name, (s, end) in order:
            if s <= ts <= end:
                return name
        return None

    def after(ts: float) -> str | None:
        found = None
        for name, (s, _) in order:
            if s <= ts:
                found = name
        return found

    out: dict[str, dict] = {
        name: {
            "kernels": 0,
            "emulation_kernels": 0,
            "memcpy_memset": 0,
            "gpu_busy_ms": 0.0,
            "gpu_span_ms": 0.0,
            "launch_api_calls": 0,
            "launch_api_mean_us": None,
            "graph_launches": 0,
            "torch_ops": 0,
            "host_ms": (end - s) / 1e3,
            "top_kernels": [],
        }
        for name, (s, end) in spans.items()
    }
    launch_us: dict[str, list[float]] = {name: [] for name in spans}
    correlation: dict[Any, str] = {}
    gpu_events = []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = str(e.get("cat", "")).lower()
        if cat in GPU_CATEGORIES:
            gpu_events.append(e)
            continue
        ts = float(e.get("ts", 0))
        name = inside(ts)
        if name is None:
            continue
        if cat in ("cuda_runtime", "cuda_driver"):
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                correlation[corr] = name
            api = _api_name(str(e.get("name", "")))
            if api in KERNEL_LAUNCH_APIS:
                launch_us[name].append(float(e.get("dur", 0)))
            elif api in GRAPH_LAUNCH_APIS:
                out[name]["graph_launches"] += 1
        elif cat == "cpu_op":
            out[name]["torch_ops"] += 1
    intervals: dict[str, list[tuple[float, float]]] = {name: [] for name in spans}
    by_kernel: dict[str, dict[str, list[float]]] = {name: {} for name in spans}
    for e in gpu_events:
        ts = float(e.get("ts", 0))
        corr = (e.get("args") or {}).get("correlation")
        name = correlation.get(corr) if corr is not None else None
        name = name or after(ts)
        if name is None:
            continue
        intervals[name].append((ts, ts + float(e.get("dur", 0))))
        if str(e.get("cat", "")).lower() == "kernel":
            if EMULATION_KERNEL in str(e.get("name", "")):
                out[name]["emulation_kernels"] += 1
            else:
                out[name]["kernels"] += 1
                key = kernel_family(str(e.get("name", "")))
                by_kernel[name].setdefault(key, []).append(float(e.get("dur", 0)) / 1e3)
        else:
            out[name]["memcpy_memset"] += 1
    for name in spans:
        iv = intervals[name]
        out[name]["gpu_busy_ms"] = _union_us(iv) / 1e3
        if iv:
            out[name]["gpu_span_ms"] = (max(e for _, e in iv) - min(s for s, _ in iv)) / 1e3
        families = sorted(by_kernel[name].items(), key=lambda kv: -sum(kv[1]))
        out[name]["top_kernels"] = [
            {"kernel": k, "ms": sum(d), "count": len(d)} for k, d in families[:TOP_KERNELS]
        ]
        calls = launch_us[name]
        out[name]["launch_api_calls"] = len(calls)
        out[name]["launch_api_mean_us"] = statistics.fmean(calls) if calls else None
    return out


# ---- the step-time model and the verdict (pure) ---------------------------------------------
def step_model(
    eager_enqueue_ms: float | None,
    eager_busy_ms: float | None,
    graph_busy_ms: float | None,
    replay_ms: float | None,
    sync_ms: float | None,
) -> dict[str, float | None]:
    """eager ~ max(CPU enqueue, GPU busy) + sync; graph ~ GPU busy + replay + sync."""
    sync = sync_ms or 0.0
    eager = graph = None
    if eager_enqueue_ms is not None and eager_busy_ms is not None:
        eager = max(eager_enqueue_ms, eager_busy_ms) + sync
    if graph_busy_ms is not None and replay_ms is not None:
        graph = graph_busy_ms + replay_ms + sync
    speedup = eager / graph if eager is not None and graph else None
    return {"eager_ms": eager, "graph_ms": graph, "speedup": speedup}


def _ms(x: float) -> str:
    """23.1, 9.4, 0.35: one decimal from 1 ms up, two below."""
    return f"{x:.1f}" if abs(x) >= 1 else f"{x:.2f}"


def verdict(
    enqueue_ms: float | None,
    busy_ms: float | None,
    measured_speedup: float | None,
    model_speedup: float | None,
    min_speedup: float,
    unavailable: str | None = None,
) -> tuple[str, str | None, str]:
    """(verdict "graph"|"eager", bound "launch"|"gpu"|None, reason)."""
    bound = None
    if enqueue_ms is not None and busy_ms is not None:
        bound = "launch" if enqueue_ms > busy_ms else "gpu"
    if unavailable is not None:
        return "eager", bound, f"{unavailable}: every step runs eagerly"
    speedup = measured_speedup if measured_speedup is not None else model_speedup
    choice = "graph" if speedup is not None and speedup >= min_speedup * (1 - 1e-9) else "eager"
    if bound == "launch":
        reason = f"launch-bound: CPU enqueue {_ms(enqueue_ms)} ms > GPU busy {_ms(busy_ms)} ms"
    elif bound == "gpu":
        reason = f"GPU-bound: GPU busy {_ms(busy_ms)} ms >= CPU enqueue {_ms(enqueue_ms)} ms"
    else:
        reason = "no profile"
    reason += f" -> {choice}"
    parts = []
    if measured_speedup is not None:
        parts.append(f"measured {measured_speedup:.2f}x")
    if model_speedup is not None:
        parts.append(f"model {model_speedup:.2f}x")
    parts.append(f"threshold {min_speedup:g}x")
    reason += f" ({', '.join(parts)})"
    if bound == "launch" and choice == "eager":
        reason += "; the host-side launches outweigh the GPU work, yet replay did not pay here"
    elif bound == "gpu" and choice == "graph":
        reason += "; graphs still remove the idle gaps between dependent kernels"
    if (
        measured_speedup is not None
        and model_speedup is not None
        and (measured_speedup >= min_speedup) != (model_speedup >= min_speedup)
    ):
        reason += "; the model and the measurement disagree: trust the measurement"
    return choice, bound, reason


# ---- the report schema ----------------------------------------------------------------------
NUM = (int, float)
OPT_NUM = (int, float, type(None))
OPT_INT = (int, type(None))
OPT_STR = (str, type(None))

MODE_SCHEMA: dict[str, Any] = {
    "step_ms": NUM,  # median step time (CUDA events on GPU, wall time on CPU)
    "step_ms_p90": NUM,
    "engine_step_ms": OPT_NUM,  # the same decode through engine.step(); null when not run
    "cpu_enqueue_ms": NUM,  # host time of the step call, no sync (on CPU: the whole step)
    "replay_ms": OPT_NUM,  # graph: host time of the replay call alone; eager: null
    "gpu_busy_ms": OPT_NUM,  # union of GPU activity in the profiled step; null on CPU
    "gpu_idle_share": OPT_NUM,  # 1 - gpu_busy_ms / step_ms; null on CPU
    "kernels": OPT_INT,  # kernels launched per step (not counting emulation spins); null on CPU
    "emulation_kernels": OPT_INT,
    "launch_api_calls": OPT_INT,
    "launch_api_mean_us": OPT_NUM,  # mean cudaLaunchKernel/cuLaunchKernel duration
    "graph_launches": OPT_INT,
    "torch_ops": OPT_INT,  # aten ops recorded by the profiler (nested ones included)
    # GPU time per kernel family in the profiled step, largest first; null on CPU
    "top_kernels": ([{"kernel": str, "ms": NUM, "count": int}], None),
}
ROW_SCHEMA: dict[str, Any] = {
    "batch_size": int,
    "context_len": int,
    "bytes_per_step": int,  # weights + the KV the step reads
    "floor_ms": NUM,  # bytes_per_step / bandwidth (the emulated one when emulating)
    "eager": MODE_SCHEMA,
    "graph": (MODE_SCHEMA, None),  # null where no graph exists for this size
    "model": {"eager_ms": OPT_NUM, "graph_ms": OPT_NUM, "speedup": OPT_NUM},
    "measured_speedup": OPT_NUM,
    "bound": (str, type(None)),  # "launch" | "gpu" | null
    "verdict": str,  # "graph" | "eager"
    "reason": str,
    "trace": OPT_STR,  # file name in the output dir
}
REPORT_SCHEMA: dict[str, Any] = {
    "schema": str,
    "model": str,
    "num_layers": int,
    "dtype": str,
    "device": str,  # "cuda" | "cpu"
    "environment": dict,
    "settings": {
        "batch_sizes": [int],
        "context_len": int,
        "steps": int,
        "warmup_steps": int,
        "engine_steps": int,
        "min_speedup": NUM,
        "emulate_bandwidth_bytes_per_s": OPT_NUM,
        "nvtx": bool,
        "attention_backend": str,
    },
    "copy_bandwidth_bytes_per_s": NUM,
    "weights_bytes": int,
    "kv_bytes_per_token": int,
    "kv_cache_dtype": str,
    "sync_ms": OPT_NUM,
    "graphs_available": bool,
    "graphs_unavailable_reason": OPT_STR,
    "capture": (
        {"buckets": [int], "seconds": NUM, "pool_bytes": int, "failed": dict},
        None,
    ),
    "memory": dict,
    "rows": [ROW_SCHEMA],
    "files": {"json": str, "plot": OPT_STR, "traces": [str]},
    "date": str,
}


def validate_report(report: Any, schema: Any = None, path: str = "report") -> list[str]:
    """Errors where `report` departs from REPORT_SCHEMA (missing or unknown keys, wrong types);
    empty when it conforms. A spec is a type or tuple of types, a dict (an object with exactly
    those keys), a one-element list (a list of that), or a tuple (spec, None) for nullable."""
    schema = REPORT_SCHEMA if schema is None else schema
    errors: list[str] = []
    if isinstance(schema, tuple) and schema and not all(isinstance(s, type) for s in schema):
        if report is None and None in schema:
            return []
        return validate_report(report, schema[0], path)
    if isinstance(schema, dict):
        if not isinstance(report, dict):
            return [f"{path}: expected an object, got {type(report).__name__}"]
        for key in schema.keys() - report.keys():
            errors.append(f"{path}.{key}: missing")
        for key in report.keys() - schema.keys():
            errors.append(f"{path}.{key}: not in the schema")
        for key in schema.keys() & report.keys():
            errors.extend(validate_report(report[key], schema[key], f"{path}.{key}"))
        return errors
    if isinstance(schema, list):
        if not isinstance(report, list):
            return [f"{path}: expected a list, got {type(report).__name__}"]
        for i, item in enumerate(report):
            errors.extend(validate_report(item, schema[0], f"{path}[{i}]"))
        return errors
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(report, bool) and bool not in types:
        return [f"{path}: expected {types}, got bool"]
    if not isinstance(report, types):
        return [f"{path}: expected {types}, got {type(report).__name__}"]
    return []


# ---- measuring ------------------------------------------------------------------------------
@dataclass
class ExplainSettings:
    batch_sizes: list[int]
    context_len: int = 256
    steps: int = 20
    warmup_steps: int = 3
    engine_steps: int = 8
    min_speedup: float = 1.05
    emulate_bandwidth: float | None = None
    nvtx: bool = False
    graphs: bool = True  # capture graphs (on CUDA) unless the user turned them off
    output_dir: Path = field(default_factory=lambda: Path("explain-out"))
    trace: bool = True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_sync_ms(device: torch.device, reps: int = 20) -> float:
    """Host time of the step's final round trip: one tiny kernel, then a synchronize."""
    x = torch.zeros(1, device=device)
    times = []
    for _ in range(reps + 2):
        _sync(device)
        t = time.perf_counter()
        x.add_(1)
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[2:])


def measure_host_ms(fn: Callable[[], object], device: torch.device, reps: int) -> list[float]:
    """Wall time of fn() without synchronizing (the device idle before each call)."""
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    _sync(device)
    return times


def profile_steps(
    steps: Mapping[str, Callable[[], object]], device: torch.device, trace_path: Path | None
) -> dict[str, dict]:
    """Profile one call of each step (CPU + CUDA activities) under its annotation; write the
    Chrome/Perfetto trace and return parse_trace's figures per step name."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        torch.zeros(1, device=device).add_(1)  # profiler start-up costs land before the steps
        _sync(device)
        for name, fn in steps.items():
            with record_function(annotation(name)):
                fn()
            _sync(device)
    if trace_path is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            data = json.loads(path.read_text())
    else:
        prof.export_chrome_trace(str(trace_path))
        data = json.loads(trace_path.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    parsed = parse_trace(events, [annotation(name) for name in steps])
    return {name: parsed.get(annotation(name), {}) for name in steps}


def measure_engine_steps(
    engine: Any, batch_size: int, context_len: int, steps: int, graphs: Any | None
) -> float:
    """Median ms of `steps` decode steps of `batch_size` sequences through engine.step(), after
    their prefill; the graph runner is `graphs` (None: eager) for the duration."""
    from graphwise.sampling_params import SamplingParams

    runner = engine.executor.driver
    rng = random.Random(batch_size)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    waiting_first = {
        engine.add_request(None, params, [rng.randrange(vocab) for _ in range(context_len - 1)])
        for _ in range(batch_size)
    }
    rids = set(waiting_first)
    saved = runner.use_graph_runner(graphs)
    times = []
    try:
        while waiting_first:
            waiting_first.difference_update(o.request_id for o in engine.step())
        for _ in range(steps):
            # No sync between calls: with async scheduling a call launches one step and waits
            # for the one before, so its duration is the engine's period per step.
            t = time.perf_counter()
            engine.step()
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        for rid in rids:
            engine.abort_request(rid)
        engine.drain()  # resolve the step still in flight
        runner.use_graph_runner(saved)
    return statistics.median(times)


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _mode_entry(
    step_ms: list[float],
    enqueue_ms: float,
    profile: Mapping[str, Any],
    cuda: bool,
    engine_step_ms: float | None,
    replay_ms: float | None,
) -> dict[str, Any]:
    median = statistics.median(step_ms)
    busy = profile.get("gpu_busy_ms") if cuda else None
    return {
        "step_ms": median,
        "step_ms_p90": _percentile(step_ms, 0.9),
        "engine_step_ms": engine_step_ms,
        "cpu_enqueue_ms": enqueue_ms,
        "replay_ms": replay_ms,
        "gpu_busy_ms": busy,
        "gpu_idle_share": max(0.0, 1.0 - busy / median) if busy is not None and median else None,
        "kernels": profile.get("kernels") if cuda else None,
        "emulation_kernels": profile.get("emulation_kernels") if cuda else None,
        "launch_api_calls": profile.get("launch_api_calls") if cuda else None,
        "launch_api_mean_us": profile.get("launch_api_mean_us") if cuda else None,
        "graph_launches": profile.get("graph_launches") if cuda else None,
        "torch_ops": profile.get("torch_ops"),
        "top_kernels": profile.get("top_kernels") if cuda else None,
    }


def explain_batch(
    engine: Any,
    graphs: Any | None,
    batch_size: int,
    settings: ExplainSettings,
    sync_ms: float | None,
    bandwidth: float,
    unavailable: str | None,
    nvtx: tuple[Callable[[str], object], Callable[[], object]] | None = None,
) -> dict[str, Any]:
    runner = engine.executor.driver
    device = engine.device
    cuda = device.type == "cuda"
    ctx_len = settings.context_len
    inputs = synthetic_decode_inputs(runner, batch_size, ctx_len)
    has_graph = graphs is not None and batch_size in graphs.graphs
    if graphs is not None and not has_graph:
        unavailable = f"the capture for batch {batch_size} failed"

    def ranged(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        if nvtx is None:
            return fn
        push, pop = nvtx

        def wrapped() -> object:
            push(f"explain {name} bs={batch_size}")
            try:
                return fn()
            finally:
                pop()

        return wrapped

    steps: dict[str, Callable[[], object]] = {
        "eager": ranged("eager", lambda: decode_step(runner, inputs))
    }
    if has_graph:
        steps["graph"] = ranged("graph", lambda: decode_step(runner, inputs, graphs))
    logger.info("batch %d: timing %s", batch_size, " and ".join(steps))
    host: dict[str, list[float]] = {}
    times = time_steps(
        steps, device, warmup=settings.warmup_steps, reps=settings.steps, enqueue_out=host
    )
    host_reps = max(3, settings.steps // 2)
    if cuda:  # enqueue and step time from the same calls
        enqueue = {n: statistics.median(host[n]) for n in steps}
    else:
        enqueue = {
            n: statistics.median(measure_host_ms(fn, device, host_reps)) for n, fn in steps.items()
        }
    replay_ms = None
    if has_graph:
        replay_ms = statistics.median(
            measure_host_ms(lambda: graphs.replay(inputs), device, host_reps)
        )
    trace_name = f"trace-bs{batch_size}.json" if settings.trace else None
    trace_path = settings.output_dir / trace_name if trace_name else None
    profiles = profile_steps(steps, device, trace_path)
    engine_ms: dict[str, float | None] = {n: None for n in MODES}
    if settings.engine_steps > 0:
        for name in steps:
            engine_ms[name] = measure_engine_steps(
                engine,
                batch_size,
                ctx_len,
                settings.engine_steps,
                graphs if name == "graph" else None,
            )
    eager = _mode_entry(
        times["eager"], enqueue["eager"], profiles["eager"], cuda, engine_ms["eager"], None
    )
    graph = (
        _mode_entry(
            times["graph"], enqueue["graph"], profiles["graph"], cuda, engine_ms["graph"], replay_ms
        )
        if has_graph
        else None
    )
    model = step_model(
        eager["cpu_enqueue_ms"] if cuda else None,
        eager["gpu_busy_ms"],
        graph["gpu_busy_ms"] if graph else None,
        replay_ms,
        sync_ms,
    )
    measured = eager["step_ms"] / graph["step_ms"] if graph and graph["step_ms"] > 0 else None
    choice, bound, reason = verdict(
        eager["cpu_enqueue_ms"] if cuda else None,
        eager["gpu_busy_ms"],
        measured,
        model["speedup"],
        settings.min_speedup,
        unavailable,
    )
    mc = engine.model_config
    weights = engine.memory_plan.weights_bytes
    step_bytes = mc.decode_step_bytes(
        weights, engine.dtype, batch_size, ctx_len, engine.kv_cache_dtype
    )
    return {
        "batch_size": batch_size,
        "context_len": ctx_len,
        "bytes_per_step": int(step_bytes),
        "floor_ms": step_bytes / bandwidth * 1e3,
        "eager": eager,
        "graph": graph,
        "model": model,
        "measured_speedup": measured,
        "bound": bound,
        "verdict": choice,
        "reason": reason,
        "trace": trace_name,
    }


def run_explain(engine: Any, settings: ExplainSettings) -> dict[str, Any]:
    """Measure every batch size, write the JSON, the PNG and the traces; returns the report."""
    from graphwise.insight.system import copy_bandwidth, environment
    from graphwise.runner.cuda_graph import CudaGraphRunner

    device = engine.device
    runner = engine.executor.driver
    cuda = device.type == "cuda"
    out_dir = Path(settings.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings.output_dir = out_dir
    if settings.emulate_bandwidth is not None and not cuda:
        raise ValueError("--emulate-bandwidth needs a CUDA device (it adds GPU-side delay)")
    bandwidth = copy_bandwidth(
        device, nbytes=(1 << 30) if cuda else (1 << 25), iters=10 if cuda else 3
    )
    emulator = None
    remove_nvtx = None
    nvtx = None
    graphs = None
    capture = None
    unavailable = None
    try:
        if settings.emulate_bandwidth is not None:
            from graphwise.insight.emulate import BandwidthEmulator

            mc = engine.model_config
            per_layer = mc.kv_bytes_per_token(engine.kv_cache_dtype) // mc.num_hidden_layers
            emulator = BandwidthEmulator(
                runner.model, per_layer, settings.emulate_bandwidth, bandwidth, settings.context_len
            ).install()
        if settings.nvtx:
            if cuda:
                from graphwise.insight.emulate import install_nvtx

                remove_nvtx = install_nvtx(engine)
                nvtx = (torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop)
            else:
                logger.warning("--nvtx: NVTX ranges need CUDA; ignored on %s", device)
        sync_ms = measure_sync_ms(device) if cuda else None
        if not cuda:
            unavailable = "CUDA graphs are unavailable on CPU"
        elif not settings.graphs:
            unavailable = "CUDA graphs are turned off (--cuda-graph off / --enforce-eager)"
        else:
            graphs = CudaGraphRunner(
                runner, engine.config, engine.max_model_len, buckets=sorted(settings.batch_sizes)
            )
            stats = graphs.capture_all()
            capture = {
                "buckets": list(stats.buckets),
                "seconds": stats.seconds,
                "pool_bytes": int(stats.pool_bytes),
                "failed": {str(k): v for k, v in stats.failed.items()},
            }
        effective = settings.emulate_bandwidth or bandwidth
        rows = []
        with torch.inference_mode():
            for bs in settings.batch_sizes:
                rows.append(
                    explain_batch(
                        engine, graphs, bs, settings, sync_ms, effective, unavailable, nvtx
                    )
                )
    finally:
        runner.use_graph_runner(None)
        if emulator is not None:
            emulator.remove()
        if remove_nvtx is not None:
            remove_nvtx()
    mc = engine.model_config
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "model": engine.model_name,
        "num_layers": mc.num_hidden_layers,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": device.type,
        "environment": environment(device),
        "settings": {
            "batch_sizes": list(settings.batch_sizes),
            "context_len": settings.context_len,
            "steps": settings.steps,
            "warmup_steps": settings.warmup_steps,
            "engine_steps": settings.engine_steps,
            "min_speedup": settings.min_speedup,
            "emulate_bandwidth_bytes_per_s": settings.emulate_bandwidth,
            "nvtx": settings.nvtx,
            "attention_backend": runner.backend.name,
        },
        "copy_bandwidth_bytes_per_s": bandwidth,
        "weights_bytes": int(engine.memory_plan.weights_bytes),
        "kv_bytes_per_token": int(mc.kv_bytes_per_token(engine.kv_cache_dtype)),
        "kv_cache_dtype": str(engine.kv_cache_dtype).removeprefix("torch."),
        "sync_ms": sync_ms,
        "graphs_available": graphs is not None,
        "graphs_unavailable_reason": unavailable,
        "capture": capture,
        "memory": engine.memory_plan.as_dict(),
        "rows": rows,
        "files": {
            "json": "explain.json",
            "plot": None,
            "traces": [r["trace"] for r in rows if r["trace"]],
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        from graphwise.insight.plots import plot_explain

        plot_explain(report, out_dir / "explain.png")
        report["files"]["plot"] = "explain.png"
    except Exception as exc:  # a missing plotting stack must not lose the measurements
        logger.warning("could not draw explain.png: %s", exc)
    (out_dir / "explain.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


# ---- the console table ----------------------------------------------------------------------
def _f(x: float | None, fmt: str, width: int) -> str:
    return f"{x:{width}{fmt}}" if x is not None else f"{'-':>{width}}"


def format_report(report: Mapping[str, Any]) -> str:
    env = report["environment"]
    s = report["settings"]
    head = (
        f"{report['model']} ({report['num_layers']} layers, {report['dtype']}) on "
        f"{env.get('device_name')}; copy bandwidth "
        f"{report['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s; context {s['context_len']} "
        "tokens per sequence"
    )
    if s["emulate_bandwidth_bytes_per_s"]:
        head += f"; emulating {s['emulate_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s"
    lines = [
        head,
        f"{'batch':>5} {'kernels':>7} {'enqueue':>8} {'busy':>7} {'idle':>5} {'launch':>7} "
        f"{'eager':>8} {'graph':>8} {'floor':>7} {'model':>6} {'meas.':>6}  verdict",
        f"{'':>5} {'':>7} {'ms':>8} {'ms':>7} {'%':>5} {'us':>7} {'ms':>8} {'ms':>8} {'ms':>7} "
        f"{'x':>6} {'x':>6}",
    ]
    for r in report["rows"]:
        e, g = r["eager"], r["graph"] or {}
        idle = e["gpu_idle_share"] * 100 if e["gpu_idle_share"] is not None else None
        lines.append(
            f"{r['batch_size']:>5} {_f(e['kernels'], 'd', 7)} {_f(e['cpu_enqueue_ms'], '.2f', 8)} "
            f"{_f(e['gpu_busy_ms'], '.2f', 7)} {_f(idle, '.0f', 5)} "
            f"{_f(e['launch_api_mean_us'], '.1f', 7)} {_f(e['step_ms'], '.2f', 8)} "
            f"{_f(g.get('step_ms'), '.2f', 8)} {_f(r['floor_ms'], '.2f', 7)} "
            f"{_f(r['model']['speedup'], '.2f', 6)} {_f(r['measured_speedup'], '.2f', 6)}  "
            f"{r['verdict']}"
        )
    lines.append("")
    for r in report["rows"]:
        lines.append(f"batch {r['batch_size']}: {r['reason']}")
        mode = r["graph"] or r["eager"]
        if mode.get("top_kernels"):
            top = ", ".join(f"{k['kernel']} {k['ms']:.2f}" for k in mode["top_kernels"][:4])
            lines.append(f"  GPU ms by kernel ({'graph' if r['graph'] else 'eager'}): {top}")
    return "\n".join(lines)
