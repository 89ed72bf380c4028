"""Tool calling (issue 20): tools reach the chat template and round-trip through it;
tool_choice none / auto (parsed by --tool-call-parser) / required / named (constrained by a
JSON schema built from the tools), in OpenAI's response shapes, streamed too. Parsers are
tested on canned outputs of their formats. In process: the app over a real engine on the tiny
chat model with a Hermes-style tool template."""

from __future__ import annotations

import json
import shutil
from typing import Any

import httpx
import jsonschema
import pytest
from fake_engine import run_app

from graphwise import LLM
from graphwise.server.async_engine import AsyncEngine
from graphwise.server.tools import HermesParser, Llama3JsonParser, ToolPlan
from graphwise.tokenizer import render_chat

pytest.importorskip("xgrammar")

TEMPLATE = """
{%- if tools %}<|im_start|>system
Tools:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response id="{{ message.tool_call_id }}">
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]},
                           "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}  # fmt: skip
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                       "required": ["zone"]},
    },
}  # fmt: skip
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_model_dir(tiny_chat_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tool_chat") / "model"
    shutil.copytree(tiny_chat_dir, path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def engine(tool_model_dir):
    return LLM(model=str(tool_model_dir), max_num_seqs=8, max_model_len=1024).llm_engine


def _run(engine, test, parser: str | None = "hermes") -> None:
    run_app(engine, test, served="tiny", tool_call_parser=parser)


def _sse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def _streamed(chunks: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]], str | None]:
    """Content, tool calls (merged by index, as OpenAI's clients do) and finish reason."""
    content, calls, reason = "", {}, None
    for chunk in chunks:
        for c in chunk["choices"]:
            d = c["delta"]
            content += d.get("content") or ""
            for tc in d.get("tool_calls") or []:
                call = calls.setdefault(tc["index"], {"function": {"name": "", "arguments": ""}})
                for key in ("id", "type"):
                    if key in tc:
                        call[key] = tc[key]
                fn = tc.get("function", {})
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
            reason = c.get("finish_reason") or reason
    return content, [calls[i] for i in sorted(calls)], reason


# ---- the template ------------------------------------------------------------------------
def test_tools_and_tool_messages_round_trip_through_the_template(engine) -> None:
    tok = engine.tokenizer
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]  # fmt: skip
    text = render_chat(tok, history, True, tools=TOOLS)
    assert '"name": "get_weather"' in text and '"description": "Weather in a city"' in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}' in text
    )
    assert '<tool_response id="call_1">\n21 degrees' in text
    assert "Tools:" not in render_chat(tok, MESSAGES, True)  # no tools: none rendered


def test_server_passes_tools_and_history_to_the_template(engine) -> None:
    tok = engine.tokenizer
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]  # fmt: skip
    expected = render_chat(
        tok,
        [{**m, "content": m["content"] or ""} for m in history[:1]]
        + [{"role": "assistant", "content": "", "tool_calls": [{"id": "call_1",
            "type": "function", "function": {"name": "get_weather",
            "arguments": {"city": "Paris", "unit": "C"}}}]}, history[2]],
        True,
        tools=TOOLS,
    )  # fmt: skip
    n = len(tok.encode(expected, add_special_tokens=False))

    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        body = {"model": "tiny", "messages": history, "tools": TOOLS, "tool_choice": "none",
                "max_tokens": 3}  # fmt: skip
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == n
        msg = r.json()["choices"][0]["message"]
        assert msg["tool_calls"] == [] and isinstance(msg["content"], str)
        r = await client.post("/v1/chat/completions", json={**body, "tools": None,
                                                              "tool_choice": None})  # fmt: skip
        assert r.json()["usage"]["prompt_tokens"] < n
        # tool_choice "auto" without tools: nothing to call, a plain answer
        r = await client.post("/v1/chat/completions", json={**body, "tools": None,
                                                              "tool_choice": "auto"})  # fmt: skip
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] == []

    _run(engine, test)


