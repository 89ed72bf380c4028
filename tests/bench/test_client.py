"""The streaming client against a fake OpenAI-compatible SSE server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from graphwise.bench import serve
from graphwise.bench.datasets import SampleRequest
from graphwise.bench.metrics import RequestResult


def _send(server, prompt="hello", max_tokens=5, endpoint="/v1/completions", timeout=10.0):
    async def go():
        payload = serve.build_payload(endpoint, "m", prompt, max_tokens)
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            return await serve.send_request(
                client, server.base_url + endpoint, payload, RequestResult(prompt_len=3)
            )

    return asyncio.run(go())


def test_payload_shape():
    p = serve.build_payload("/v1/completions", "m", "hi", 7)
    assert p == {
        "model": "m",
        "prompt": "hi",
        "max_tokens": 7,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    c = serve.build_payload("/v1/chat/completions", "m", "hi", 7, temperature=0.5, ignore_eos=False)
    assert c["messages"] == [{"role": "user", "content": "hi"}] and "prompt" not in c
    assert "ignore_eos" not in c and c["temperature"] == 0.5


@pytest.mark.parametrize("fake_server", [dict(ttft_s=0.15, gap_s=0.05)], indirect=True)
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_ttft_itl_and_usage(fake_server, endpoint):
    r = _send(fake_server, max_tokens=6, endpoint=endpoint)
    assert r.success, r.error
    assert r.output_tokens == 6  # from usage
    assert r.generated_text == " w0 w1 w2 w3 w4 w5"
    assert 0.14 <= r.ttft < 0.15 + 0.3
    assert len(r.itl) == 5  # gaps between the 6 text chunks; role and finish chunks don't count
    assert all(0.04 <= gap < 0.05 + 0.3 for gap in r.itl)
    assert r.latency >= r.ttft + sum(r.itl) - 1e-6
    sent = fake_server.config.received[-1]
    assert sent["max_tokens"] == 6 and sent["ignore_eos"] is True and sent["stream"] is True


@pytest.mark.parametrize("fake_server", [dict(usage=False)], indirect=True)
def test_no_usage_leaves_count_to_tokenizer(fake_server):
    r = _send(fake_server, max_tokens=4)
    assert r.success and r.output_tokens is None and r.generated_text == " w0 w1 w2 w3"


@pytest.mark.parametrize(
    "marker, expected",
    [
        ("FAIL_HTTP500", "HTTP 500"),
        ("FAIL_STREAM_ERROR", "engine exploded"),
        ("FAIL_NO_DONE", "without 'data: [DONE]'"),
        ("FAIL_DROP", "RemoteProtocolError"),
    ],
)
def test_failures_carry_their_error(fake_server, marker, expected):
    r = _send(fake_server, prompt=f"x {marker} y")
    assert not r.success
    assert expected in r.error


def test_connection_refused_is_a_failure():
    class Nowhere:
        base_url = "http://127.0.0.1:9"  # discard port: nothing listens

    r = _send(Nowhere(), timeout=2.0)
    assert not r.success and "ConnectError" in r.error


@pytest.mark.parametrize("fake_server", [dict(gap_s=0.001)], indirect=True)
def test_run_requests_counts_failures_and_caps_concurrency(fake_server):
    # Failures are chosen by prompt, not by arrival order: with two requests in flight, which
    # one reaches the server first is up to the scheduler.
    failing = {2, 6, 10}
    requests = [
        SampleRequest(f"prompt {i}" + (" FAIL_HTTP500" if i in failing else ""), 5, 3)
        for i in range(12)
    ]
    results, duration = asyncio.run(
        serve.run_requests(
            fake_server.base_url,
            "/v1/completions",
            "m",
            requests,
            request_rate=math.inf,
            max_concurrency=2,
            disable_tqdm=True,
        )
    )
    assert duration > 0
    assert [i for i, r in enumerate(results) if not r.success] == sorted(failing)
    assert all("HTTP 500" in results[i].error for i in failing)
    assert len(fake_server.config.received) == 13  # the warm-up, then each request once
    assert 1 <= fake_server.config.max_in_flight <= 2
    warm = fake_server.config.received[0]
    assert warm["prompt"] == "prompt 0" and warm["max_tokens"] == 3  # min(expected output, 16)


def test_run_requests_follows_the_arrival_schedule(fake_server):
    requests = [SampleRequest("p", 1, 1) for _ in range(10)]
    results, duration = asyncio.run(
        serve.run_requests(
            fake_server.base_url,
            "/v1/completions",
            "m",
            requests,
            request_rate=20.0,
            seed=0,
            disable_tqdm=True,
        )
    )
    starts = sorted(r.start_time for r in results)
    from graphwise.bench.metrics import arrival_times

    expected = arrival_times(10, 20.0, seed=0)
    assert max(abs((s - starts[0]) - e) for s, e in zip(starts, expected, strict=True)) < 0.1
    assert duration >= expected[-1]


def test_warmup_failure_is_an_error(fake_server):
    with pytest.raises(ValueError, match="warm-up"):
        asyncio.run(
            serve.run_requests(
                fake_server.base_url,
                "/v1/completions",
                "m",
                [SampleRequest("FAIL_HTTP500", 1, 2)],
                disable_tqdm=True,
            )
        )


@pytest.mark.parametrize("fake_server", [dict(fail_every=5)], indirect=True)
def test_bench_serve_command_writes_complete_json(fake_server, tokenizer, tmp_path, capsys):
    out = tmp_path / "result.json"
    args = serve.parse_args(
        [
            "--base-url",
            fake_server.base_url,
            "--dataset",
            "random",
            "--random-input-len",
            "32",
            "--random-output-len",
            "8",
            "--num-prompts",
            "12",
            "--request-rate",
            "50",
            "--burstiness",
            "0.5",
            "--max-concurrency",
            "4",
            "--seed",
            "1",
            "--save-result",
            str(out),
            "--disable-tqdm",
            "--save-detailed",
        ]
    )
    assert serve.run(args) == 0
    result = json.loads(out.read_text())
    for key in (
        "duration",
        "completed",
        "failed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "date",
        "base_url",
        "model",
        "dataset",
        "num_prompts",
        "request_rate",
        "burstiness",
        "max_concurrency",
        "seed",
        "errors",
    ):
        assert key in result, key
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p99"):
            assert isinstance(result[f"{stat}_{metric}_ms"], float)
    assert result["model"] == "SmolLM2-135M-Instruct"  # from /v1/models
    assert result["num_prompts"] == 12 and result["completed"] + result["failed"] == 12
    assert result["failed"] == 2 and len(result["errors"]) == 2  # POSTs 5 and 10
    assert all("HTTP 500" in e for e in result["errors"])
    assert result["total_output_tokens"] == 8 * 10  # usage, with ignore_eos lengths
    assert result["request_rate"] == 50.0 and result["burstiness"] == 0.5
    assert len(result["itls"]) == 12
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "2 failed request(s)" in printed
    sent = fake_server.config.received
    assert all(r["model"] == "SmolLM2-135M-Instruct" for r in sent)


@pytest.mark.parametrize("fake_server", [dict(usage=False)], indirect=True)
def test_bench_serve_counts_tokens_without_usage(fake_server, tokenizer):
    args = serve.parse_args(
        [
            "--base-url",
            fake_server.base_url,
            "--endpoint",
            "/v1/chat/completions",
            "--dataset",
            "random",
            "--random-input-len",
            "16",
            "--random-output-len",
            "4",
            "--num-prompts",
            "3",
            "--disable-tqdm",
        ]
    )
    result = serve.execute(args)
    per_request = len(tokenizer(" w0 w1 w2 w3", add_special_tokens=False).input_ids)
    assert result["completed"] == 3
    assert result["total_output_tokens"] == 3 * per_request
    assert result["backend"] == "openai-chat"


def test_bench_serve_unreachable_server_is_a_clear_error():
    args = serve.parse_args(["--base-url", "http://127.0.0.1:9", "--num-prompts", "1"])
    with pytest.raises(ValueError, match="could not list models"):
        serve.execute(args)


@pytest.mark.parametrize("fake_server", [dict(api_key="sk-test")], indirect=True)
def test_api_key(fake_server, tokenizer, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("GRAPHWISE_API_KEY", raising=False)
    argv = ["--base-url", fake_server.base_url, "--dataset", "random", "--random-input-len", "8"]
    argv += ["--random-output-len", "2", "--num-prompts", "2", "--disable-tqdm"]
    with pytest.raises(ValueError, match="401"):
        serve.execute(serve.parse_args(argv))
    result = serve.execute(serve.parse_args(argv + ["--api-key", "sk-test"]))
    assert result["completed"] == 2
