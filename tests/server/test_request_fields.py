"""Every request field a vLLM client may send is implemented, ignored for a stated reason, or
refused by name (protocol.REQUEST_FIELDS): nothing is silently dropped. In process, against the
fake engine and the embedded model's tokenizer."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_engine import FakeEngine, run_app

from graphwise.server.async_engine import AsyncEngine
from graphwise.server.protocol import (
    NESTED_REFUSED,
    REQUEST_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    Ignored,
    Refused,
)

README = Path(__file__).resolve().parents[2] / "README.md"

# The request fields of vLLM's CompletionRequest and ChatCompletionRequest, copied from
# vllm/entrypoints/openai/completion/protocol.py and chat_completion/protocol.py at vLLM commit
# d5dba2d7b0ab9b98096560c69db7126b54b14d79 (main, 2026; the first layout with
# `structured_outputs` in place of the guided_* fields), in their order there.
VLLM_COMPLETION_FIELDS = [
    "model", "prompt", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature",
    "top_p", "user",
    # completion-sampling-params
    "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty",
    "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "allowed_token_ids", "prompt_logprobs",
    # completion-extra-params
    "prompt_embeds", "add_special_tokens", "response_format", "structured_outputs", "priority",
    "request_id", "logits_processors", "return_tokens_as_token_ids", "return_token_ids",
    "cache_salt", "kv_transfer_params", "vllm_xargs", "max_repetition_pattern_size",
    "min_repetition_pattern_size", "repetition_min_count",
]  # fmt: skip
VLLM_CHAT_FIELDS = [
    "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "max_tokens", "max_completion_tokens", "n", "presence_penalty", "response_format", "seed",
    "stop", "stream", "stream_options", "temperature", "top_p", "tools", "tool_choice",
    "reasoning_effort", "include_reasoning", "parallel_tool_calls", "user",
    # chat-completion-sampling-params
    "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty",
    "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "prompt_logprobs", "allowed_token_ids", "bad_words",
    # chat-completion-extra-params
    "echo", "add_generation_prompt", "continue_final_message", "add_special_tokens",
    "documents", "chat_template", "chat_template_kwargs", "mm_processor_kwargs",
    "structured_outputs", "priority", "request_id", "logits_processors",
    "return_tokens_as_token_ids", "return_token_ids", "cache_salt", "kv_transfer_params",
    "vllm_xargs", "max_repetition_pattern_size", "min_repetition_pattern_size",
    "repetition_min_count",
]  # fmt: skip
# Fields that vLLM had before (the guided_* family, best_of) or added after that commit, and
# OpenAI's own that vLLM leaves out: clients send these too.
OTHER_FIELDS = [
    "best_of", "bad_words", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "structural_tag", "guided_decoding_backend", "guided_whitespace_pattern",
    "logprob_token_ids", "truncation_side", "return_token_offsets", "ec_transfer_params",
    "repetition_detection", "thinking_token_budget",
    "service_tier", "store", "metadata", "safety_identifier", "prompt_cache_key", "prediction",
    "functions", "function_call", "modalities", "audio", "web_search_options", "verbosity",
]  # fmt: skip

# A value of each refused field that asks for the feature (the route's own type where the two
# differ: logprobs is a count in completions and a flag in chat).
ASKING = {
    "n": 2, "best_of": 2, "use_beam_search": True, "length_penalty": 0.5, "echo": True,
    "suffix": "end", "logprobs": 2, "top_logprobs": 3, "prompt_logprobs": 1,
    "logprob_token_ids": [1, 2], "return_token_ids": True, "return_token_offsets": True,
    "logit_bias": {"5": -100}, "presence_penalty": 0.5, "frequency_penalty": -0.5,
    "repetition_penalty": 1.2, "min_p": 0.1, "allowed_token_ids": [1, 2], "bad_words": ["x"],
    "include_stop_str_in_output": True, "spaces_between_special_tokens": False,
    "truncate_prompt_tokens": 8, "truncation_side": "left", "prompt_embeds": "AAAA",
    "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"},
    "guided_json": {"type": "object"}, "guided_regex": "a+", "guided_choice": ["a", "b"],
    "guided_grammar": "root ::= 'a'", "structural_tag": "{}", "guided_decoding_backend": "xgrammar",
    "guided_whitespace_pattern": " ", "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "required", "functions": [{"name": "f"}], "function_call": {"name": "f"},
    "include_reasoning": False, "chat_template": "{{ messages }}", "priority": 1,
    "logits_processors": ["mod.Proc"], "cache_salt": "salt", "kv_transfer_params": {"a": 1},
    "ec_transfer_params": {"a": 1}, "vllm_xargs": {"a": 1}, "repetition_detection": {},
    "max_repetition_pattern_size": 4, "min_repetition_pattern_size": 2,
    "repetition_min_count": 3, "thinking_token_budget": 16, "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"}, "web_search_options": {},
    "verbosity": "low",
}  # fmt: skip
CHAT_ASKING = {"logprobs": True}
IGNORED_VALUE = {"user": "u-1", "service_tier": "flex", "store": True, "metadata": {"a": "b"}}

COMPLETION = {"prompt": [1, 2, 3], "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _declared(route: str) -> set[str]:
    model = CompletionRequest if route == "completion" else ChatCompletionRequest
    return set(model.model_fields)


@pytest.mark.parametrize(
    "route, fields",
    [("completion", VLLM_COMPLETION_FIELDS), ("chat", VLLM_CHAT_FIELDS)],
)
def test_every_vllm_field_is_in_exactly_one_class(route: str, fields: list[str]) -> None:
    assert len(set(fields)) == len(fields)
    implemented = _declared(route)
    ignored = {n for n, r in REQUEST_FIELDS.items() if isinstance(r, Ignored)}
    refused = {n for n, r in REQUEST_FIELDS.items() if isinstance(r, Refused)}
    for name in [*fields, *OTHER_FIELDS]:
        classes = [name in implemented, name in ignored, name in refused]
        assert sum(classes) == 1, (route, name, classes)
    # And nothing in the table is declared by either request model.
    assert not set(REQUEST_FIELDS) & (_declared("completion") | _declared("chat"))
    for rule in REQUEST_FIELDS.values():
        assert not isinstance(rule, Ignored) or len(rule.why) > 20  # a reason, not a shrug


def test_refused_fields_asking_for_a_feature_get_a_400_naming_them(
    default_tokenizer: Any,
) -> None:
    fake = FakeEngine()
    fake.tokenizer = default_tokenizer  # type: ignore[assignment]
    fake.model_config.vocab_size = len(default_tokenizer)
    refused = [n for n, r in REQUEST_FIELDS.items() if isinstance(r, Refused)]
    assert set(refused) <= set(ASKING), set(refused) - set(ASKING)

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        for path, base, asking in (
            ("/v1/completions", COMPLETION, ASKING),
            ("/v1/chat/completions", CHAT, {**ASKING, **CHAT_ASKING}),
        ):
            for name in refused:
                resp = await client.post(path, json={**base, name: asking[name]})
                assert resp.status_code == 400, (path, name, resp.text)
                err = resp.json()["error"]
                assert err["param"] == name and err["code"] == "unsupported_field", err
                assert name in err["message"]
            for name, rule in [*REQUEST_FIELDS.items(), *NESTED_REFUSED.items()]:
                if not isinstance(rule, Refused):
                    continue
                for default in rule.defaults:  # what clients send when not asking: accepted
                    value = {"type": "text"} if callable(default) else default
                    body = {**base, name: value}
                    if name.startswith("stream_options."):
                        body = {**base, "stream": True, "stream_options": {name[15:]: value}}
                    resp = await client.post(path, json=body)
                    assert resp.status_code == 200, (path, name, value, resp.text)
            body = {**base, "stream": True, "stream_options": {"continuous_usage_stats": True}}
            err = (await client.post(path, json=body)).json()["error"]
            assert err["param"] == "stream_options.continuous_usage_stats"
        assert fake.added and all(len(ids) > 0 for _, ids, _ in fake.added)

    run_app(fake, test)


def test_ignored_fields_are_accepted(default_tokenizer: Any) -> None:
    fake = FakeEngine()
    fake.tokenizer = default_tokenizer  # type: ignore[assignment]
    fake.model_config.vocab_size = len(default_tokenizer)

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        for name, rule in REQUEST_FIELDS.items():
            if not isinstance(rule, Ignored):
                continue
            value = IGNORED_VALUE.get(name, {"any": ["value", 1]})
            for path, base in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
                resp = await client.post(path, json={**base, name: value})
                assert resp.status_code == 200, (path, name, resp.text)

    run_app(fake, test)


def test_unknown_field_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        for _ in range(3):
            resp = await client.post("/v1/completions", json={**COMPLETION, "frobnicate": 1})
            assert resp.status_code == 200

    run_app(FakeEngine(), test)
    lines = [r for r in caplog.records if "'frobnicate'" in r.getMessage()]
    assert len(lines) == 1 and "ignored" in lines[0].getMessage()


def _template_tokenizer(default_tokenizer: Any, template: str) -> Any:
    tok = copy.deepcopy(default_tokenizer)
    tok.chat_template = template
    return tok


def test_chat_template_kwargs_documents_and_reasoning_effort_reach_the_template(
    default_tokenizer: Any,
) -> None:
    template = (
        "[{{ greeting | default('none') }}|{{ reasoning_effort | default('-') }}|"
        "{{ documents | length if documents else 0 }}]"
        "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fake = FakeEngine()
    fake.tokenizer = _template_tokenizer(default_tokenizer, template)  # type: ignore[assignment]
    fake.model_config.vocab_size = len(default_tokenizer)
    fake.max_model_len = 256  # type: ignore[misc]

    def rendered() -> str:
        return default_tokenizer.decode(fake.added[-1][1])

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        async def chat(**extra: Any) -> httpx.Response:
            return await client.post("/v1/chat/completions", json={**CHAT, **extra})

        assert (await chat()).status_code == 200
        assert rendered() == "[none|-|0]user:Hi;assistant:"
        resp = await chat(
            chat_template_kwargs={"greeting": "hello"},
            reasoning_effort="low",
            documents=[{"title": "a", "text": "b"}],
        )
        assert resp.status_code == 200, resp.text
        assert rendered() == "[hello|low|1]user:Hi;assistant:"
        assert (await chat(add_generation_prompt=False)).status_code == 200
        assert rendered() == "[none|-|0]user:Hi;"

        resp = await chat(chat_template_kwargs={"tokenize": True})
        err = resp.json()["error"]
        assert resp.status_code == 400 and err["param"] == "chat_template_kwargs.tokenize", err
        resp = await chat(chat_template_kwargs="x")
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "chat_template_kwargs"

    run_app(fake, test)


def test_continue_final_message(default_tokenizer: Any) -> None:
    fake = FakeEngine()
    fake.tokenizer = default_tokenizer  # type: ignore[assignment]
    fake.model_config.vocab_size = len(default_tokenizer)
    fake.max_model_len = 256  # type: ignore[misc]
    messages = [
        {"role": "user", "content": "Say hello"},
        {"role": "assistant", "content": "Hello, my name"},
    ]

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        body = {"messages": messages, "max_tokens": 2, "continue_final_message": True}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        text = default_tokenizer.decode(fake.added[-1][1])
        assert text.endswith("<|im_start|>assistant\nHello, my name"), text
        both = {**body, "add_generation_prompt": True}
        resp = await client.post("/v1/chat/completions", json=both)
        assert resp.status_code == 400
        assert resp.json()["error"]["param"] == "continue_final_message"

    run_app(fake, test)


def test_readme_shows_the_table() -> None:
    readme = README.read_text()
    for name, rule in REQUEST_FIELDS.items():
        if isinstance(rule, Ignored):
            assert f"| `{name}` | {rule.why} |" in readme, name
        else:
            assert f"`{name}`" in readme, name
