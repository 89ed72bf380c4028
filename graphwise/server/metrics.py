"""Prometheus metrics for `GET /metrics`, in a registry of the server's own.

Engine-side numbers (queue sizes, KV usage, token, step, preemption and prefix-cache counts) are
read at scrape time from the snapshot the engine thread publishes after each step, never from the
engine itself (which only its thread may touch). Latencies are observed by the asyncio side as
outputs arrive, so they include the hand-off to the event loop: what a client sees, not just the
model step.

Names carry graphwise's own `graphwise:` prefix with the meaning of vLLM's `vllm:` metric of the
same name (`VLLM_NAMES` below; the README's table shows it), and every sample carries a
`model_name` label (the first served model name), as vLLM's do, so that dashboards built for vLLM
need only the prefix changed.
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
MODEL_LABEL = "model_name"

# Seconds; from a GPU's few milliseconds to a CPU's seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280)
FINISH_REASONS = ("stop", "length", "abort", "error")

# Each exported metric (counters with their `_total`) and the vLLM metric of the same meaning
# ("" where vLLM has none). The README's table gives the meanings and the differences (the
# prefix-cache counters count KV blocks, vLLM's count tokens); a test keeps all three in step.
VLLM_NAMES: dict[str, str] = {
    "num_requests_running": "vllm:num_requests_running",
    "num_requests_waiting": "vllm:num_requests_waiting",
    "kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
    "kv_cache_used_blocks": "",
    "kv_cache_total_blocks": "",
    "engine_alive": "",
    "prompt_tokens_total": "vllm:prompt_tokens_total",
    "generation_tokens_total": "vllm:generation_tokens_total",
    "num_preemptions_total": "vllm:num_preemptions_total",
    "prefix_cache_queries_total": "vllm:prefix_cache_queries_total",
    "prefix_cache_hits_total": "vllm:prefix_cache_hits_total",
    "engine_steps_total": "",
    "spec_decode_num_drafts_total": "vllm:spec_decode_num_drafts_total",
    "spec_decode_num_draft_tokens_total": "vllm:spec_decode_num_draft_tokens_total",
    "spec_decode_num_accepted_tokens_total": "vllm:spec_decode_num_accepted_tokens_total",
    "request_success_total": "vllm:request_success_total",
    "time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
}


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's numbers as of its last step (published by the engine thread, read by
    anyone), with the requests still in the server's inbox counted as waiting."""

    stats: EngineStats = EngineStats()
    alive: bool = True


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], EngineSnapshot], model_name: str) -> None:
        self._snapshot = snapshot
        self._model = model_name

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(PREFIX + name, doc, labels=[MODEL_LABEL])
        g.add_metric([self._model], value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(PREFIX + name, doc, labels=[MODEL_LABEL])
        c.add_metric([self._model], value)
        return c

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        s = snap.stats
        yield self._gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield self._gauge(
            "num_requests_waiting",
            "Requests accepted but not yet scheduled (queued in the engine or its inbox).",
            s.num_waiting,
        )
        yield self._gauge(
            "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", s.kv_usage
        )
        yield self._gauge("kv_cache_used_blocks", "KV-cache blocks in use.", s.kv_blocks_used)
        yield self._gauge(
            "kv_cache_total_blocks", "KV-cache blocks in the pool.", s.kv_blocks_total
        )
        yield self._gauge(
            "engine_alive", "1 while the engine thread runs, else 0.", int(snap.alive)
        )
        yield self._counter("prompt_tokens", "Prompt tokens prefilled.", s.prompt_tokens)
        yield self._counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield self._counter(
            "num_preemptions",
            "Preemptions: running requests sent back to wait (their KV blocks freed) to make "
            "room, to be recomputed later.",
            s.num_preemptions,
        )
        yield self._counter(
            "prefix_cache_queries",
            "Prefix-cache queries, in KV-cache blocks: the full blocks of prompts looked up.",
            s.prefix_cache_queries,
        )
        yield self._counter(
            "prefix_cache_hits",
            "Prefix-cache hits, in KV-cache blocks: the looked-up blocks found cached.",
            s.prefix_cache_hits,
        )
        yield self._counter(
            "spec_decode_num_drafts",
            "Speculative decoding: verify rows (a request's drafts checked in one step).",
            s.spec_decode_num_drafts,
        )
        yield self._counter(
            "spec_decode_num_draft_tokens",
            "Speculative decoding: draft tokens proposed.",
            s.spec_decode_num_draft_tokens,
        )
        yield self._counter(
            "spec_decode_num_accepted_tokens",
            "Speculative decoding: draft tokens accepted (accepted / proposed is the "
            "acceptance rate).",
            s.spec_decode_num_accepted_tokens,
        )
        steps = CounterMetricFamily(
            PREFIX + "engine_steps",
            "Model steps, by how they ran: CUDA-graph replay or eager.",
            labels=[MODEL_LABEL, "mode"],
        )
        steps.add_metric([self._model, "graph"], s.steps_graph)
        steps.add_metric([self._model, "eager"], s.steps_eager)
        yield steps


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], EngineSnapshot], model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(snapshot, model_name))

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            family = Histogram(
                PREFIX + name,
                doc,
                labelnames=[MODEL_LABEL],
                buckets=buckets,
                registry=self.registry,
            )
            return family.labels(model_name)

        self.ttft = histogram(
            "time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            E2E_BUCKETS,
        )
        self._request_success = Counter(
            PREFIX + "request_success",
            "Requests that ended, by finish reason: stop, length, abort (cancelled or the client "
            "left), error (failed by an engine error; the server kept serving the others).",
            labelnames=[MODEL_LABEL, "finished_reason"],
            registry=self.registry,
        )
        for reason in FINISH_REASONS:  # exported as 0 before the first request
            self._request_success.labels(model_name, reason)

    def count_finished(self, reason: str, n: int = 1) -> None:
        """`n` requests ended with `reason` (stop, length, abort, error)."""
        self._request_success.labels(self.model_name, reason).inc(n)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
