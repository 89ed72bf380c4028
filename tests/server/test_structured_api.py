"""Output constraints over the OpenAI routes (issue 20): response_format, vLLM's
structured_outputs and guided_* fields, streamed too; bad ones are a 400 naming the field. In
process: the app over a real engine on the tiny chat model (SmolLM2's tokenizer)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import pytest
from fake_engine import run_app

from graphwise import LLM
from graphwise.server.async_engine import AsyncEngine

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "blue"]}, "n": {"type": "integer", "minimum": 0,
                                                                "maximum": 9}},
    "required": ["colour", "n"],
}  # fmt: skip
CHAT = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def engine(tiny_chat_dir):
    return LLM(model=str(tiny_chat_dir), max_num_seqs=8, max_model_len=1024).llm_engine


def _run(engine, test) -> None:
    run_app(engine, test, served="tiny")


def _valid_prefix(engine, schema: dict | None, text: str) -> bool:
    """The text is a prefix xgrammar's own matcher accepts (an output cut by max_tokens)."""
    xgr = pytest.importorskip("xgrammar")
    info = xgr.TokenizerInfo.from_huggingface(engine.tokenizer, vocab_size=len(engine.tokenizer))
    compiler = xgr.GrammarCompiler(info)
    compiled = (compiler.compile_json_schema(json.dumps(schema)) if schema is not None
                else compiler.compile_builtin_json_grammar())  # fmt: skip
    return xgr.GrammarMatcher(compiled).accept_string(text)


def _sse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_constraints_on_both_routes(engine) -> None:
    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        base = {"model": "tiny", "max_tokens": 64, "temperature": 1.0, "seed": 3}
        cases = [
            ({"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": SCHEMA, "strict": True}}},
             lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
            ({"response_format": {"type": "json_object"}},
             lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
            ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
            ({"guided_json": json.dumps(SCHEMA)},
             lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
            ({"guided_regex": "[0-9]{3}-[a-z]{2}"},
             lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t) or pytest.fail(t)),
            ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no") or pytest.fail(t)),
            ({"guided_grammar": 'root ::= "a" | "bb"'},
             lambda t: t in ("a", "bb") or pytest.fail(t)),
            ({"structured_outputs": {"choice": ["up", "down"]}},
             lambda t: t in ("up", "down") or pytest.fail(t)),
            ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
             lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
            ({"response_format": {"type": "text"}, "guided_choice": ["z"]},
             lambda t: t == "z" or pytest.fail(t)),
        ]  # fmt: skip
        stopped = 0
        for extra, check in cases:
            # JSON with free whitespace may blank on to max_tokens on a random model: then what
            # came out must still be a prefix the grammar accepts.
            schema = None if "json_object" in str(extra) else SCHEMA
            for path, more in (("/v1/completions", {"prompt": "Q:"}),
                               ("/v1/chat/completions", {"messages": CHAT})):  # fmt: skip
                r = await client.post(path, json={**base, **more, **extra})
                assert r.status_code == 200, (extra, r.text)
                c = r.json()["choices"][0]
                text = c["text"] if "text" in c else c["message"]["content"]
                if c["finish_reason"] == "stop":
                    check(text)
                    stopped += 1
                else:
                    assert c["finish_reason"] == "length"
                    assert "json" in str(extra) and _valid_prefix(engine, schema, text), text
        assert stopped >= 12  # every case but the four with free whitespace, on both routes

    _run(engine, test)


def test_streamed_constraint(engine) -> None:
    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 64, "temperature": 0,
                "stream": True, "structured_outputs": {"json": SCHEMA,
                                                       "disable_any_whitespace": True}}  # fmt: skip
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        chunks = _sse(r.text)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        if chunks[-1]["choices"][0]["finish_reason"] == "stop":
            jsonschema.validate(json.loads(text), SCHEMA)
        else:
            assert _valid_prefix(engine, SCHEMA, text)
        plain = await client.post("/v1/chat/completions", json={**body, "stream": False})
        assert plain.json()["choices"][0]["message"]["content"] == text

    _run(engine, test)


@pytest.mark.parametrize(
    "extra,param,words",
    [
        ({"guided_regex": "a(b"}, "guided_regex", "regex"),
        ({"guided_json": {"type": "objectx"}}, "guided_json", "objectx"),
        ({"guided_json": "{nope"}, "guided_json", "JSON"),
        ({"guided_grammar": "root ::= foo"}, "guided_grammar", "foo"),
        ({"guided_choice": []}, "guided_choice", "choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "xml"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
          "schema": {"type": "nope"}}}}, "response_format", "nope"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
         "exactly one"),
        ({"structured_outputs": {"regexp": "a"}}, "structured_outputs", "regexp"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400s_naming_the_field(engine, extra, param, words) -> None:
    async def test(client: httpx.AsyncClient, app: Any, eng: AsyncEngine) -> None:
        for path, body in (("/v1/completions", {"prompt": "Q:"}),
                           ("/v1/chat/completions", {"messages": CHAT})):  # fmt: skip
            r = await client.post(path, json={"model": "tiny", "max_tokens": 4, **body, **extra})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == param and words in err["message"], err

    _run(engine, test)
