"""Reasoning content (issue 20 item 4): `--reasoning-parser` splits chat replies into
`reasoning_content` / `reasoning` and `content`, streamed too, with `include_reasoning`; the
tool-call parser reads the content alone; a structured-output constraint applies after the
reasoning.

Parsers are tested on canned texts, streamed split at every character boundary. The app is
tested on canned replies (a scripted engine: tags split across deltas, tool calls in and after
the reasoning) and on a real engine over a tiny random model whose tokenizer has `<think>` and
`</think>` as tokens: `logit_bias` on `</think>` makes the random model end its reasoning after
a few tokens, and the JSON answer after it must validate while the reasoning holds text no JSON
grammar allows."""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from typing import Any

import httpx
import jsonschema
import pytest
from fake_engine import FakeEngine, run_app

from graphwise import LLM
from graphwise.outputs import CompletionOutput, RequestOutput
from graphwise.server.async_engine import AsyncEngine
from graphwise.server.reasoning import (
    CONTENT,
    INSIDE,
    OPTIONAL,
    REASONING_PARSERS,
    make_reasoning_parser,
    reasoning_tag_ids,
)
from tests.conftest import build_tiny_chat

DEEPSEEK, QWEN3 = make_reasoning_parser("deepseek_r1"), make_reasoning_parser("qwen3")


# ---- parsers on canned text ------------------------------------------------------------------
@pytest.mark.parametrize(
    "parser,start,text,want",
    [
        (DEEPSEEK, INSIDE, "Let me see.</think>It is 4.", ("Let me see.", "It is 4.")),
        (DEEPSEEK, INSIDE, "<think>\nhm</think>\n\nIt is 4.", ("\nhm", "\n\nIt is 4.")),
        (DEEPSEEK, INSIDE, "still thinking", ("still thinking", None)),  # cut short
        (DEEPSEEK, INSIDE, "done</think>", ("done", None)),
        (DEEPSEEK, INSIDE, "a</think>b</think>c", ("a", "b</think>c")),  # the first ends it
        (DEEPSEEK, INSIDE, "<thin", ("<thin", None)),
        (DEEPSEEK, CONTENT, "It is 4.</think>", (None, "It is 4.</think>")),
        (QWEN3, OPTIONAL, "<think>x</think>It is 4.", ("x", "It is 4.")),
        (QWEN3, OPTIONAL, "It is 4.", (None, "It is 4.")),
        (QWEN3, OPTIONAL, " <think>x</think>y", (None, " <think>x</think>y")),  # not at 0
        (QWEN3, OPTIONAL, "<think", (None, "<think")),
        (QWEN3, OPTIONAL, "<think>x", ("x", None)),
        (QWEN3, OPTIONAL, "<think></think>{}", ("", "{}")),
        (QWEN3, OPTIONAL, "", (None, "")),
        (QWEN3, INSIDE, "x</think>y", ("x", "y")),
    ],
)  # fmt: skip
def test_split(parser, start, text, want) -> None:
    assert parser.split(text, start) == want


def test_where_the_reply_begins_is_read_from_the_prompt() -> None:
    opened, closed = "<|im_start|>assistant\n<think>\n", "assistant\n<think>\n\n</think>\n\n"
    history = "assistant\n<think>a</think>b<|im_end|>\nuser\nq<|im_end|>\nassistant\n"
    assert DEEPSEEK.initial("user: hi\nassistant:") == INSIDE  # R1 writes no start tag
    assert DEEPSEEK.initial(opened) == QWEN3.initial(opened) == INSIDE
    assert DEEPSEEK.initial(closed) == CONTENT  # thinking disabled by the template
    assert QWEN3.initial(closed) == QWEN3.initial(history) == QWEN3.initial("") == OPTIONAL
    assert DEEPSEEK.split("a</think>b") == ("a", "b")  # no prompt: the parser's default
    assert QWEN3.split("a</think>b") == (None, "a</think>b")


TEXTS = [
    "<think>I should add.</think>The sum is 4.",
    "Plan: <th <think> </thin</think></think>tail<",
    "<think></think>",
    "<thi",
    "no tags at all <",
    "</think>x",
    "<think>\nab</think",
]


