"""`graphwise serve --data-parallel-size 2`: two engine replicas behind one OpenAI server."""

from __future__ import annotations

import httpx
import openai

from tests.server.conftest import API_KEY, start_server


def test_dp2_server_answers_like_one_engine(tmp_path):
    server = start_server(tmp_path, "--data-parallel-size", "2")
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, timeout=120)
        answers = []
        for _ in range(2):
            r = client.chat.completions.create(
                model="SmolLM2-135M-Instruct",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                temperature=0,
                max_tokens=16,
            )
            answers.append(r.choices[0].message.content)
        assert all("Paris" in a for a in answers) and answers[0] == answers[1]
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 200
    finally:
        assert server.stop() == 0, server.log_tail()
