"""Reasoning content for models that think in tags: `--reasoning-parser` (vLLM's names).

A reasoning model writes `<think> ... </think>` and then its answer. With a parser the chat
route returns the two apart: `message.reasoning_content` (and `reasoning`, vLLM's newer name)
and `message.content`; streamed as `delta.reasoning_content` / `delta.reasoning`, then
`delta.content`. The tool-call parser reads the content alone, and a structured-output
constraint applies after the reasoning (the engine is told where it ends as token ids:
`ReasoningSpec`, see engine/reasoning.py).

- `deepseek_r1`: the output begins inside the reasoning (DeepSeek-R1 writes no start tag; a
  leading `<think>` is dropped) and `</think>` ends it; no `</think>`: all of it is reasoning.
- `qwen3`: the output reasons only if it begins with `<think>`; otherwise it is all content.

Where the output begins is read from the prompt's text first: a prompt whose last tag is an
open `<think>` (a template that starts the reasoning, as Qwen3-Thinking's and Qwen3.5's do)
puts it inside the reasoning, whichever the parser; a prompt whose last tag is `</think>` (a
template that closed it: thinking disabled) makes a `deepseek_r1` output all content, while
`qwen3` still lets the output open a new block (its templates keep earlier turns' reasoning).

Offline, `LLM.chat` returns the raw text (as vLLM's does); split it with
`make_reasoning_parser("deepseek_r1").split(text)`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

from graphwise.sampling_params import ReasoningSpec

logger = logging.getLogger(__name__)

INSIDE, OPTIONAL, CONTENT = "inside", "optional", "content"


class ReasoningParser(ABC):
    """Splits an output into reasoning and content; text only (no tokenizer needed)."""

    name: str
    start_tag = "<think>"
    end_tag = "</think>"

    def initial(self, prompt: str = "") -> str:
        """Where the output begins (INSIDE, OPTIONAL or CONTENT), given the prompt's text."""
        opened, closed = prompt.rfind(self.start_tag), prompt.rfind(self.end_tag)
        if opened > closed:
            return INSIDE
        return self.default_start(closed >= 0)

    @abstractmethod
    def default_start(self, prompt_closed: bool) -> str:
        """Where the output begins when the prompt leaves no reasoning open (`prompt_closed`:
        its last tag is the end tag)."""

    def split(self, text: str, start: str | None = None) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output. Reasoning is None when the output has
        none; content None when there is reasoning and nothing after it (vLLM's shapes)."""
        stream = self.stream(self.initial() if start is None else start)
        reasoning, content = stream.feed(text, final=True)
        if not stream.reasoned:
            return None, content
        return reasoning, content or None

    def stream(self, start: str) -> ReasoningStream:
        return ReasoningStream(self, start)

    def spec(self, tokenizer: Any, start: str) -> ReasoningSpec | None:
        """What the engine needs to start a constraint after the reasoning (offline: put it in
        `SamplingParams(reasoning=...)`): the tags' token ids. None when the output begins as
        content (the constraint applies from its first token)."""
        if start == CONTENT:
            return None
        begin, end = reasoning_tag_ids(self, tokenizer)
        return ReasoningSpec(end, begin if start == OPTIONAL else (), start)


def reasoning_tag_ids(
    parser: ReasoningParser, tokenizer: Any
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The start and end tags' token ids as the tokenizer writes each alone (one token when the
    model has it as a token, several otherwise). A ValueError if they do not decode back to the
    tag: the engine could not recognise it."""
    out = []
    for tag in (parser.start_tag, parser.end_tag):
        ids = tuple(tokenizer.encode(tag, add_special_tokens=False))
        if not ids or tokenizer.decode(list(ids), skip_special_tokens=False) != tag:
            raise ValueError(
                f"--reasoning-parser {parser.name}: the tokenizer does not write {tag!r} back "
                f"from its ids {list(ids)}"
            )
        if set(ids) & set(getattr(tokenizer, "all_special_ids", ())):
            # Decoding drops special tokens (skip_special_tokens, the default): the text the
            # parser splits would lack the tag.
            logger.warning(
                "--reasoning-parser %s: %r is a special token of this tokenizer; requests must "
                "send skip_special_tokens: false for the reply to be split",
                parser.name,
                tag,
            )
        out.append(ids)
    return out[0], out[1]


class DeepSeekR1Parser(ReasoningParser):
    name = "deepseek_r1"

    def default_start(self, prompt_closed: bool) -> str:
        return CONTENT if prompt_closed else INSIDE


class Qwen3Parser(ReasoningParser):
    name = "qwen3"

    def default_start(self, prompt_closed: bool) -> str:
        return OPTIONAL


class ReasoningStream:
    """A growing output split as it comes: `feed` each delta, get back (reasoning, content)
    to send. Text that may be the start of a tag is held back until the next delta decides
    (a tag split across deltas, or across tokens, comes out whole); `final=True` flushes."""

    def __init__(self, parser: ReasoningParser, start: str) -> None:
        self.parser = parser
        self.state = start
        self.held = ""
        self.at_start = True  # INSIDE: a leading start tag is dropped
        self.reasoned = start == INSIDE  # whether the output has a reasoning part

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        start_tag, end_tag = self.parser.start_tag, self.parser.end_tag
        text, self.held = self.held + delta, ""
        reasoning = content = ""
        if self.state == OPTIONAL:
            if text.startswith(start_tag):
                text, self.state, self.at_start, self.reasoned = (
                    text[len(start_tag) :], INSIDE, False, True,
                )  # fmt: skip
            elif start_tag.startswith(text) and not final:
                self.held = text  # "" or the beginning of the tag: wait
                return "", ""
            else:
                self.state = CONTENT
        if self.state == INSIDE and self.at_start:
            if text.startswith(start_tag):
                text, self.at_start = text[len(start_tag) :], False
            elif start_tag.startswith(text) and text and not final:
                self.held = text
                return "", ""
            elif text:
                self.at_start = False
        if self.state == INSIDE:
            at = text.find(end_tag)
            if at >= 0:
                reasoning, text, self.state = text[:at], text[at + len(end_tag) :], CONTENT
            else:
                keep = 0 if final else _partial_suffix(text, end_tag)
                reasoning, self.held = text[: len(text) - keep], text[len(text) - keep :]
                return reasoning, ""
        content = text  # CONTENT
        return reasoning, content


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1Parser,
    "qwen3": Qwen3Parser,
}


def make_reasoning_parser(name: str | None) -> ReasoningParser | None:
    if name is None:
        return None
    cls = REASONING_PARSERS.get(name)
    if cls is None:
        raise ValueError(
            f"unknown --reasoning-parser {name!r}; known: {', '.join(sorted(REASONING_PARSERS))}"
        )
    return cls()
