"""`graphwise serve --speculative-config` with a draft model: the answer equals the offline
engine's without speculation, and /metrics counts the drafts (vLLM's spec_decode_* names)."""

from __future__ import annotations

import json

import httpx
import pytest

from graphwise import LLM, SamplingParams

# Starts a server process: run by .ci/run, left out of the inner loop (-m "not slow").
pytestmark = pytest.mark.slow

PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat"


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory: pytest.TempPathFactory, server_factory, tiny_chat_dir):
    spec = {"method": "draft_model", "model": str(tiny_chat_dir), "num_speculative_tokens": 3}
    srv = server_factory(
        tmp_path_factory.mktemp("spec"),
        "--model",
        str(tiny_chat_dir),
        "--speculative-config",
        json.dumps(spec),
    )
    try:
        yield srv
    finally:
        srv.stop()


def test_draft_model_speculation_in_the_server(spec_server, tiny_chat_dir, metric) -> None:
    srv = spec_server
    headers = {"Authorization": f"Bearer {srv.api_key}"}
    body = {"prompt": PROMPT, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    with httpx.Client(trust_env=False, timeout=120) as c:
        resp = c.post(srv.base_url + "/completions", json=body, headers=headers)
        assert resp.status_code == 200, resp.text
        text = resp.json()["choices"][0]["text"]
        metrics = c.get(srv.url + "/metrics").text
    plain = LLM(model=str(tiny_chat_dir), max_model_len=1024).generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False
    )
    assert text == plain[0].outputs[0].text
    drafts = metric(metrics, "graphwise:spec_decode_num_draft_tokens_total")
    accepted = metric(metrics, "graphwise:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and accepted == drafts  # the model drafting for itself: all accepted
    assert metric(metrics, "graphwise:spec_decode_num_drafts_total") > 0
