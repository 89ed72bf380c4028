"""Tool calling on /v1/chat/completions: OpenAI's `tools` and `tool_choice`.

- `none`: the tools reach the chat template; the output is plain content.
- `required`, or a named function: the output is constrained (structured output) to a JSON
  array of `{"name", "parameters"}` calls of the given tools (vLLM's shape), or to the named
  function's arguments; the response carries them as `tool_calls`.
- `auto`: the model decides; its text is parsed for tool calls by the parser chosen with
  `--tool-call-parser` (as in vLLM): `hermes` (`<tool_call>{...}</tool_call>`, Hermes, Qwen)
  or `llama3_json` (a bare `{"name", "parameters"}` object, Llama 3.x). Text before the first
  call is content.

A response with tool calls finishes with `"tool_calls"`. Streamed, content goes out as it
comes, held back only while it may be the start of a call; a named call streams its arguments;
other calls go out whole once the output is complete (each with its id, name and arguments).
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from graphwise.sampling_params import StructuredOutputsParams
from graphwise.server.protocol import APIError, shown


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _arguments(value: Any) -> str | None:
    """Arguments as JSON text (models write an object, sometimes a JSON string of one)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def _call_of(obj: Any, keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    raw = next((obj[k] for k in keys if k in obj), {})
    args = _arguments(raw)
    return None if args is None else ParsedCall(obj["name"], args)


class ToolCallParser(ABC):
    """Finds tool calls in a model's output text."""

    name: str

    @abstractmethod
    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        """(content, calls): calls empty and content the whole text when there are none."""

    @abstractmethod
    def safe_content_end(self, text: str) -> int:
        """How much of a still-growing output is surely content (not a call's beginning)."""


class HermesParser(ToolCallParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one or more, after any
    content (Hermes 2 Pro, Qwen 2.5 / 3 templates)."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        at = text.find(self.START)
        if at < 0:
            return text, []
        calls = []
        for body in self._CALL.findall(text[at:]):
            try:
                call = _call_of(json.loads(body))
            except ValueError:
                call = None
            if call is None:
                return text, []  # not well-formed: the text stays content, as vLLM does
            calls.append(call)
        return text[:at], calls

    def safe_content_end(self, text: str) -> int:
        at = text.find(self.START)
        if at >= 0:
            return at
        for k in range(min(len(self.START) - 1, len(text)), 0, -1):
            if self.START.startswith(text[-k:]):
                return len(text) - k
        return len(text)


class Llama3JsonParser(ToolCallParser):
    """Llama 3.x's JSON tool calls: the output is `{"name": ..., "parameters": {...}}` (several
    separated by `;`), optionally after `<|python_tag|>`; anything else is content."""

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        body = text.strip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG) :].lstrip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            try:
                obj, end = decoder.raw_decode(body, at)
            except ValueError:
                return text, []
            call = _call_of(obj, ("parameters", "arguments"))
            if call is None:
                return text, []
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \t\r\n;":
                at += 1
        return "", calls

    def safe_content_end(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith("{") or self.TAG.startswith(body[: len(self.TAG)]):
            return 0
        return len(text)


TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
}


def make_parser(name: str | None) -> ToolCallParser | None:
    if name is None:
        return None
    cls = TOOL_CALL_PARSERS.get(name)
    if cls is None:
        raise ValueError(
            f"unknown --tool-call-parser {name!r}; known: {', '.join(sorted(TOOL_CALL_PARSERS))}"
        )
    return cls()


# ------------------------------------------------------------------------------ per request
def _check_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list) or not tools:
        raise APIError(400, "tools must be a non-empty list of functions", param="tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"tools.{i} must be {{'type': 'function', 'function': {{...}}}}",
                           param=f"tools.{i}")  # fmt: skip
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise APIError(400, f"tools.{i}.function.name must be 1-64 letters, digits, _ . or -,"
                           f" got {shown(name)}", param=f"tools.{i}.function.name")  # fmt: skip
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise APIError(400, f"tools.{i}.function.parameters must be a JSON schema object",
                           param=f"tools.{i}.function.parameters")  # fmt: skip
        out.append({"type": "function", "function": fn})
    return out