# ---- required and named: constrained ---------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_tool_calls_validate(engine, temperature) -> None:
    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
                "max_tokens": 200, "temperature": temperature, "seed": 4}  # fmt: skip
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        calls = choice["message"]["tool_calls"]
        assert calls and choice["message"]["content"] is None
        for call in calls:
            assert call["type"] == "function" and call["id"].startswith("call_")
            jsonschema.validate(json.loads(call["function"]["arguments"]),
                                SCHEMAS[call["function"]["name"]])  # fmt: skip
        assert len({c["id"] for c in calls}) == len(calls)
        single = await client.post("/v1/chat/completions",
                                   json={**body, "parallel_tool_calls": False})  # fmt: skip
        assert len(single.json()["choices"][0]["message"]["tool_calls"]) == 1
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        content, s_calls, reason = _streamed(_sse(streamed.text))
        assert reason == "tool_calls" and content == ""
        if temperature == 0:  # the same calls, ids aside
            strip = [{**c, "id": None} for c in calls]
            assert [{**c, "id": None} for c in s_calls] == strip

    _run(engine, test)


def test_named_tool_choice_streams_its_arguments(engine) -> None:
    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 100,
                "temperature": 0,
                "tool_choice": {"type": "function", "function": {"name": "get_time"}}}  # fmt: skip
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_time"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["get_time"])
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = _sse(streamed.text)
        content, calls, reason = _streamed(chunks)
        assert reason == "tool_calls" and content == ""
        assert calls[0]["function"] == call["function"]
        pieces = [tc for ch in chunks for c in ch["choices"]
                  for tc in c["delta"].get("tool_calls") or []]  # fmt: skip
        assert len(pieces) > 2  # the arguments came in several deltas
        assert "id" in pieces[0] and all("id" not in p for p in pieces[1:])

    _run(engine, test)


# ---- auto: parsed ----------------------------------------------------------------------------
FORCED = (r'Let me check\. <tool_call>\{"name": "get_weather", "arguments": '
          r'\{"city": "(Paris|Rome)", "unit": "C"\}\}</tool_call>')  # fmt: skip


