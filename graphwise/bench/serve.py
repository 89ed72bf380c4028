"""`graphwise bench serve`: a serving benchmark against any OpenAI-compatible server.

Requests stream (SSE) so time to first token and inter-token latencies are measured on the
client. Arrivals are a Poisson process at `--request-rate` (gamma gaps with `--burstiness` != 1,
all at once for `inf`), capped by `--max-concurrency`. One warm-up request goes first and is not
counted. Requests ask for exactly the sampled output length (`max_tokens` with `ignore_eos`,
temperature 0 by default); output tokens are taken from the server's `usage` when it streams one
(`stream_options.include_usage`), otherwise counted by tokenizing the streamed text.

Metric names and definitions follow vLLM (see `graphwise.bench.metrics`); `--save-result FILE`
writes them as JSON together with the run's settings and the failed requests' errors.

    graphwise bench serve --base-url http://127.0.0.1:8000 --dataset sharegpt \\
        --num-prompts 200 --request-rate 4 --save-result out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from graphwise.bench.datasets import SampleRequest, resolve_tokenizer, sample_requests
from graphwise.bench.metrics import (
    LATENCY_METRICS,
    RequestResult,
    arrival_times,
    compute_metrics,
)

logger = logging.getLogger(__name__)

WARMUP_MAX_TOKENS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root URL")
    parser.add_argument(
        "--endpoint",
        default="/v1/completions",
        help="/v1/completions (default) or /v1/chat/completions",
    )
    parser.add_argument(
        "--model", default=None, help="model name to send (default: ask /v1/models)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY") or os.environ.get("GRAPHWISE_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default $OPENAI_API_KEY or $GRAPHWISE_API_KEY)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="HF tokenizer dir or .gguf file (default: the served model's, if local)",
    )
    g = parser.add_argument_group("dataset")
    g.add_argument(
        "--dataset", "--dataset-name", choices=["sharegpt", "random"], default="sharegpt"
    )
    g.add_argument("--dataset-path", default=None, help="ShareGPT JSON (default: the package's)")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--sharegpt-output-len", type=int, default=None, help="fix every output length")
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [len * (1 - r), len * (1 + r)], 0 <= r < 1",
    )
    g.add_argument("--seed", type=int, default=0)
    t = parser.add_argument_group("traffic")
    t.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s; inf = all at once"
    )
    t.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the gaps: 1 = Poisson, < 1 burstier, > 1 more regular",
    )
    t.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    t.add_argument("--temperature", type=float, default=0.0)
    t.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send ignore_eos so every request produces its full output length (default: on)",
    )
    t.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds without progress (connect, or no bytes) before a request fails",
    )
    o = parser.add_argument_group("output")
    o.add_argument("--save-result", default=None, metavar="FILE", help="write the result JSON here")
    o.add_argument(
        "--save-detailed",
        action="store_true",
        help="also save per-request input/output lengths, TTFTs, ITLs and E2ELs",
    )
    o.add_argument("--disable-tqdm", action="store_true")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse `bench serve` flags without the top-level CLI (used by `bench sweep`)."""
    parser = argparse.ArgumentParser(prog="graphwise bench serve", allow_abbrev=False)
    add_arguments(parser)
    return parser.parse_args(list(argv))


# --------------------------------------------------------------------------- the client


def is_chat_endpoint(endpoint: str) -> bool:
    return endpoint.rstrip("/").endswith("chat/completions")


