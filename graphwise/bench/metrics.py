"""Request arrival times and the serving metrics, named and defined as vLLM's `bench serve` does.

Per successful request, measured on the client:
- TTFT: send -> first streamed chunk that carries text.
- ITL: every gap between successive text-carrying chunks (all requests' gaps pooled).
- E2EL: send -> end of the stream.
- TPOT: (E2EL - TTFT) / (output_tokens - 1), for requests with more than one output token.

Each of these is reported as `mean_`, `median_`, `std_` (population) and `p99_` (linear
interpolation) in milliseconds, e.g. `p99_itl_ms`. Throughputs divide by the benchmark's wall
time (`duration`, first send to last completion); failed requests count in `failed` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
STATISTICS = ("mean", "median", "std", "p99")


@dataclass
class RequestResult:
    """What the client saw of one request. Times in seconds."""

    prompt_len: int = 0
    expected_output_len: int = 0
    success: bool = False
    output_tokens: int | None = None  # from the server's usage, else counted later
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2EL
    generated_text: str = ""
    error: str = ""
    start_time: float = 0.0  # perf_counter at send


def arrival_times(
    num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0
) -> np.ndarray:
    """Send offsets in seconds from the start; the first request goes at 0.

    Gaps are exponential with mean 1/rate (a Poisson process) when burstiness is 1, otherwise
    gamma with shape = burstiness and the same mean (burstiness < 1 is burstier, > 1 smoother).
    An infinite rate sends everything at once.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if math.isnan(request_rate) or request_rate <= 0:
        raise ValueError(f"request rate must be positive or inf, got {request_rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a positive number, got {burstiness}")
    if num_requests == 0:
        return np.zeros(0)
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    rng = np.random.default_rng(seed)
    if burstiness == 1.0:
        gaps = rng.exponential(1.0 / request_rate, size=num_requests - 1)
    else:
        gaps = rng.gamma(burstiness, 1.0 / (request_rate * burstiness), size=num_requests - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def _stats(values_s: Sequence[float]) -> dict[str, float | None]:
    if len(values_s) == 0:
        return dict.fromkeys(STATISTICS)
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {
        "mean": float(np.mean(ms)),
        "median": float(np.median(ms)),
        "std": float(np.std(ms)),
        "p99": float(np.percentile(ms, 99)),
    }


def compute_metrics(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    """vLLM-named summary of a run. `output_tokens` must be filled for successful requests."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    ok = [r for r in results if r.success]
    missing = [i for i, r in enumerate(results) if r.success and r.output_tokens is None]
    if missing:
        raise ValueError(f"output_tokens not set for successful request(s) {missing[:5]}")
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(int(r.output_tokens or 0) for r in ok)
    series: dict[str, list[float]] = {
        "ttft": [r.ttft for r in ok],
        "tpot": [
            (r.latency - r.ttft) / (r.output_tokens - 1)
            for r in ok
            if r.output_tokens is not None and r.output_tokens > 1
        ],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    out: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }
    for metric in LATENCY_METRICS:
        stats = _stats(series[metric])
        for stat in STATISTICS:
            out[f"{stat}_{metric}_ms"] = stats[stat]
    return out