def test_auto_parses_hermes_calls_streamed_and_not(engine) -> None:
    """The output is forced into Hermes' format with a regex constraint (a random model would
    never call a tool); the parser turns it into tool_calls."""

    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "auto",
                "max_tokens": 100, "temperature": 1.0, "seed": 9,
                "structured_outputs": {"regex": FORCED}}  # fmt: skip
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Let me check. "
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["get_weather"])
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        content, calls, reason = _streamed(_sse(streamed.text))
        assert (content, reason) == ("Let me check. ", "tool_calls")
        assert calls[0]["function"] == call["function"]
        # No call in the output: plain content, finish_reason stop.
        plain = await client.post("/v1/chat/completions",
                                  json={**body, "structured_outputs": {"choice": ["No tools."]}})  # fmt: skip
        choice = plain.json()["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": "No tools.", "tool_calls": []}
        assert choice["finish_reason"] == "stop"

    _run(engine, test)


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tool_choice": "auto"}, "tool_choice"),  # no parser on this server
        ({}, "tool_choice"),  # auto is the default with tools
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}],
          "tool_choice": "required"}, "tools.0.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f",
          "parameters": {"type": "nope"}}}], "tool_choice": "required"}, "tools"),
        ({"tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
        ({"messages": [*MESSAGES, {"role": "assistant", "tool_calls": [{"function": 3}]}]},
         "messages.1.tool_calls.0.function"),
        ({"tools": None, "messages": [*MESSAGES, {"role": "assistant", "content": None,
          "tool_calls": [{"function": {"arguments": "{}"}}]}]},
         "messages.1.tool_calls.0.function.name"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400s(engine, extra, param) -> None:
    """(On a server without a tool-call parser.)"""

    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 4, **extra}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()

    _run(engine, test, parser=None)


# ---- parsers on canned outputs ---------------------------------------------------------------
def test_hermes_parser() -> None:
    p = HermesParser()
    text = ('Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": "{\\"y\\": [2]}"}</tool_call>')  # fmt: skip
    content, calls = p.parse(text)
    assert content == "Sure.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}),
                                                                  ("b", {"y": [2]})]  # fmt: skip
    # unterminated last call (the model stopped at EOS), no arguments
    _, calls = p.parse('<tool_call>{"name": "c"}')
    assert [(c.name, c.arguments) for c in calls] == [("c", "{}")]
    for text in ("plain text", "<tool_call>{not json}</tool_call>", '<tool_call>{"x": 1}'):
        assert p.parse(text) == (text, [])
    assert p.safe_content_end("Hello <tool_") == len("Hello ")
    assert p.safe_content_end("Hello <tool_call>{") == len("Hello ")
    assert p.safe_content_end("a < b") == len("a < b")


def test_llama3_json_parser() -> None:
    p = Llama3JsonParser()
    content, calls = p.parse('{"name": "a", "parameters": {"x": 1}}')
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1})]
    _, calls = p.parse('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", '
                       '"arguments": {"z": "q"}}')  # fmt: skip
    assert [c.name for c in calls] == ["a", "b"] and json.loads(calls[1].arguments) == {"z": "q"}
    for text in ("The answer is 4.", '{"name": "a", "parameters": {"x": 1}', '{"foo": 1}',
                 '{"name": "a", "parameters": 3}'):  # fmt: skip
        assert p.parse(text) == (text, [])
    assert p.safe_content_end("  ") == 0 and p.safe_content_end(" {") == 0
    assert p.safe_content_end("Hi") == 2


@pytest.mark.parametrize("parser", [HermesParser(), Llama3JsonParser()])
def test_streaming_reassembles_what_parsing_finds(parser) -> None:
    if isinstance(parser, HermesParser):
        text = 'I will call. <tool_call>{"name": "a", "arguments": {"k": "v"}}</tool_call>'
    else:
        text = '{"name": "a", "parameters": {"k": "v"}}'
    plan = ToolPlan("auto", [], parser=parser)
    want_content, want_calls, want_reason = plan.finish(text, "stop")
    stream = plan.stream()
    content, calls, reason = "", [], None
    for i in range(0, len(text), 3):
        c, tc, r = stream.feed(text[i : i + 3], False, None)
        content, calls = content + c, calls + tc
    c, tc, reason = stream.feed("", True, "stop")
    content, calls = content + c, calls + tc
    assert (content or None) == want_content and reason == want_reason == "tool_calls"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in want_calls
    ]


def test_n_choices_each_carry_their_tool_calls(engine) -> None:
    """n > 1 with tool_choice required: every choice is a validated call (each sample has its
    own matcher), and a stream keeps each choice's calls apart by index."""

    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
                "max_tokens": 200, "temperature": 1.0, "seed": 9, "n": 3}  # fmt: skip
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert [c["index"] for c in choices] == [0, 1, 2]
        for choice in choices:
            assert choice["finish_reason"] == "tool_calls", choice
            for call in choice["message"]["tool_calls"]:
                jsonschema.validate(json.loads(call["function"]["arguments"]),
                                    SCHEMAS[call["function"]["name"]])  # fmt: skip
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = _sse(streamed.text)
        for choice in choices:
            mine = [{**ch, "choices": [c for c in ch["choices"] if c["index"] == choice["index"]]}
                    for ch in chunks]  # fmt: skip
            content, calls, reason = _streamed(mine)
            assert reason == "tool_calls" and content == ""
            strip = [{**c, "id": None} for c in choice["message"]["tool_calls"]]
            assert [{**c, "id": None} for c in calls] == strip  # seeded: the same calls

    _run(engine, test)