def _stream(parser, start: str, pieces: list[str]) -> tuple[str | None, str | None]:
    stream = parser.stream(start)
    reasoning = content = ""
    for k, piece in enumerate(pieces):
        r, c = stream.feed(piece, final=k == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
    if not stream.reasoned:
        assert reasoning == ""
        return None, content
    return reasoning, content or None


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("parser,start", [(DEEPSEEK, INSIDE), (DEEPSEEK, CONTENT),
                                          (QWEN3, OPTIONAL), (QWEN3, INSIDE)])  # fmt: skip
def test_streaming_split_at_every_boundary_equals_the_whole(parser, start, text) -> None:
    want = parser.split(text, start)
    n = len(text)
    cuts = [[i] for i in range(n + 1)] + [list(c) for c in itertools.combinations(range(1, n), 2)]
    for cut in [*cuts, list(range(1, n))]:  # one cut, two cuts, every character alone
        bounds = [0, *cut, n]
        pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
        assert _stream(parser, start, pieces) == want, (text, pieces)
    # A finished stream's last delta may be empty (the engine's final output).
    assert _stream(parser, start, [text, ""]) == want


def test_streamed_reasoning_never_shows_a_tag_piece() -> None:
    """What a stream sends before the reply is done holds no beginning of a tag."""
    stream = DEEPSEEK.stream(INSIDE)
    sent = [stream.feed(piece) for piece in ["Let me", " think</", "thi", "nk>The ", "answer"]]
    assert sent == [("Let me", ""), (" think", ""), ("", ""), ("", "The "), ("", "answer")]


def test_unknown_parser_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        make_reasoning_parser("r2d2")
    assert sorted(REASONING_PARSERS) == ["deepseek_r1", "qwen3"]


def test_tag_ids_one_token_or_several(default_tokenizer, think_llm) -> None:
    begin, end = reasoning_tag_ids(DEEPSEEK, default_tokenizer)
    assert len(begin) > 1 and len(end) > 1  # SmolLM2 has no think tokens
    assert default_tokenizer.decode(list(end)) == "</think>"
    tok = think_llm.get_tokenizer()
    assert reasoning_tag_ids(DEEPSEEK, tok) == (
        (tok.convert_tokens_to_ids("<think>"),),
        (tok.convert_tokens_to_ids("</think>"),),
    )
    assert DEEPSEEK.spec(tok, CONTENT) is None
    spec = QWEN3.spec(tok, OPTIONAL)
    assert spec is not None and spec.start == OPTIONAL and len(spec.start_token_ids) == 1


# ---- the app on canned replies -------------------------------------------------------------
class ScriptedEngine(FakeEngine):
    """Answers every request with the same reply, one piece per step."""

    def __init__(self, tokenizer: Any, pieces: list[str]) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.model_config.vocab_size = len(tokenizer)
        self.max_model_len = 512  # type: ignore[misc]
        self.pieces = pieces

    def step(self) -> list[RequestOutput]:
        self.gate.wait(10)
        outs = []
        for rid, (prompt, _params, tokens) in list(self.requests.items()):
            k = len(tokens)
            tokens.append(7)
            done = k + 1 == len(self.pieces)
            if done:
                del self.requests[rid]
            text = "".join(self.pieces[: k + 1])
            c = CompletionOutput(0, text, list(tokens), "stop" if done else None)
            out = RequestOutput(rid, None, prompt, [c], done)
            out.delta_text, out.delta_token_ids = self.pieces[k], [7]
            outs.append(out)
        return outs


CHAT = {"model": "fake", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 50}
REPLY = ["Let me", " think</", "thi", "nk>The ", "answer."]


def _sse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def _deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["delta"] for ch in chunks for c in ch["choices"]]


def _joined(deltas: list[dict[str, Any]], key: str) -> str:
    return "".join(d.get(key) or "" for d in deltas)


def test_chat_reply_split_streamed_and_not(default_tokenizer) -> None:
    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        msg = r.json()["choices"][0]["message"]
        assert msg["reasoning_content"] == msg["reasoning"] == "Let me think"
        assert msg["content"] == "The answer."
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        deltas = _deltas(_sse(r.text))
        assert _joined(deltas, "reasoning_content") == _joined(deltas, "reasoning")
        assert _joined(deltas, "reasoning") == "Let me think"
        assert _joined(deltas, "content") == "The answer."
        for d in deltas:
            assert d.get("reasoning") == d.get("reasoning_content")
        kinds = [k for d in deltas for k in ("reasoning", "content") if d.get(k)]
        assert kinds == sorted(kinds, key=["reasoning", "content"].index)  # reasoning first
        # include_reasoning: false drops it, streamed and not
        body = {**CHAT, "include_reasoning": False}
        msg = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
        assert msg["message"] == {"role": "assistant", "content": "The answer.", "tool_calls": []}
        r = await client.post("/v1/chat/completions", json={**body, "stream": True})
        deltas = _deltas(_sse(r.text))
        assert not any("reasoning" in d or "reasoning_content" in d for d in deltas)
        assert _joined(deltas, "content") == "The answer."

    run_app(ScriptedEngine(default_tokenizer, REPLY), test, reasoning_parser="deepseek_r1")


