"""Prometheus metrics for `GET /metrics`, in a registry of the server's own.

Engine-side numbers (queue sizes, KV usage, token and step counts) are read at scrape time from
the snapshot the engine thread publishes after each step, never from the engine itself (which
only its thread may touch). Latencies are observed by the asyncio side as outputs arrive, so
they include the hand-off to the event loop: what a client sees, not just the model step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from graphwise.engine.client import EngineStats

PREFIX = "graphwise:"

# Seconds; from a GPU's few milliseconds to a CPU's seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's numbers as of its last step (published by the engine thread, read by
    anyone), with the requests still in the server's inbox counted as waiting."""

    stats: EngineStats = EngineStats()
    alive: bool = True


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        s = snap.stats
        yield GaugeMetricFamily(
            PREFIX + "num_requests_running", "Requests in the running batch.", value=s.num_running
        )
        yield GaugeMetricFamily(
            PREFIX + "num_requests_waiting",
            "Requests accepted but not yet scheduled (queued in the engine or its inbox).",
            value=s.num_waiting,
        )
        yield GaugeMetricFamily(
            PREFIX + "kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (0 to 1).",
            value=s.kv_usage,
        )
        yield GaugeMetricFamily(
            PREFIX + "kv_cache_used_blocks", "KV-cache blocks in use.", value=s.kv_blocks_used
        )
        yield GaugeMetricFamily(
            PREFIX + "kv_cache_total_blocks",
            "KV-cache blocks in the pool.",
            value=s.kv_blocks_total,
        )
        yield GaugeMetricFamily(
            PREFIX + "engine_alive",
            "1 while the engine thread runs, else 0.",
            value=int(snap.alive),
        )
        yield CounterMetricFamily(
            PREFIX + "prompt_tokens", "Prompt tokens prefilled.", value=s.prompt_tokens
        )
        yield CounterMetricFamily(
            PREFIX + "generation_tokens", "Tokens generated.", value=s.generation_tokens
        )
        steps = CounterMetricFamily(
            PREFIX + "engine_steps",
            "Model steps, by how they ran: CUDA-graph replay or eager.",
            labels=["mode"],
        )
        steps.add_metric(["graph"], s.steps_graph)
        steps.add_metric(["eager"], s.steps_eager)
        yield steps


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(snapshot))
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.request_success = Counter(
            PREFIX + "request_success",
            "Requests that ended, by finish reason: stop, length, abort (cancelled or the client "
            "left), error (failed by an engine error; the server kept serving the others).",
            labelnames=["finished_reason"],
            registry=self.registry,
        )
        for reason in (
            "stop",
            "length",
            "abort",
            "error",
        ):  # exported as 0 before the first request
            self.request_success.labels(finished_reason=reason)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
