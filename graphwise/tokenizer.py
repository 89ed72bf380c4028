"""Text in, token ids out: prompts and chat templates, shared by the offline API and the server."""

from __future__ import annotations

import inspect
from typing import Any

Message = dict[str, Any]  # role, content; tool_calls, tool_call_id, name where they apply


def render_chat(
    tokenizer: Any,
    conversation: list[Message],
    add_generation_prompt: bool = True,
    *,
    continue_final_message: bool = False,
    documents: list[dict[str, str]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The chat template's text for a conversation. Encoding it with add_special_tokens=False
    gives exactly HF's apply_chat_template(tokenize=True) ids; rendering apart lets the server
    check the text's length before it pays for tokenizing.

    `continue_final_message` leaves the last message open (the model continues it);
    `documents`, `tools` and `template_kwargs` (vLLM's chat_template_kwargs) reach the
    template as variables. A template kwarg may not be one of apply_chat_template's own parameters
    (`template_kwarg_conflicts`)."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the model has no chat template; send a plain prompt instead")
    if not isinstance(conversation, list) or not all(
        isinstance(m, dict)
        and isinstance(m.get("role"), str)
        and (
            isinstance(m.get("content"), str) or (m.get("content") is None and m.get("tool_calls"))
        )
        for m in conversation
    ):
        raise ValueError("messages must be a list of {'role': str, 'content': str} dicts")
    kwargs = dict(template_kwargs or {})
    if conflicts := template_kwarg_conflicts(tokenizer, kwargs):
        raise ValueError(f"template kwargs may not set {', '.join(map(repr, conflicts))}")
    if continue_final_message:
        kwargs["continue_final_message"] = True
    if documents is not None:
        kwargs["documents"] = documents
    if tools is not None:  # OpenAI's tools: transformers' apply_chat_template(tools=...)
        kwargs["tools"] = tools
    text = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
    )
    if not isinstance(text, str):
        raise TypeError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def template_kwarg_conflicts(tokenizer: Any, kwargs: dict[str, Any]) -> list[str]:
    """The keys of `kwargs` that are apply_chat_template's own parameters (tokenize,
    return_dict, tools, ...) or the template's `messages`: passed through, they would change
    what it returns, or fail, rather than reach the template."""
    if not kwargs:
        return []
    try:
        params = inspect.signature(tokenizer.apply_chat_template).parameters
    except (AttributeError, TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    own = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return [k for k in kwargs if k in own or k == "messages"]


def apply_chat_template(
    tokenizer: Any,
    conversation: list[Message],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    text = render_chat(tokenizer, conversation, add_generation_prompt, tools=tools)
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