class TokenizedEngine(ScriptedEngine):
    """ScriptedEngine whose reply carries each piece's real token ids (usage counts them)."""

    def step(self) -> list[RequestOutput]:
        self.gate.wait(10)
        outs = []
        for rid, (prompt, _params, tokens) in list(self.requests.items()):
            k = len(tokens)  # pieces sent so far (one marker each)
            piece = self.pieces[k]
            ids = self.tokenizer.encode(piece, add_special_tokens=False)
            tokens.append(-1)
            done = k + 1 == len(self.pieces)
            if done:
                del self.requests[rid]
            sent = [
                i
                for q in self.pieces[: k + 1]
                for i in self.tokenizer.encode(q, add_special_tokens=False)
            ]
            text = "".join(self.pieces[: k + 1])
            c = CompletionOutput(0, text, sent, "stop" if done else None)
            out = RequestOutput(rid, None, prompt, [c], done)
            out.delta_text, out.delta_token_ids = piece, ids
            outs.append(out)
        return outs


@pytest.mark.parametrize(
    "parser,pieces,reasoning",
    [
        ("deepseek_r1", ["Let me", " think", "</think>", "The", " answer."], 3),
        ("deepseek_r1", ["Still", " thinking"], 2),  # cut short: all of it is reasoning
        ("qwen3", ["<think>", "hm", "</think>", "OK"], 3),
        ("qwen3", ["OK", " <think>x</think>"], 0),  # no leading <think>: all content
    ],
)
def test_usage_counts_reasoning_tokens(default_tokenizer, parser, pieces, reasoning) -> None:
    """usage.completion_tokens_details.reasoning_tokens (OpenAI's field): the reasoning's
    tokens, its markers included, streamed and not; absent without a parser."""
    tok = default_tokenizer
    ids = [len(tok.encode(p, add_special_tokens=False)) for p in pieces]
    want = sum(ids[:reasoning])
    total = sum(ids)

    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        usage = (await client.post("/v1/chat/completions", json=CHAT)).json()["usage"]
        assert usage["completion_tokens"] == total
        assert usage["completion_tokens_details"] == {"reasoning_tokens": want}
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        chunks = _sse((await client.post("/v1/chat/completions", json=body)).text)
        usage = chunks[-1]["usage"]
        assert usage["completion_tokens_details"] == {"reasoning_tokens": want}
        assert usage["completion_tokens"] == total

    run_app(TokenizedEngine(tok, pieces), test, reasoning_parser=parser)

    async def plain(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        usage = (await client.post("/v1/chat/completions", json=CHAT)).json()["usage"]
        assert "completion_tokens_details" not in usage and usage["completion_tokens"] == total

    run_app(TokenizedEngine(tok, pieces), plain)


def test_without_a_parser_the_reply_is_content(default_tokenizer) -> None:
    """include_reasoning: false is accepted and changes nothing (vLLM's behaviour)."""

    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        for extra in ({}, {"include_reasoning": False}):
            r = await client.post("/v1/chat/completions", json={**CHAT, **extra})
            assert r.status_code == 200, r.text
            msg = r.json()["choices"][0]["message"]
            assert msg == {"role": "assistant", "content": "".join(REPLY), "tool_calls": []}

    run_app(ScriptedEngine(default_tokenizer, REPLY), test)


@pytest.mark.parametrize(
    "pieces,want",
    [
        (["<th", "ink>", "hm</think>", "OK"], ("hm", "OK")),
        (["<", "a>", " b"], (None, "<a> b")),
        (["OK ", "<think>x</think>"], (None, "OK <think>x</think>")),
    ],
)
def test_qwen3_reasons_only_after_a_leading_think(default_tokenizer, pieces, want) -> None:
    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        msg = (await client.post("/v1/chat/completions", json=CHAT)).json()["choices"][0]
        assert (msg["message"].get("reasoning_content"), msg["message"]["content"]) == want
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        deltas = _deltas(_sse(r.text))
        assert (_joined(deltas, "reasoning_content") or None, _joined(deltas, "content")) == want

    run_app(ScriptedEngine(default_tokenizer, pieces), test, reasoning_parser="qwen3")


TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
    for name in ("get_time", "get_weather")
]
TOOL_REPLY = [
    "Maybe <tool_call>",
    '{"name": "get_time", "arguments": {}}</tool_call>? No.</th',
    "ink>Checking. <tool_call>",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
]


