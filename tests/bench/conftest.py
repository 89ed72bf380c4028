"""Fixtures for the benchmark tests: the embedded tokenizer and a fake OpenAI SSE server on
127.0.0.1, always stopped."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from graphwise.bench import datasets

FAKE_SERVER_SCRIPT = Path(__file__).with_name("fake_openai_server.py")


def _load_fake_server_module():
    name = "graphwise_tests_fake_openai_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FAKE_SERVER_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fake_openai = _load_fake_server_module()


@pytest.fixture(scope="session")
def tokenizer():
    path = datasets.default_model_path()  # installed by scripts/bootstrap.sh
    return datasets.load_tokenizer(str(path))


@pytest.fixture
def fake_server(request):
    """A started FakeOpenAIServer; parametrize indirectly with FakeServerConfig fields (a dict)."""
    config = fake_openai.FakeServerConfig(**(getattr(request, "param", None) or {}))
    server = fake_openai.FakeOpenAIServer(config)
    server.start()
    try:
        yield server
    finally:
        server.stop()
