"""SIGTERM drains: in-flight requests finish, new ones are turned away, the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

# Starts processes (servers, ranks): run by .ci/run, left out of the inner loop (-m "not slow").
pytestmark = pytest.mark.slow

EXIT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory, server_factory, tiny_chat_dir):
    srv = server_factory(tmp_path_factory.mktemp("shutdown"), "--model", str(tiny_chat_dir))
    try:
        yield srv
    finally:
        srv.stop(timeout=10)  # a no-op when the test already saw it exit


def test_sigterm_drains_in_flight_requests(own_server) -> None:
    srv = own_server
    headers = {"Authorization": f"Bearer {srv.api_key}"}
    body = {"prompt": "Count slowly:", "max_tokens": 48, "ignore_eos": True, "temperature": 0}
    side: dict[str, object] = {}

    def non_streaming() -> None:  # a second request in flight, without streaming
        with httpx.Client(trust_env=False, timeout=120) as c:
            side["resp"] = c.post(srv.base_url + "/completions", json=body, headers=headers)

    lines: list[str] = []
    with httpx.Client(trust_env=False, timeout=120) as c:
        stream_body = {**body, "stream": True}
        with c.stream(
            "POST", srv.base_url + "/completions", json=stream_body, headers=headers
        ) as r:
            assert r.status_code == 200
            worker = threading.Thread(target=non_streaming)
            it = r.iter_lines()
            for line in it:
                if line.startswith("data: "):
                    lines.append(line)
                    break
            worker.start()
            time.sleep(0.5)  # let the second request reach the engine
            srv.proc.send_signal(signal.SIGTERM)
            # New work is refused now: the listener is closed (or, on a connection that
            # raced in, the answer is 503).
            try:
                with httpx.Client(trust_env=False, timeout=5) as fresh:
                    late = fresh.post(srv.base_url + "/completions", json=body, headers=headers)
                assert late.status_code == 503, late.text
            except httpx.TransportError:
                pass
            lines.extend(line for line in it if line.startswith("data: "))
    worker.join(60)

    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    resp = side["resp"]
    assert isinstance(resp, httpx.Response) and resp.status_code == 200, resp
    assert resp.json()["usage"]["completion_tokens"] == 48
    assert srv.proc.wait(EXIT_TIMEOUT_S) == 0, srv.log_tail()