def test_tool_calls_are_parsed_from_the_content_alone(default_tokenizer) -> None:
    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        body = {**CHAT, "tools": TOOLS, "tool_choice": "auto"}
        choice = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        msg = choice["message"]
        assert msg["reasoning_content"].startswith("Maybe <tool_call>")  # not a call
        assert msg["content"] == "Checking. "
        (call,) = msg["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        r = await client.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = _sse(r.text)
        deltas = _deltas(chunks)
        assert _joined(deltas, "reasoning") == msg["reasoning"]
        assert _joined(deltas, "content") == "Checking. "
        calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
        assert [c["function"]["name"] for c in calls] == ["get_weather"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    run_app(
        ScriptedEngine(default_tokenizer, TOOL_REPLY),
        test,
        reasoning_parser="deepseek_r1",
        tool_call_parser="hermes",
    )


def test_history_reasoning_reaches_the_template(default_tokenizer) -> None:
    tok = copy.deepcopy(default_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m.role }}:"
        "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
        "{{ m.content }};{% endfor %}assistant:"
    )
    fake = ScriptedEngine(tok, REPLY)
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning": "be nice"},
        {"role": "user", "content": "2+2?"},
    ]

    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        r = await client.post("/v1/chat/completions", json={**CHAT, "messages": history})
        assert r.status_code == 200, r.text
        prompt = tok.decode(fake.added[-1][1])
        assert prompt == "user:hi;assistant:<think>be nice</think>hello;user:2+2?;assistant:"

    run_app(fake, test, reasoning_parser="deepseek_r1")


# ---- the app on a real engine: constraints after the reasoning ------------------------------
TEMPLATE = """{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if think == "open" %}<think>
{% elif think == "closed" %}<think>

</think>

{% endif %}{% endif %}"""


@pytest.fixture(scope="module")
def think_dir(tiny_chat_dir, tmp_path_factory):
    """The tiny chat model with `<think>` and `</think>` as tokens of its own (the last two
    ids, as in Qwen3's and DeepSeek-R1's tokenizers, where they are not special), and a
    template whose generation prompt opens (`think: "open"`) or closes the reasoning."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("think_chat") / "model"
    tok = AutoTokenizer.from_pretrained(tiny_chat_dir)
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = TEMPLATE
    build_tiny_chat(path, tok)
    shutil.rmtree(path / "__pycache__", ignore_errors=True)
    return path


@pytest.fixture(scope="module")
def think_llm(think_dir):
    return LLM(model=str(think_dir), max_num_seqs=8, max_model_len=1024)


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
    "additionalProperties": False,
}
# No free whitespace: a random model would otherwise loop on blanks until max_tokens.
JSON_ONLY = {"json": SCHEMA, "disable_any_whitespace": True}


def _ids(llm: LLM) -> tuple[int, int]:
    tok = llm.get_tokenizer()
    return tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")


def _json_answer(content: str | None) -> None:
    assert content is not None
    jsonschema.validate(json.loads(content), SCHEMA)


def _not_json_prefix(text: str) -> bool:
    """The reasoning could not have been written under the JSON schema's grammar."""
    return not text.lstrip().startswith("{")


def test_json_schema_applies_after_the_reasoning(think_llm) -> None:
    _, end = _ids(think_llm)
    body = {**CHAT, "model": "tiny", "max_tokens": 150, "temperature": 1.0,
            "structured_outputs": JSON_ONLY, "logit_bias": {str(end): 7}}  # fmt: skip

    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        reasoned = 0
        for seed in range(4):
            r = await client.post("/v1/chat/completions", json={**body, "seed": seed})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            msg = choice["message"]
            if choice["finish_reason"] == "length":  # still reasoning: nothing answered
                assert msg["content"] is None
                continue
            assert choice["finish_reason"] == "stop", choice
            _json_answer(msg["content"])
            if msg["reasoning_content"]:
                assert _not_json_prefix(msg["reasoning_content"])
                reasoned += 1
            streamed = await client.post("/v1/chat/completions",
                                         json={**body, "seed": seed, "stream": True})  # fmt: skip
            deltas = _deltas(_sse(streamed.text))
            assert _joined(deltas, "reasoning_content") == msg["reasoning_content"]
            assert _joined(deltas, "content") == msg["content"]
        assert reasoned >= 1

    run_app(think_llm.llm_engine, test, served="tiny", reasoning_parser="deepseek_r1")


