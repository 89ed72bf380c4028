"""The OpenAI routes against a real server, through the official `openai` client."""

from __future__ import annotations

import json

import httpx
import pytest

from graphwise.sampling_params import SamplingParams

# Starts processes (servers, ranks): run by .ci/run, left out of the inner loop (-m "not slow").
pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_greedy_matches_offline_llm(client, model_name: str, default_llm) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=32)
    ref = default_llm.chat(QUESTION, greedy, use_tqdm=False)[0]
    resp = client.chat.completions.create(
        model=model_name, messages=QUESTION, temperature=0, max_tokens=32
    )
    choice = resp.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.model == model_name and resp.created > 0


def test_completion_stream_equals_non_stream(client, model_name: str, default_llm) -> None:
    prompt = "The three primary colors are"
    kwargs = dict(model=model_name, prompt=prompt, temperature=0, max_tokens=24)
    kwargs["extra_body"] = {"ignore_eos": True}  # exactly 24 tokens, so usage is predictable
    full = client.completions.create(**kwargs)
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    assert full.choices[0].finish_reason == "length"
    prompt_len = len(default_llm.get_tokenizer().encode(prompt, add_special_tokens=True))
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (prompt_len, 24)

    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    finals = [f for f in finals if f]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_len, 24)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_equals_non_stream(client, model_name: str) -> None:
    kwargs = dict(model=model_name, messages=QUESTION, temperature=0, max_completion_tokens=32)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_raw_sse_framing(http: httpx.Client, model_name: str) -> None:
    body = {"model": model_name, "prompt": "Hello", "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        json.loads(line[len("data: ") :])


def test_token_id_prompt_and_sampling_fields(client, model_name: str) -> None:
    ids = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    resp = client.completions.create(model=model_name, prompt=ids, temperature=0, max_tokens=4)
    assert resp.usage.prompt_tokens == len(ids)
    by_text = client.completions.create(
        model=model_name, prompt="The capital of France is", temperature=0, max_tokens=4
    )
    assert resp.choices[0].text == by_text.choices[0].text

    # A seeded sample repeats; stop strings cut the text and report "stop".
    seeded = dict(model=model_name, prompt="Once upon a time", max_tokens=12, seed=1234)
    a = client.completions.create(**seeded, temperature=1.0, top_p=0.9)
    b = client.completions.create(**seeded, temperature=1.0, top_p=0.9)
    assert a.choices[0].text == b.choices[0].text
    stopped = client.completions.create(
        model=model_name, prompt="The capital of France is", temperature=0, max_tokens=16, stop="."
    )
    assert stopped.choices[0].finish_reason == "stop" and "." not in stopped.choices[0].text
    forced = client.completions.create(
        model=model_name,
        prompt="The capital of France is",
        temperature=0,
        max_tokens=6,
        extra_body={"min_tokens": 6, "top_k": 5},
    )
    assert forced.usage.completion_tokens == 6


def test_tiny_temperature_is_greedy(http: httpx.Client, model_name: str) -> None:
    # logits / 1e-40 overflowed to NaN and the sampler returned token 0: an empty text.
    body = {"model": model_name, "prompt": "The capital of France is", "max_tokens": 8}
    greedy = http.post("/v1/completions", json={**body, "temperature": 0})
    cold = http.post("/v1/completions", json={**body, "temperature": 1e-40, "seed": 3})
    assert greedy.status_code == cold.status_code == 200, cold.text
    text = greedy.json()["choices"][0]["text"]
    assert text.strip() and cold.json()["choices"][0]["text"] == text


def test_default_max_tokens_fills_context(http: httpx.Client, model_name: str) -> None:
    # Without max_tokens a request may run to max_model_len (1024 here), like vLLM.
    ids = list(range(100, 100 + 1000))
    body = {"model": model_name, "prompt": ids, "temperature": 0, "ignore_eos": True}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 24
    assert resp.json()["choices"][0]["finish_reason"] == "length"


def test_models_health_metrics(client, http: httpx.Client, model_name: str, metric) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [model_name]
    assert http.get(f"/v1/models/{model_name}").json()["id"] == model_name
    assert http.get("/health").status_code == 200
    text = http.get("/metrics").text
    for name in (
        "graphwise:num_requests_running",
        "graphwise:num_requests_waiting",
        "graphwise:kv_cache_usage_perc",
        "graphwise:kv_cache_used_blocks",
        "graphwise:prompt_tokens_total",
        "graphwise:generation_tokens_total",
        "graphwise:time_to_first_token_seconds_count",
        "graphwise:inter_token_latency_seconds_count",
    ):
        assert metric(text, name) >= 0
    assert metric(text, "graphwise:engine_steps_total", 'mode="graph"') == 0  # CPU: eager only
    assert metric(text, "graphwise:engine_steps_total", 'mode="eager"') > 0
    assert metric(text, "graphwise:request_success_total", 'finished_reason="stop"') >= 1


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_health_and_metrics_need_no_key(server, path: str) -> None:
    with httpx.Client(trust_env=False, timeout=10) as c:
        assert c.get(server.url + path).status_code == 200


def test_batched_prompts_match_single_requests(client, model_name: str, metric, http) -> None:
    """Several prompts in one request answer as the same requests sent one by one would (greedy),
    each as the choice with its index, usage summed; streamed, the same texts."""
    prompts = ["The capital of France is", [504, 3575, 282, 4649, 314], "One, two, three,"]
    kwargs = dict(model=model_name, temperature=0, max_tokens=8)
    singles = [client.completions.create(prompt=p, **kwargs) for p in prompts]
    batch = client.completions.create(prompt=[prompts[0], prompts[2]], **kwargs)
    ids = client.completions.create(prompt=[prompts[1], prompts[1]], **kwargs)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [
        singles[0].choices[0].text,
        singles[2].choices[0].text,
    ]
    assert [c.text for c in ids.choices] == [singles[1].choices[0].text] * 2
    both = (singles[0].usage, singles[2].usage)
    assert batch.usage.prompt_tokens == sum(u.prompt_tokens for u in both)
    assert batch.usage.completion_tokens == sum(u.completion_tokens for u in both)

    chunks = list(
        client.completions.create(
            prompt=[prompts[0], prompts[2]],
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
    )
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == {0: batch.choices[0].text, 1: batch.choices[1].text}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == batch.usage.total_tokens


def test_prefix_cache_counters_from_the_engine(client, model_name: str, metric, http) -> None:
    """The engine's prefix-cache numbers (in 16-token blocks) reach /metrics, labelled with
    the served model name."""
    label = f'model_name="{model_name}"'

    def counters() -> tuple[float, float]:
        text = http.get("/metrics").text
        assert metric(text, "graphwise:num_preemptions_total", label) >= 0
        return tuple(
            metric(text, f"graphwise:prefix_cache_{k}_total", label) for k in ("queries", "hits")
        )  # type: ignore[return-value]

    long_prompt = list(range(1000, 1040))  # two full 16-token blocks and a partial one
    queries, hits = counters()
    client.completions.create(model=model_name, prompt=long_prompt, max_tokens=1)
    client.completions.create(model=model_name, prompt=long_prompt, max_tokens=1)
    queries2, hits2 = counters()
    assert queries2 - queries >= 4  # two lookups of two full blocks each
    assert hits2 - hits >= 2  # the second request found the first's blocks
