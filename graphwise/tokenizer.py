"""Text in, token ids out: prompts and chat templates, shared by the offline API and the server."""

from __future__ import annotations

from typing import Any

Message = dict[str, str]


def apply_chat_template(
    tokenizer: Any, conversation: list[Message], add_generation_prompt: bool = True
) -> list[int]:
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the model has no chat template; use generate() with a plain prompt")
    if not isinstance(conversation, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in conversation
    ):
        raise ValueError("messages must be a list of {'role': str, 'content': str} dicts")
    ids = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_prompt(tokenizer: Any, prompt: str, model_name: str) -> list[int]:
    """A text prompt's ids, with the model's special tokens (BOS) as HF adds them."""
    if tokenizer is None:
        raise ValueError(
            f"model {model_name!r} has no tokenizer (dummy weights): "
            "pass prompt_token_ids instead of text"
        )
    return list(tokenizer.encode(prompt, add_special_tokens=True))
