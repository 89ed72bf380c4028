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


def test_prompt_errors(tiny_chat_llm):
    engine = tiny_chat_llm.llm_engine
    too_long = [1] * engine.max_model_len
    with pytest.raises(ValueError, match="max_model_len"):
        tiny_chat_llm.generate({"prompt_token_ids": too_long}, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        tiny_chat_llm.generate({"prompt_token_ids": [10**9]}, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt"):
        tiny_chat_llm.generate([{"nothing": 1}], use_tqdm=False)
    # A failed submission leaves nothing queued and no blocks held.
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_used_blocks == 0


def test_stop_string_truncates_and_reports(tiny_chat_llm):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    full = tiny_chat_llm.chat(chat, params, use_tqdm=False)[0].outputs[0].text
    assert len(full) > 12
    stop = full[8:12]  # four characters from the middle of the greedy text
    out = tiny_chat_llm.chat(
        chat,
        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.text == full[: full.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_stop_token_ids_and_min_tokens(tiny_chat_llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    base = tiny_chat_llm.generate("The sun is", greedy, use_tqdm=False)[0].outputs[0].token_ids
    third = base[2]
    out = tiny_chat_llm.generate(
        "The sun is",
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[third], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    first = base.index(third)
    assert out.token_ids == base[: first + 1] and out.finish_reason == "stop"
    assert out.stop_reason == third
    # min_tokens: the stop token cannot end the answer before it.
    held = tiny_chat_llm.generate(
        "The sun is",
        SamplingParams(
            temperature=0,
            max_tokens=12,
            stop_token_ids=[third],
            min_tokens=first + 2,
            ignore_eos=True,
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(held.token_ids) >= first + 2
    assert third not in held.token_ids[: first + 2]


def test_seeded_sampling_is_reproducible_across_batches(tiny_chat_llm):
    p = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=1234, ignore_eos=True
    )
    alone = tiny_chat_llm.generate("Tell me a story", p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True) for _ in range(3)]
    batch = tiny_chat_llm.generate(
        ["Hello", "Tell me a story", "Why is the sky blue?", "Hi"],
        [others[0], p, others[1], others[2]],
        use_tqdm=False,
    )
    assert batch[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=99, ignore_eos=True
    )
    assert (
        tiny_chat_llm.generate("Tell me a story", other_seed, use_tqdm=False)[0]
        .outputs[0]
        .token_ids
        != alone
    )


def test_top_k_one_is_greedy(tiny_chat_llm):
    greedy = tiny_chat_llm.generate(
        "Paris is", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    topk = tiny_chat_llm.generate(
        "Paris is",
        SamplingParams(temperature=1.5, top_k=1, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )
    assert greedy[0].outputs[0].token_ids == topk[0].outputs[0].token_ids


def test_incremental_detokenizer_handles_multibyte_characters(tiny_chat_llm):
    tok = tiny_chat_llm.get_tokenizer()
    text = "Café ☕ 日本語 🙂 ok"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.slow
def test_generate_cli_answers_like_the_offline_chat(tiny_chat_dir, tiny_chat_llm):
    """`graphwise generate` (the README's first command; on the real model, "Paris" is checked
    by tests/models/test_default_model.py) prints the greedy chat answer."""
    question = "What is the capital of France?"
    proc = subprocess.run(
        [sys.executable, "-m", "graphwise.cli", "--log-level", "WARNING", "generate", question,
         "--model", str(tiny_chat_dir), "--max-tokens", "12", "--max-model-len", "1024"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = (
        tiny_chat_llm.chat(
            [{"role": "user", "content": question}],
            SamplingParams(temperature=0, max_tokens=12),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .text
    )
    assert proc.stdout == want.strip() + "\n"


def test_generate_cli_bad_input_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "graphwise.cli", "generate", "hi", "--model", "/no/such/model"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
