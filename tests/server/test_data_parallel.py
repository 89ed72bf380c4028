"""`graphwise serve --data-parallel-size 2`: two engine replicas behind one OpenAI server."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, start_server

# Starts processes (servers, ranks): run by .ci/run, left out of the inner loop (-m "not slow").
pytestmark = pytest.mark.slow


def test_dp2_server_answers_like_one_engine(tmp_path, tiny_chat_dir, tiny_chat_llm):
    from graphwise import SamplingParams

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ref = tiny_chat_llm.chat(chat, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    server = start_server(tmp_path, "--data-parallel-size", "2", "--model", str(tiny_chat_dir))
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, timeout=120)
        name = client.models.list().data[0].id
        answers = []
        for _ in range(2):
            r = client.chat.completions.create(
                model=name, messages=chat, temperature=0, max_tokens=16
            )
            answers.append(r.choices[0].message.content)
        assert answers == [ref[0].outputs[0].text] * 2
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 200
    finally:
        assert server.stop() == 0, server.log_tail()
