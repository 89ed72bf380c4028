"""The offline API on the embedded default: validation, stop conditions, seeds, detokenization."""

from __future__ import annotations

import subprocess
import sys

import pytest

from graphwise import LLM, SamplingParams
from graphwise.engine.detokenizer import IncrementalDetokenizer


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"stop": 3}, "stop"),
    ],
)
def test_sampling_params_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_path_and_architecture(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(model=str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(model=str(tmp_path))
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(model=str(tmp_path), not_an_option=1)


def test_prompt_errors(default_llm):
    engine = default_llm.llm_engine
    too_long = [1] * engine.max_model_len
    with pytest.raises(ValueError, match="max_model_len"):
        default_llm.generate({"prompt_token_ids": too_long}, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        default_llm.generate({"prompt_token_ids": [10**9]}, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt"):
        default_llm.generate([{"nothing": 1}], use_tqdm=False)
    # A failed submission leaves nothing queued and no blocks held.
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_used_blocks == 0


def test_stop_string_truncates_and_reports(default_llm):
    params = SamplingParams(temperature=0, max_tokens=32)
    full = (
        default_llm.chat(
            [{"role": "user", "content": "What is the capital of France?"}], params, use_tqdm=False
        )[0]
        .outputs[0]
        .text
    )
    assert "Paris" in full
    out = default_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32, stop=["Paris"]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.text == full[: full.index("Paris")]
    assert out.finish_reason == "stop" and out.stop_reason == "Paris"


def test_stop_token_ids_and_min_tokens(default_llm):
    base = default_llm.generate(
        "The sun is", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )[0]
    third = base.outputs[0].token_ids[2]
    out = default_llm.generate(
        "The sun is",
        SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[third]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids[-1] == third and out.finish_reason == "stop" and out.stop_reason == third
    # min_tokens: EOS cannot end the answer early.
    chat = [{"role": "user", "content": "Say yes."}]
    short = default_llm.chat(chat, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
    n = len(short[0].outputs[0].token_ids)
    longer = default_llm.chat(
        chat, SamplingParams(temperature=0, max_tokens=n + 16, min_tokens=n + 5), use_tqdm=False
    )
    assert len(longer[0].outputs[0].token_ids) >= n + 5


def test_seeded_sampling_is_reproducible_across_batches(default_llm):
    p = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=1234, ignore_eos=True
    )
    alone = default_llm.generate("Tell me a story", p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True) for _ in range(3)]
    batch = default_llm.generate(
        ["Hello", "Tell me a story", "Why is the sky blue?", "Hi"],
        [others[0], p, others[1], others[2]],
        use_tqdm=False,
    )
    assert batch[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=99, ignore_eos=True
    )
    assert (
        default_llm.generate("Tell me a story", other_seed, use_tqdm=False)[0].outputs[0].token_ids
        != alone
    )


def test_top_k_one_is_greedy(default_llm):
    greedy = default_llm.generate(
        "Paris is", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    topk = default_llm.generate(
        "Paris is",
        SamplingParams(temperature=1.5, top_k=1, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )
    assert greedy[0].outputs[0].token_ids == topk[0].outputs[0].token_ids


def test_incremental_detokenizer_handles_multibyte_characters(default_llm):
    tok = default_llm.get_tokenizer()
    text = "Café ☕ 日本語 🙂 ok"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_generate_cli_answers_paris():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "graphwise.cli",
            "generate",
            "What is the capital of France?",
            "--max-tokens",
            "24",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


def test_generate_cli_bad_input_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "graphwise.cli", "generate", "hi", "--model", "/no/such/model"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
