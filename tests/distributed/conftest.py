"""Helpers for the multi-process tests: engines that are always shut down, worker liveness."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from graphwise import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def prompts(seed: int = 1, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(40)]
    return [
        [rng.randrange(vocab) for _ in range(5)],
        [rng.randrange(vocab) for _ in range(23)],
        shared + [rng.randrange(vocab) for _ in range(7)],
        shared + [rng.randrange(vocab) for _ in range(3)],
        [rng.randrange(vocab) for _ in range(61)],
    ]


def generate(llm: LLM, ps: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def worker_pids(llm: LLM) -> list[int]:
    return llm.llm_engine.executor.worker_pids


@pytest.fixture
def make_llm():
    """LLM(...) that is shut down at the end of the test, whatever happens."""
    made: list[LLM] = []

    def make(path: Path, **options) -> LLM:
        llm = LLM(model=str(path), block_size=8, **options)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.shutdown()


@pytest.fixture(scope="session")
def tiny_single_kv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with one KV head: on two ranks the KV head is replicated."""
    import torch
    import transformers as tf

    from tests.conftest import TINY_COMMON

    torch.manual_seed(3)
    cfg = tf.LlamaConfig(**{**TINY_COMMON, "num_key_value_heads": 1, "vocab_size": 509})
    path = tmp_path_factory.mktemp("llama_kv1")
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(autouse=True)
def _no_leftover_failure_injection(monkeypatch):
    for name in ("GRAPHWISE_TEST_FAIL_RANK", "GRAPHWISE_TEST_FAIL_MODE"):
        monkeypatch.delenv(name, raising=False)
    # Spawned workers call tests/distributed/faults.py, which injects only when the above are set.
    monkeypatch.setenv("GRAPHWISE_TEST_WORKER_HOOK", "tests.distributed.faults:inject")
    monkeypatch.setenv("GRAPHWISE_DISTRIBUTED_TIMEOUT_S", os.environ.get("GW_TEST_TIMEOUT", "60"))
