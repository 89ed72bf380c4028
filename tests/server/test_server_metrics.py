"""/metrics for operators: vLLM's metrics under graphwise's prefix, each sample labelled with the
served model name; the engine's preemption and prefix-cache counters; the README's mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from fake_engine import BODY, FakeEngine, run_app
from prometheus_client.parser import text_string_to_metric_families

from graphwise.server.async_engine import AsyncEngine
from graphwise.server.metrics import PREFIX, VLLM_NAMES

README = Path(__file__).resolve().parents[2] / "README.md"


def _exported(text: str) -> dict[str, list[Any]]:
    """Samples by exported name, `_created` timestamps left out (vLLM has them too)."""
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_created"):
                samples.setdefault(s.name, []).append(s)
    return samples


def test_engine_counters_and_the_model_label(metric) -> None:
    fake = FakeEngine()
    fake.stats = {"num_preemptions": 3, "prefix_cache_queries": 40, "prefix_cache_hits": 25}
    fake.stats |= {"prompt_tokens": 11, "generation_tokens": 7}

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        assert (await client.post("/v1/completions", json=BODY)).status_code == 200
        text = (await client.get("/metrics")).text
        label = 'model_name="served-name"'
        assert metric(text, "graphwise:num_preemptions_total", label) == 3
        assert metric(text, "graphwise:prefix_cache_queries_total", label) == 40
        assert metric(text, "graphwise:prefix_cache_hits_total", label) == 25
        assert metric(text, "graphwise:prompt_tokens_total", label) == 11
        assert metric(text, "graphwise:generation_tokens_total", label) == 7
        reason = 'finished_reason="length",' + label
        assert metric(text, "graphwise:request_success_total", reason) == 1
        assert metric(text, "graphwise:time_to_first_token_seconds_count", label) == 1
        assert metric(text, "graphwise:e2e_request_latency_seconds_count", label) == 1
        assert metric(text, "graphwise:inter_token_latency_seconds_count", label) == 2
        for name, samples in _exported(text).items():
            assert name.startswith(PREFIX), name
            for s in samples:  # every sample, not only some: dashboards filter on it
                assert s.labels.get("model_name") == "served-name", (name, s.labels)

    run_app(fake, test, served="served-name")


def test_every_metric_has_its_vllm_mapping_and_a_readme_row() -> None:
    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        text = (await client.get("/metrics")).text
        families = set()
        for name in _exported(text):
            for suffix in ("_bucket", "_count", "_sum"):  # a histogram's parts
                if name.endswith(suffix) and name[: -len(suffix)].endswith("_seconds"):
                    name = name[: -len(suffix)]
            families.add(name.removeprefix(PREFIX))
        assert families == set(VLLM_NAMES)

    run_app(FakeEngine(), test)
    readme = README.read_text()
    for name, vllm_name in VLLM_NAMES.items():
        row = f"| `{PREFIX}{name}` | " + (f"`{vllm_name}`" if vllm_name else "-")
        assert row in readme, f"README lacks the row for {name}: {row!r}"
