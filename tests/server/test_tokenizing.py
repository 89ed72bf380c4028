"""The no-tokenizing prompt bound (it must never refuse a text that fits), the body and node
limits derived from it, and the tokenizer lanes."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from graphwise.server.protocol import APIError, count_json_nodes
from graphwise.server.tokenizing import PromptLimits, TokenBound, TokenizerLanes, token_bound
from graphwise.tokenizer import render_chat

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42\n\n\n",
    "Ünïcödé text, 中文字符, emoji 🙂🙂 and    spaces\t\ttabs.",
    '[[1, 2], {"a": 3}] <tag> ----- ===== ##### ',
] * 20


def _wrap(tk: Tokenizer) -> Any:
    """What token_bound reads from a HF tokenizer: its Rust backend."""
    return SimpleNamespace(backend_tokenizer=tk)


def _byte_level_bpe() -> Tokenizer:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    # An alphabet without a few bytes (as SmolLM2's lacks \x04): those are dropped.
    alphabet = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in ("Ą", "ą")]
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    tk.add_special_tokens(["<|im_start|>", "<|a-much-longer-special-token-than-any-word|>"])
    return tk


def _sentencepiece_like() -> Tokenizer:
    """Llama-2 style: BPE with byte fallback, '▁' for spaces, NFKC first."""
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
    specials = ["<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    return tk


PIECE = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=20),  # astral and control characters too
    st.sampled_from(["\x04", "\x13", "\U00040000", " ", "\n", "▁", "𝐀", "ᄀ", "ᅡ", "ᆨ", "K"]),
    st.sampled_from(["<|im_start|>", "<|a-much-longer-special-token-than-any-word|>"]),
)


def _nfkc_runs() -> Tokenizer:
    """Its longest tokens are runs of 'A', which NFKC makes out of 4-byte '𝐀': the shrink."""
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.NFKC()
    specials = ["<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tk.train_from_iterator(["A" * 64] * 20, trainer)
    return tk


TEXT = st.lists(PIECE, max_size=30).map("".join)
RUNS = st.lists(
    st.sampled_from([" ", "\n", "#", "=", "-", "a", "\x04", "𝐀", "Ａ"]), max_size=8
).flatmap(
    lambda chars: st.lists(st.integers(1, 200), min_size=len(chars), max_size=len(chars)).map(
        lambda counts: "".join(c * n for c, n in zip(chars, counts, strict=True))
    )
)  # long runs of one character: where the longest tokens are


def _assert_lower_bound(bound: TokenBound, encode: Any, text: str) -> None:
    actual = len(encode(text))
    assert bound.min_tokens(text) <= actual, (bound.min_tokens(text), actual, text)


def test_default_tokenizer_bound_is_its_longest_token(default_tokenizer: Any) -> None:
    bound, why = token_bound(default_tokenizer)
    assert bound is not None, why
    assert bound.bytes_per_token == 81  # '\n' and 80 spaces, one byte per character
    assert b"\x04" in bound.dropped and b"a" not in bound.dropped
    assert default_tokenizer.encode("\x04" * 50) == []  # why dropped bytes are not counted
    assert bound.min_tokens("\x04" * 50) == 0


def test_bound_never_exceeds_the_real_count_default(default_tokenizer: Any) -> None:
    bound, _ = token_bound(default_tokenizer)
    assert bound is not None

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=st.one_of(TEXT, RUNS))
    def check(text: str) -> None:
        _assert_lower_bound(bound, lambda t: default_tokenizer.encode(t), text)

    check()


@pytest.mark.parametrize("build", [_byte_level_bpe, _sentencepiece_like, _nfkc_runs])
def test_bound_never_exceeds_the_real_count_synthetic(build: Any) -> None:
    tk = build()
    bound, why = token_bound(_wrap(tk))
    assert bound is not None, why

    @settings(max_examples=150, deadline=None)
    @given(text=st.one_of(TEXT, RUNS))
    def check(text: str) -> None:
        _assert_lower_bound(bound, lambda t: tk.encode(t).ids, text)

    check()


def _with(tk: Tokenizer, **parts: Any) -> Tokenizer:
    for name, value in parts.items():
        setattr(tk, name, value)
    return tk


def _wordpiece() -> Tokenizer:
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()  # keeps text: the model is what drops it
    tk.train_from_iterator(CORPUS, trainers.WordPieceTrainer(special_tokens=["[UNK]"]))
    return tk


@pytest.mark.parametrize(
    "make, reason",
    [
        (_wordpiece, "WordPiece"),  # a 100-letter word is one [UNK]
        (lambda: _with(_byte_level_bpe(), normalizer=normalizers.Strip()), "Strip"),
        (lambda: _with(_byte_level_bpe(), normalizer=normalizers.StripAccents()), "StripAccents"),
        (
            lambda: _with(_byte_level_bpe(), normalizer=normalizers.Replace("a", "")),
            "deletes",
        ),
        (
            lambda: _with(
                _byte_level_bpe(),
                pre_tokenizer=pre_tokenizers.Sequence(
                    [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel()]
                ),
            ),
            "WhitespaceSplit",
        ),
    ],
)
def test_tokenizers_that_drop_text_get_no_bound(make: Any, reason: str) -> None:
    bound, why = token_bound(_wrap(make()))
    assert bound is None and reason in why


def test_added_token_that_swallows_whitespace_gets_no_bound() -> None:
    tk = _byte_level_bpe()
    tk.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    assert tk.encode("a" + " " * 500 + "<mask>").ids[-1] == tk.token_to_id("<mask>")
    bound, why = token_bound(_wrap(tk))
    assert bound is None and "lstrip" in why


def test_no_backend_no_bound() -> None:
    assert token_bound(object())[0] is None


def test_check_text_refuses_only_what_cannot_fit(default_tokenizer: Any) -> None:
    bound, _ = token_bound(default_tokenizer)
    limits = PromptLimits(max_model_len=64, bound=bound)
    limits.check_text("x" * (63 * 81), "prompt")  # could, in theory, be 63 tokens
    with pytest.raises(APIError) as exc:
        limits.check_text("x" * (63 * 81 + 1), "prompt")
    assert exc.value.status == 400 and exc.value.code == "context_length_exceeded"
    assert exc.value.param == "prompt" and "at least 64 tokens" in exc.value.message
    limits.check_text("\x04" * 100_000, "prompt")  # dropped bytes: no tokens, no refusal
    PromptLimits(64, None).check_text("x" * 10**6, "prompt")  # no bound: no claim


def test_body_limit() -> None:
    bound = TokenBound(bytes_per_token=81)
    assert PromptLimits(1024, bound).body_limit(32 << 20) == 1024 * 6 * 81 + 64 * 1024
    assert PromptLimits(1 << 20, bound).body_limit(32 << 20) == 32 << 20  # the cap wins
    assert PromptLimits(1024, None).body_limit(32 << 20) == 32 << 20  # unknown density
    ids_only = PromptLimits(1024, None, text_prompts=False)
    assert ids_only.body_limit(32 << 20) == 1024 * 32 + 64 * 1024
    # Room for a batch: that many contexts (the slack for the other fields once).
    assert PromptLimits(1024, bound).body_limit(32 << 20, 16) == 16 * 1024 * 6 * 81 + 64 * 1024
    assert ids_only.body_limit(32 << 20, 16) == 16 * 1024 * 32 + 64 * 1024


def test_count_json_nodes() -> None:
    assert count_json_nodes(b'{"prompt": [1, 2, 3]}', 100) == 3  # {, [, "prompt"
    tricky = b'{"prompt": "[[[{{{\\"]]]", "stop": ["a", "b\\\\"]}'
    assert count_json_nodes(tricky, 0) == 7  # {, [, 5 strings: brackets in strings left out
    assert count_json_nodes(b"[" * 50 + b"]" * 50, 10) == 50


def test_rendered_chat_encodes_to_hf_template_ids(default_tokenizer: Any) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <|im_start|> there\n\n"},
    ]
    for gen in (True, False):
        text = render_chat(default_tokenizer, conversation, gen)
        ids = default_tokenizer.encode(text, add_special_tokens=False)
        hf = default_tokenizer.apply_chat_template(
            conversation, add_generation_prompt=gen, tokenize=True
        )
        assert ids == list(hf["input_ids"] if hasattr(hf, "keys") else hf)


def test_render_chat_without_template_names_the_problem() -> None:
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(SimpleNamespace(chat_template=None), [{"role": "user", "content": "x"}], True)


def test_a_long_input_never_queues_a_short_one() -> None:
    lanes = TokenizerLanes(SimpleNamespace(name="tok"), short_chars=100)
    release = threading.Event()

    def slow(tok: Any) -> str:
        release.wait(10)
        return "long"

    async def main() -> None:
        long_job = asyncio.ensure_future(lanes.run(slow, size=10_000))
        await asyncio.sleep(0.05)  # the long lane is busy now
        start = time.monotonic()
        assert await lanes.run(lambda tok: tok.name, size=10) == "tok"
        assert time.monotonic() - start < 1.0
        assert not long_job.done()
        release.set()
        assert await long_job == "long"

    try:
        asyncio.run(main())
    finally:
        release.set()
        lanes.shutdown()


def test_render_chat_passes_template_variables(default_tokenizer: Any) -> None:
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    opened = render_chat(default_tokenizer, conversation, False, continue_final_message=True)
    assert opened.endswith("<|im_start|>assistant\nHel")  # no end-of-turn: the model goes on
    with pytest.raises(ValueError, match="'tokenize'"):
        render_chat(default_tokenizer, conversation, template_kwargs={"tokenize": True})
    plain = render_chat(default_tokenizer, conversation)
    assert render_chat(default_tokenizer, conversation, template_kwargs={"x": 1}) == plain
