"""Text in, token ids out: prompts and chat templates, shared by the offline API and the server."""

from __future__ import annotations

from typing import Any

Message = dict[str, str]


def render_chat(
    tokenizer: Any, conversation: list[Message], add_generation_prompt: bool = True
) -> str:
    """The chat template's text for a conversation. Encoding it with add_special_tokens=False
    gives exactly HF's apply_chat_template(tokenize=True) ids; rendering apart lets the server
    check the text's length before it pays for tokenizing."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the model has no chat template; send a plain prompt instead")
    if not isinstance(conversation, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in conversation
    ):
        raise ValueError("messages must be a list of {'role': str, 'content': str} dicts")
    text = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    if not isinstance(text, str):
        raise TypeError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def apply_chat_template(
    tokenizer: Any, conversation: list[Message], add_generation_prompt: bool = True
) -> list[int]:
    text = render_chat(tokenizer, conversation, add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_prompt(tokenizer: Any, prompt: str, model_name: str) -> list[int]:
    """A text prompt's ids, with the model's special tokens (BOS) as HF adds them."""
    if tokenizer is None:
        raise ValueError(
            f"model {model_name!r} has no tokenizer (dummy weights): "
            "pass prompt_token_ids instead of text"
        )
    return list(tokenizer.encode(prompt, add_special_tokens=True))


def bad_words_token_ids(tokenizer: Any, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """The token sequences a list of bad words bans: each word as tokenized on its own and,
    unless it starts with one, after a space (how it appears mid-sentence)."""
    if tokenizer is None:
        raise ValueError("bad_words needs the model's tokenizer (dummy weights have none)")
    found: dict[tuple[int, ...], None] = {}
    for word in words:
        for text in (word,) if word.startswith(" ") else (word, " " + word):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids:
                found[ids] = None
    return tuple(found)