def test_split_matches_the_raw_reply_and_hides_logprobs(think_llm) -> None:
    """The same seeded request on a server without a parser gives the raw text: the parser's
    server returns it split; include_reasoning: false hides the reasoning and the logprobs."""
    _, end = _ids(think_llm)
    body = {**CHAT, "model": "tiny", "max_tokens": 30, "temperature": 1.0, "seed": 1,
            "logit_bias": {str(end): 7}, "logprobs": True}  # fmt: skip
    raw: dict[str, Any] = {}

    async def plain(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        raw.update((await client.post("/v1/chat/completions", json=body)).json()["choices"][0])

    async def split(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        choice = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
        msg = choice["message"]
        assert "</think>" in raw["message"]["content"]
        want = DEEPSEEK.split(raw["message"]["content"])
        assert (msg["reasoning_content"], msg["content"]) == want
        assert choice["logprobs"] == raw["logprobs"]
        hidden = await client.post("/v1/chat/completions",
                                   json={**body, "include_reasoning": False})  # fmt: skip
        choice = hidden.json()["choices"][0]
        assert "reasoning_content" not in choice["message"] and choice["logprobs"] is None
        assert choice["message"]["content"] == want[1]
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True,
                                     "include_reasoning": False})  # fmt: skip
        chunks = [c for ch in _sse(streamed.text) for c in ch["choices"]]
        assert all(c.get("logprobs") is None for c in chunks)
        assert _joined([c["delta"] for c in chunks], "content") == want[1]

    run_app(think_llm.llm_engine, plain, served="tiny")
    run_app(think_llm.llm_engine, split, served="tiny", reasoning_parser="deepseek_r1")


@pytest.mark.slow
def test_qwen3_constraint_from_the_first_token_unless_it_opens_with_think(think_llm) -> None:
    """qwen3: the first token may be `<think>` (added to the grammar's mask there) or the
    answer's; a prompt that opens the reasoning starts inside it, one that closes it (with
    deepseek_r1) starts with the answer."""
    start, end = _ids(think_llm)
    body = {**CHAT, "model": "tiny", "max_tokens": 150, "temperature": 1.0, "seed": 2,
            "structured_outputs": JSON_ONLY}  # fmt: skip

    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        async def reply(**extra: Any) -> dict[str, Any]:
            r = await client.post("/v1/chat/completions", json={**body, **extra})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "stop", choice
            return choice["message"]

        # The model opens with <think> (favoured), reasons, closes: a JSON answer after.
        msg = await reply(logit_bias={str(start): 9, str(end): 7})
        assert msg["reasoning_content"] and _not_json_prefix(msg["reasoning_content"])
        _json_answer(msg["content"])
        # <think> banned: the answer from the first token; </think> favoured but not JSON.
        msg = await reply(logit_bias={str(start): -100, str(end): 7})
        assert "reasoning_content" not in msg
        _json_answer(msg["content"])
        # The prompt opened the reasoning: inside from the first token, no <think> needed.
        msg = await reply(logit_bias={str(start): -100, str(end): 7},
                          chat_template_kwargs={"think": "open"})  # fmt: skip
        assert msg["reasoning_content"] and _not_json_prefix(msg["reasoning_content"])
        _json_answer(msg["content"])

    run_app(think_llm.llm_engine, test, served="tiny", reasoning_parser="qwen3")

    async def closed(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        r = await client.post("/v1/chat/completions", json={
            **body, "logit_bias": {str(end): 7}, "chat_template_kwargs": {"think": "closed"}})  # fmt: skip
        msg = r.json()["choices"][0]["message"]
        assert "reasoning_content" not in msg
        _json_answer(msg["content"])

    run_app(think_llm.llm_engine, closed, served="tiny", reasoning_parser="deepseek_r1")


def test_serve_refuses_an_unknown_parser_before_loading() -> None:
    from graphwise import cli
    from graphwise.server.cli import run

    args = cli.parse_args(["serve", "--reasoning-parser", "deepseek_r1"])
    assert args.reasoning_parser == "deepseek_r1"
    with pytest.raises(ValueError, match="unknown --reasoning-parser 'r2'; known: deepseek_r1"):
        run(cli.parse_args(["serve", "--reasoning-parser", "r2", "--port", "0"]))
