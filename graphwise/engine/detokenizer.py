"""Incremental detokenization that is right for characters split across tokens.

Each step decodes a short window of tokens twice — with and without the newest tokens — and
emits the difference. A window that ends in an incomplete UTF-8 sequence (decoded as U+FFFD)
emits nothing until the next token completes it. Both decodes start at the same token, so
tokenizers that drop a leading space on the first token (SentencePiece) agree with themselves.
"""

from __future__ import annotations

from typing import Any

from graphwise.engine.sequence import Sequence


def detokenize_incrementally(tokenizer: Any, seq: Sequence, skip_special_tokens: bool) -> str:
    """Append the text of the newest output token(s) to seq.output_text; return what was added."""
    if tokenizer is None:
        return ""
    # Only the window is sliced out (copying the whole output list per token per sequence
    # costs O(length) each step at large batch).
    start = seq.num_prompt_tokens
    window = seq.token_ids[start + seq.prefix_offset :]
    prefix_text = tokenizer.decode(
        window[: seq.read_offset - seq.prefix_offset], skip_special_tokens=skip_special_tokens
    )
    full_text = tokenizer.decode(window, skip_special_tokens=skip_special_tokens)
    if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
        return ""
    delta = full_text[len(prefix_text) :]
    seq.prefix_offset = seq.read_offset
    seq.read_offset = len(seq.token_ids) - start
    seq.output_text += delta
    return delta
