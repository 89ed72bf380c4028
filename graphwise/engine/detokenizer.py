"""Incremental detokenization that is right for characters split across tokens.

Each token decodes a short window of tokens twice — with and without the newest tokens — and
emits the difference. A window that ends in an incomplete UTF-8 sequence (decoded as U+FFFD)
emits nothing until the next token completes it. Both decodes start at the same token, so
tokenizers that drop a leading space on the first token (SentencePiece) agree with themselves.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """One request's output tokens, turned into text a token at a time."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # the window starts here
        self.read_offset = 0  # text up to here has been emitted

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes (often all of it, sometimes nothing yet)."""
        self.token_ids.append(token_id)
        if self.tokenizer is None:
            return ""
        # Only the window is decoded (the whole output per token costs O(length) each step).
        window = self.token_ids[self.prefix_offset :]
        prefix_text = self.tokenizer.decode(
            window[: self.read_offset - self.prefix_offset],
            skip_special_tokens=self.skip_special_tokens,
        )
        full_text = self.tokenizer.decode(window, skip_special_tokens=self.skip_special_tokens)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]