def _parameters(fn: dict[str, Any]) -> dict[str, Any]:
    return fn.get("parameters") or {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    """What a request's tools change: the template's `tools`, the output constraint, and how
    the output becomes `tool_calls`."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]]
    parser: ToolCallParser | None = None
    named: str | None = None
    structured: StructuredOutputsParams | None = None

    def finish(self, text: str, finish_reason: str | None) -> tuple[str | None, list, str | None]:
        """(content, tool calls, finish reason) of a complete output."""
        calls = self._calls(text)
        if calls is None:
            return text, [], finish_reason
        content, parsed = calls
        reason = "tool_calls" if parsed and finish_reason == "stop" else finish_reason
        return (content or None) if parsed else text, [c.as_dict() for c in parsed], reason

    def _calls(self, text: str) -> tuple[str, list[ParsedCall]] | None:
        if self.mode == "named":
            args = _arguments(text)
            return ("", [ParsedCall(self.named or "", args)]) if args is not None else None
        if self.mode == "required":
            try:
                items = json.loads(text)
            except ValueError:
                return None
            calls = (
                [_call_of(item, ("parameters",)) for item in items]
                if isinstance(items, list)
                else [None]
            )
            if not calls or any(c is None for c in calls):
                return None
            return "", calls  # type: ignore[return-value]
        if self.mode == "auto" and self.parser is not None:
            return self.parser.parse(text)
        return None

    def stream(self) -> ToolStream:
        return ToolStream(self)


class ToolStream:
    """Turns a streamed output into OpenAI's deltas: `feed` each engine output's new text and
    get back (content to send, tool-call deltas to send, finish reason)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.named_id = f"call_{uuid.uuid4().hex[:24]}"
        self.named_started = False

    def feed(
        self, delta: str, finished: bool, finish_reason: str | None
    ) -> tuple[str, list[dict[str, Any]], str | None]:
        plan = self.plan
        self.text += delta
        if plan.mode == "named":  # the arguments stream as they come
            calls: list[dict[str, Any]] = []
            if delta or not self.named_started:
                item: dict[str, Any] = {"index": 0, "function": {"arguments": delta}}
                if not self.named_started:
                    item.update(id=self.named_id, type="function")
                    item["function"]["name"] = plan.named
                    self.named_started = True
                calls.append(item)
            reason = "tool_calls" if finished and finish_reason == "stop" else finish_reason
            return "", calls, reason if finished else None
        if not finished:
            end = self.sent
            if plan.mode == "auto" and plan.parser is not None:
                end = max(self.sent, plan.parser.safe_content_end(self.text))
            elif plan.mode == "none":
                end = len(self.text)
            out, self.sent = self.text[self.sent : end], end
            return out, [], None
        content, calls_, reason = plan.finish(self.text, finish_reason)
        if calls_:
            rest = (content or "")[self.sent :]
            deltas = [{"index": i, **c} for i, c in enumerate(calls_)]
            return rest, deltas, reason
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        return rest, [], reason


def plan_tools(req: Any, parser_name: str | None) -> ToolPlan | None:
    """The request's tool plan (None without tools and tool_choice); a 400 naming the field
    for what cannot be served."""
    choice = req.tool_choice
    if req.tools is None:
        if choice not in (None, "none", "auto"):  # auto without tools: nothing to call
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    tools = _check_tools(req.tools)
    names = [t["function"]["name"] for t in tools]
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")  # fmt: skip
        if name not in names:
            raise APIError(400, f"tool_choice names {shown(name)}, which is not in tools",
                           param="tool_choice")  # fmt: skip
        fn_spec = tools[names.index(name)]["function"]
        so = StructuredOutputsParams(json=_parameters(fn_spec), disable_any_whitespace=True)
        return ToolPlan("named", tools, named=name, structured=so)
    if choice == "none":
        return ToolPlan("none", tools)
    if choice == "auto":
        parser = make_parser(parser_name)
        if parser is None:
            raise APIError(
                400,
                "tool_choice 'auto' needs the server started with --tool-call-parser "
                f"({', '.join(sorted(TOOL_CALL_PARSERS))}); use 'required', a named function "
                "or 'none'",
                param="tool_choice",
            )
        return ToolPlan("auto", tools, parser=parser)
    if choice == "required":
        schema: dict[str, Any] = {
            "type": "array",
            "minItems": 1,
            "items": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "enum": [t["function"]["name"]]},
                            "parameters": _parameters(t["function"]),
                        },
                        "required": ["name", "parameters"],
                        "additionalProperties": False,
                    }
                    for t in tools
                ]
            },
        }
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1
        so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        return ToolPlan("required", tools, structured=so)
    raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or a named function, "
                   f"got {shown(choice)}", param="tool_choice")  # fmt: skip


def constrain_for_tools(params: Any, plan: ToolPlan) -> None:
    """Put the plan's constraint on the request's SamplingParams (a tool schema that is not
    valid JSON schema is a 400 naming `tools`)."""
    from graphwise.engine.structured import check_constraint

    if params.structured_outputs is not None:
        raise APIError(400, f"tool_choice {plan.mode!r} constrains the output: it cannot be "
                       "combined with response_format or guided_* fields", param="tool_choice")  # fmt: skip
    assert plan.structured is not None
    try:
        check_constraint(plan.structured)
    except ValueError as exc:
        raise APIError(400, f"tools: a function's parameters: {exc}", param="tools") from exc
    params.structured_outputs = plan.structured