def build_payload(
    endpoint: str,
    model: str,
    prompt: str,
    max_tokens: int,
    temperature: float = 0.0,
    ignore_eos: bool = True,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if is_chat_endpoint(endpoint):
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    if ignore_eos:
        payload["ignore_eos"] = True
    return payload


def _chunk_text(choice: dict[str, Any], chat: bool) -> str:
    if chat:
        delta = choice.get("delta") or {}
        text = delta.get("content")
    else:
        text = choice.get("text")
    return text if isinstance(text, str) else ""


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


async def send_request(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    result: RequestResult,
) -> RequestResult:
    """Send one streaming request and fill `result` with what the client observed.

    A chunk counts as a token event only if it carries text (a chat role-only chunk or the
    finish chunk does not). The request fails on a non-200 status, an error object in the
    stream, a connection or timeout error, no text at all, or a stream without `[DONE]`.
    """
    chat = "messages" in payload
    parts: list[str] = []
    last: float | None = None
    done = False
    start = time.perf_counter()
    result.start_time = start
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", errors="replace").strip()
                result.error = f"HTTP {response.status_code}: {body[:500]}"
                return result
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if done or not line.startswith("data:"):
                    continue  # blank separators, comments, event:/id: fields, after [DONE]
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = f"error in stream: {_error_text(chunk['error'])}"
                    return result
                usage = chunk.get("usage")
                if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                    result.output_tokens = int(usage["completion_tokens"])
                for choice in chunk.get("choices") or []:
                    text = _chunk_text(choice, chat)
                    if not text:
                        continue
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    parts.append(text)
        end = time.perf_counter()
    except Exception as exc:  # connection, timeout, protocol or malformed-chunk errors
        detail = str(exc).strip()
        result.error = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        return result
    result.generated_text = "".join(parts)
    if not done:
        result.error = "stream ended without 'data: [DONE]'"
    elif last is None:
        result.error = "no text was streamed"
    else:
        result.latency = end - start
        result.success = True
    return result


def _trust_env(base_url: str) -> bool:
    """Proxies from the environment never apply to loopback servers."""
    host = urlparse(base_url).hostname or ""
    return not (host == "localhost" or host == "::1" or host.startswith("127."))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def served_models(
    base_url: str, timeout: float = 10.0, api_key: str | None = None
) -> list[dict[str, Any]]:
    """The entries of the server's `GET /v1/models`."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        response = httpx.get(
            url, timeout=timeout, headers=_headers(api_key), trust_env=_trust_env(base_url)
        )
        response.raise_for_status()
        data = response.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        raise ValueError(f"could not list models at {url}: {type(exc).__name__}: {exc}") from exc
    return [m for m in data if isinstance(m, dict) and m.get("id")]


async def run_requests(
    base_url: str,
    endpoint: str,
    model: str,
    requests: Sequence[SampleRequest],
    request_rate: float = math.inf,
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    seed: int = 0,
    temperature: float = 0.0,
    ignore_eos: bool = True,
    request_timeout: float = 600.0,
    disable_tqdm: bool = False,
    warmup: bool = True,
    api_key: str | None = None,
) -> tuple[list[RequestResult], float]:
    """Warm up, then send `requests` on their arrival schedule; returns results and duration."""
    if not requests:
        raise ValueError("no requests to send")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be positive, got {max_concurrency}")
    offsets = arrival_times(len(requests), request_rate, burstiness, seed)
    url = base_url.rstrip("/") + "/" + endpoint.lstrip("/")
    connections = max_concurrency or len(requests)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(request_timeout, pool=None),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        trust_env=_trust_env(base_url),
        headers=_headers(api_key),
    )

    def payload(req: SampleRequest, max_tokens: int) -> dict[str, Any]:
        return build_payload(endpoint, model, req.prompt, max_tokens, temperature, ignore_eos)

    async with client:
        if warmup:
            first = requests[0]
            warm = await send_request(
                client,
                url,
                payload(first, min(first.expected_output_len, WARMUP_MAX_TOKENS)),
                RequestResult(first.prompt_len, first.expected_output_len),
            )
            if not warm.success:
                raise ValueError(f"the warm-up request to {url} failed: {warm.error}")

        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="requests", unit="req")
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        start = time.perf_counter()

        async def one(i: int, req: SampleRequest) -> RequestResult:
            delay = start + float(offsets[i]) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            result = RequestResult(req.prompt_len, req.expected_output_len)
            body = payload(req, req.expected_output_len)
            if semaphore is None:
                await send_request(client, url, body, result)
            else:
                async with semaphore:
                    await send_request(client, url, body, result)
            bar.update(1)
            return result

        try:
            results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        finally:
            bar.close()
        duration = time.perf_counter() - start
    return list(results), duration


# --------------------------------------------------------------------------- the command


def _rate_value(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def quiet_http_logs() -> None:
    """httpx logs every request at INFO: thousands of lines in a benchmark."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))


def execute(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed arguments; returns the result dictionary."""
    quiet_http_logs()
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be positive, got {args.num_prompts}")
    if args.model is None or args.tokenizer is None:
        try:
            models = served_models(args.base_url, api_key=args.api_key)
        except ValueError:
            if args.model is None:
                raise
            models = []
    else:
        models = []
    if args.model is None:
        entry = models[0] if models else None
    else:  # the named model's entry, if the server lists it
        entry = next((m for m in models if m["id"] == args.model), None)
    model = args.model or (entry["id"] if entry else None)
    if not model:
        raise ValueError(f"{args.base_url}/v1/models lists no model; pass --model NAME")
    served = [str(entry.get(k)) for k in ("root", "id") if entry and entry.get(k)] or [model]
    tokenizer, tokenizer_source = resolve_tokenizer(args.tokenizer, served)
    requests = sample_requests(args, tokenizer)
    logger.info(
        "%d %s requests (%d prompt tokens) at %s req/s against %s%s",
        len(requests),
        args.dataset,
        sum(r.prompt_len for r in requests),
        _rate_value(args.request_rate),
        args.base_url,
        args.endpoint,
    )
    results, duration = asyncio.run(
        run_requests(
            args.base_url,
            args.endpoint,
            model,
            requests,
            request_rate=args.request_rate,
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
            seed=args.seed,
            temperature=args.temperature,
            ignore_eos=args.ignore_eos,
            request_timeout=args.request_timeout,
            disable_tqdm=args.disable_tqdm,
            api_key=args.api_key,
        )
    )
    for r in results:
        if r.success and r.output_tokens is None:
            r.output_tokens = len(tokenizer(r.generated_text, add_special_tokens=False).input_ids)
    return build_result(args, model, tokenizer_source, results, duration)


def build_result(
    args: argparse.Namespace,
    model: str,
    tokenizer_source: str,
    results: Sequence[RequestResult],
    duration: float,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if is_chat_endpoint(args.endpoint) else "openai",
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": model,
        "tokenizer": tokenizer_source,
        "dataset": args.dataset,
        "num_prompts": len(results),
        "request_rate": _rate_value(args.request_rate),
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
    }
    if args.dataset == "sharegpt":
        out["sharegpt_output_len"] = args.sharegpt_output_len
    else:
        out["random_input_len"] = args.random_input_len
        out["random_output_len"] = args.random_output_len
        out["random_range_ratio"] = args.random_range_ratio
    out.update(compute_metrics(results, duration))
    out["errors"] = [f"request {i}: {r.error}" for i, r in enumerate(results) if not r.success]
    if getattr(args, "save_detailed", False):
        out["input_lens"] = [r.prompt_len for r in results]
        out["output_lens"] = [r.output_tokens if r.success else 0 for r in results]
        out["ttfts"] = [r.ttft if r.success else None for r in results]
        out["itls"] = [r.itl if r.success else [] for r in results]
        out["e2els"] = [r.latency if r.success else None for r in results]
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_result(result: dict[str, Any]) -> str:
    """The terminal summary: one aligned line per number, vLLM's layout."""
    rows: list[tuple[str, Any] | str] = [
        "Serving Benchmark Result",
        ("Model", result["model"]),
        ("Dataset", f"{result['dataset']} ({result['num_prompts']} prompts)"),
        ("Request rate (req/s)", result["request_rate"]),
        ("Burstiness", result["burstiness"]),
        ("Max concurrency", result["max_concurrency"]),
        ("Successful requests", result["completed"]),
        ("Failed requests", result["failed"]),
        ("Benchmark duration (s)", result["duration"]),
        ("Total input tokens", result["total_input_tokens"]),
        ("Total generated tokens", result["total_output_tokens"]),
        ("Request throughput (req/s)", result["request_throughput"]),
        ("Output token throughput (tok/s)", result["output_throughput"]),
        ("Total token throughput (tok/s)", result["total_token_throughput"]),
    ]
    titles = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2el": "End-to-end Latency",
    }
    for metric in LATENCY_METRICS:
        rows.append(titles[metric])
        for stat in ("mean", "median", "std", "p99"):
            label = "P99" if stat == "p99" else stat.capitalize()
            rows.append((f"{label} {metric.upper()} (ms)", result[f"{stat}_{metric}_ms"]))
    width = 50
    lines = []
    for row in rows:
        if isinstance(row, str):
            lines.append(f" {row} ".center(width, "=" if not lines else "-"))
        else:
            lines.append(f"{row[0] + ':':<40}{_fmt(row[1]):>10}")
    lines.append("=" * width)
    if result["errors"]:
        counts = Counter(e.split(": ", 1)[-1] for e in result["errors"])
        lines.append(f"{result['failed']} failed request(s):")
        for message, count in counts.most_common(5):
            lines.append(f"  {count} x {message}")
        if len(counts) > 5:
            lines.append(f"  ... and {len(counts) - 5} other error message(s)")
    return "\n".join(lines)


def save_result(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def run(args: argparse.Namespace) -> int:
    result = execute(args)
    print(format_result(result))
    if args.save_result:
        print(f"saved {save_result(result, args.save_result)}")
    return 0 if result["completed"] > 0 else 1
