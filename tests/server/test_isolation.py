"""One bad request fails alone (issue 13): long requests stream on while every hostile input
of the battery is sent beside them; each hostile one gets its 4xx (a tiny temperature is not
hostile: it decodes greedily), and each long one finishes as if alone."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

LONG = {"prompt": "Count from one to a hundred:", "max_tokens": 48, "ignore_eos": True,
        "temperature": 0}  # fmt: skip

# (name, body or raw bytes, expected status, expected param)
HOSTILE: list[tuple[str, dict | bytes, int, str | None]] = [
    ("stop id out of vocab, min_tokens", {"prompt": "hi", "stop_token_ids": [10**6], "min_tokens": 4}, 400, "stop_token_ids"),
    ("negative stop id, min_tokens", {"prompt": "hi", "stop_token_ids": [-1], "min_tokens": 4}, 400, "stop_token_ids"),
    ("prompt id out of vocab", {"prompt": [1, 2, 10**7]}, 400, "prompt"),
    ("20 MB text prompt", {"prompt": "x" * (20 << 20)}, 413, None),
    ("text longer than the context", {"prompt": "hello " * 5000}, 400, "prompt"),
    ("deeply nested body", b"[" * 100000 + b"]" * 100000, 400, None),
    ("bad json", b'{"prompt": ', 400, None),
    ("n over 128", {"prompt": "hi", "n": 10**6}, 400, "n"),
]  # fmt: skip


def _stream_long(base: str, headers: dict[str, str], out: list[dict]) -> None:
    with httpx.Client(base_url=base, headers=headers, trust_env=False, timeout=300) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            text, reason = "", None
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    text += choice["text"]
                    reason = choice["finish_reason"] or reason
            out.append({"status": r.status_code, "text": text, "finish": reason})


def _drop_mid_body(port: int, key: str) -> None:
    """A client that announces a body and leaves halfway through it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"prompt": "hal'
        )


def test_hostile_requests_fail_alone(server, http: httpx.Client) -> None:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    alone = http.post("/v1/completions", json=LONG).json()["choices"][0]["text"]
    results: list[dict] = []
    longs = [
        threading.Thread(target=_stream_long, args=(server.url, headers, results)) for _ in range(3)
    ]
    for t in longs:
        t.start()
    time.sleep(0.5)  # they are decoding
    for name, body, status, param in HOSTILE:
        if isinstance(body, bytes):
            resp = http.post("/v1/completions", content=body)
        else:
            resp = http.post("/v1/completions", json=body)
        assert resp.status_code == status, (name, resp.text[:300])
        err = resp.json()["error"]
        assert err["param"] == param, (name, err)
    _drop_mid_body(server.port, server.api_key)
    greedy = http.post("/v1/completions", json={**LONG, "max_tokens": 8})
    tiny_t = http.post("/v1/completions", json={**LONG, "max_tokens": 8, "temperature": 1e-40})
    assert tiny_t.status_code == 200
    assert tiny_t.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    for t in longs:
        t.join(timeout=300)
    assert [r["status"] for r in results] == [200] * 3
    assert all(r["finish"] == "length" and r["text"] == alone for r in results), results
    assert http.get("/health").status_code == 200
    assert "Traceback" not in server.log_tail(400)
