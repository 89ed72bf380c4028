"""Request and response models in OpenAI's shapes, and the error type every route raises.

Requests are parsed in pydantic's strict mode: OpenAI rejects `"max_tokens": "16"`, and so do
we (a silently coerced string hides client bugs). Floats still accept JSON integers.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from graphwise.sampling_params import SamplingParams

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}` JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# pydantic's tags for union members (`prompt.str`, `stop.list[str]`): not part of a field path.
_UNION_TAGS = {"str", "int", "float", "bool", "none"}


def validation_error(exc: ValidationError | list[dict[str, Any]], skip: int = 0) -> APIError:
    """A pydantic error as a 400 naming the offending field (`messages.0.role`)."""
    errors = exc.errors() if isinstance(exc, ValidationError) else exc
    if not errors:
        return APIError(400, "invalid request")

    def path(err: Any) -> list[str]:
        return [
            str(p)
            for p in list(err.get("loc", ()))[skip:]
            if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))
        ]

    # A union reports one error per member. The deepest is the most specific (a content part
    # whose `type` is wrong beats "content should be a string"), and a broken constraint says
    # more than a type mismatch (65 stop strings: "at most 64 items", not "not a string").
    err = max(errors, key=lambda e: (len(path(e)), not str(e.get("type", "")).endswith("_type")))
    param = ".".join(path(err)) or None
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {msg}", code="invalid_json")
    if err.get("type") == "missing":
        return APIError(400, f"'{param}' is a required field", param=param)
    where = f"{param}: " if param else "request body: "
    return APIError(400, f"{where}{msg} (got {shown(err.get('input'))})", param=param)


def shown(value: Any, limit: int = 60) -> str:
    """A client's value for an error message: its repr, cut short (never echo a whole field)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# A JSON string, the loop unrolled so that each run of plain bytes is one fast C loop.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def count_json_nodes(raw: bytes, enough: int) -> int:
    """How many arrays, objects and strings a JSON text holds (brackets and quotes inside its
    strings left out), or an upper bound on it that is at most `enough`. C-speed passes:
    milliseconds per MB.

    Parsing cost grows with these far faster than with bytes (4 MB of `[[1],[1],...]` took
    pydantic 2 s and 400 MB, `[[[[1]]]],...` 9 s, a million one-letter strings 0.6 s), so
    they are counted before parsing. Numbers are not: a long id list parses fast.
    """
    upper = raw.count(b"[") + raw.count(b"{") + raw.count(b'"') // 2
    if upper <= enough:
        return upper
    skeleton, strings = _JSON_STRING.subn(b"", raw)  # a prompt full of brackets is one string
    return skeleton.count(b"[") + skeleton.count(b"{") + strings


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's: refused when true (check_supported)


# ------------------------------------------------------------------------ the field table
@dataclass(frozen=True)
class Ignored:
    """Accepted with any value, and ignored: `why` says why that changes nothing the client
    gets back."""

    why: str


@dataclass(frozen=True)
class Refused:
    """Not implemented: any value but these (what clients send when they do not ask for the
    feature; a callable tests a value) is a 400 naming the field. Silently ignoring it would
    return something the client did not ask for."""

    defaults: tuple[Any, ...] = (None,)
    hint: str = ""


# Every request field of OpenAI's and vLLM's completion and chat APIs that the request models
# below do not declare: those they declare are the implemented ones. One table for both routes
# (a chat-only field sent to /v1/completions is treated the same way); the README shows it, and
# tests/server/test_request_fields.py checks it against vLLM's field lists.
REQUEST_FIELDS: dict[str, Ignored | Refused] = {
    # ---- accepted and ignored
    "user": Ignored("an end-user id for OpenAI's abuse monitoring; nothing is kept per user"),
    "safety_identifier": Ignored("OpenAI's newer name for `user`"),
    "service_tier": Ignored("OpenAI's billing and latency tier; this server has one tier"),
    "store": Ignored("asks OpenAI to keep the completion for its dashboard; nothing is stored"),
    "metadata": Ignored("tags for stored completions (see `store`)"),
    "prompt_cache_key": Ignored(
        "OpenAI's cache-routing hint; the prefix cache here matches prompts by content"
    ),
    "prediction": Ignored("OpenAI's predicted output only speeds decoding up; output is the same"),
    "guided_decoding_backend": Ignored(
        "vLLM's choice of grammar engine; xgrammar is this server's only one"
    ),
    "mm_processor_kwargs": Ignored(
        "options for a multimodal processor; only text content is accepted, so none runs"
    ),
    # ---- refused unless default: not implemented (yet)
    "use_beam_search": Refused((False, None)),
    "length_penalty": Refused((1, None)),
    "suffix": Refused((None, "")),
    "logprob_token_ids": Refused(),
    "return_token_ids": Refused((None, False)),
    "return_token_offsets": Refused((None, False)),
    "spaces_between_special_tokens": Refused((True, None)),
    "truncate_prompt_tokens": Refused(),
    "truncation_side": Refused(),
    "prompt_embeds": Refused(),
    "structural_tag": Refused(),
    "guided_whitespace_pattern": Refused((None,), "xgrammar has no whitespace pattern"),
    "functions": Refused((None, [])),
    "function_call": Refused((None, "none", "auto")),
    "chat_template": Refused((None,), "the model's own template is used"),
    "priority": Refused((0, None), "requests are scheduled first come, first served"),
    "logits_processors": Refused((None, [])),
    "cache_salt": Refused((None,), "the prefix cache is not salted per request"),
    "kv_transfer_params": Refused(),
    "ec_transfer_params": Refused(),
    "vllm_xargs": Refused((None, {})),
    "repetition_detection": Refused(),
    "max_repetition_pattern_size": Refused((0, None)),
    "min_repetition_pattern_size": Refused((0, None)),
    "repetition_min_count": Refused((0, None)),
    "thinking_token_budget": Refused((None, -1)),
    "modalities": Refused((None, ["text"])),
    "audio": Refused(),
    "web_search_options": Refused(),
    "verbosity": Refused(),
}
# A field inside another: refused in the same way.
NESTED_REFUSED = {"stream_options.continuous_usage_stats": Refused((False, None))}


def _same(value: Any, default: Any) -> bool:
    """JSON equality: 0 and 0.0 are the same, False and 0 are not."""
    if callable(default):
        return bool(default(value))
    if isinstance(value, bool) or isinstance(default, bool):
        return type(value) is type(default) and value == default
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return value == default
    return type(value) is type(default) and value == default


def refuse_unless_default(name: str, value: Any, rule: Refused) -> None:
    if any(_same(value, d) for d in rule.defaults):
        return
    hint = f"; {rule.hint}" if rule.hint else ""
    raise APIError(
        400,
        f"{name} is not supported by this server (got {shown(value)}){hint}",
        param=name,
        code="unsupported_field",
    )


# OpenAI's cap on `n`.
MAX_N = 128


class _SamplingRequest(BaseModel):
    # extra="allow" keeps undeclared fields in model_extra, where REQUEST_FIELDS judges them.
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    # Samples per prompt (each a choice); the prompt is computed once for all of them.
    n: int | None = Field(None, ge=1, le=MAX_N)
    # vLLM V1 dropped best_of (sample best_of, return the n most likely): it is accepted only
    # when it asks for nothing more than n does (best_of == n).
    best_of: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = None
    min_tokens: int = Field(0, ge=0)
    # Bounded: the engine checks every stop after every token, for the whole batch's sake.
    stop: str | Annotated[list[str], Field(max_length=64)] | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=1024)] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # Penalties and filters, with vLLM's names and semantics (SamplingParams checks the values).
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, allow_inf_nan=False)
    min_p: float | None = Field(None, allow_inf_nan=False)
    # OpenAI's logit_bias keys are token ids written as strings.
    logit_bias: Annotated[dict[str, float], Field(max_length=4096)] | None = None
    allowed_token_ids: Annotated[list[int], Field(max_length=1 << 18)] | None = None
    bad_words: Annotated[list[str], Field(max_length=256)] | None = None
    include_stop_str_in_output: bool = False
    # Output constraints (server/structured.py turns them into one StructuredOutputsParams).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's: logprobs name tokens "token_id:<id>" instead of their text.
    return_tokens_as_token_ids: bool = False
    # vLLM's: the prompt tokens' logprobs and the top `prompt_logprobs` at each, returned in
    # the response's `prompt_logprobs` (not streamed: above 0 with stream is a 400, as in vLLM).
    prompt_logprobs: int | None = Field(None, ge=0)
    # Completions: the prompt's text (and with logprobs, its tokens') before the completion's.
    # Chat (vLLM's meaning): the last message's content before the reply's, when that message
    # is the assistant's (the role of the reply).
    echo: bool | None = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's: the response id is "<cmpl|chatcmpl>-<request_id>" (the engine's own id stays
    # unique whatever clients send).
    request_id: str | None = Field(None, min_length=1, max_length=256)
    _structured: tuple[Any, ...] | None = PrivateAttr(None)  # the checked output constraint

    def check_supported(self) -> list[str]:
        """A 400 for the first field, in request order, that asks for what is not implemented
        (REQUEST_FIELDS). Returns the fields nobody knows (ignored, as vLLM does; the server
        logs each name once)."""
        unknown = []
        for name, value in (self.model_extra or {}).items():
            rule = REQUEST_FIELDS.get(name)
            if isinstance(rule, Refused):
                refuse_unless_default(name, value, rule)
            elif rule is None:
                unknown.append(name)
        if self.stream and self.prompt_logprobs:
            raise APIError(
                400,
                "prompt_logprobs are not available when stream is true (0 is accepted)",
                param="prompt_logprobs",
            )
        if self.stream_options is not None:
            name = "stream_options.continuous_usage_stats"
            value = self.stream_options.continuous_usage_stats
            refuse_unless_default(name, value, NESTED_REFUSED[name])
        return unknown

    prompt_param: ClassVar[str] = "prompt"

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return None

    def requested_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

    def logit_bias_ids(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out = {}
        for key, value in self.logit_bias.items():
            if not key.lstrip("-").isdigit():
                raise APIError(
                    400,
                    f"logit_bias keys are token ids written as strings, got {shown(key)}",
                    param="logit_bias",
                )
            out[int(key)] = value
        return out

    def max_tokens_param(self) -> str:
        return "max_tokens"

    @property
    def num_samples(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(
        self, prompt_len: int, max_model_len: int, prompt_param: str | None = None
    ) -> SamplingParams:
        """Engine parameters; raises APIError(400) if the prompt plus output would not fit.
        `prompt_param` names the prompt in errors (`prompt.3` in a batch)."""
        prompt_param = prompt_param or self.prompt_param
        what = {"prompt": "the prompt", "messages": "the conversation"}.get(
            prompt_param, prompt_param
        )
        room = max_model_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"this model's maximum context length is {max_model_len} tokens, and "
                f"{what} is {prompt_len} tokens, leaving no room for output",
                param=prompt_param,
                code="context_length_exceeded",
            )
        n = self.num_samples
        if self.best_of is not None and self.best_of != n:
            raise APIError(
                400,
                f"best_of ({self.best_of}) must equal n ({n}) when given: returning the best n "
                "of best_of samples is not supported (vLLM V1 dropped it too); send n alone",
                param="best_of",
            )
        max_tokens = self.requested_max_tokens()
        if max_tokens is not None and max_tokens > room:
            raise APIError(
                400,
                f"this model's maximum context length is {max_model_len} tokens; "
                f"{what} is {prompt_len} tokens and {max_tokens} output tokens were "
                f"requested (at most {room} fit)",
                param=self.max_tokens_param(),
                code="context_length_exceeded",
            )
        from graphwise.server.structured import structured_outputs_of

        if self._structured is None:  # once per request, however many prompts it holds
            self._structured = (structured_outputs_of(self),)
        structured = self._structured[0]
        try:
            return SamplingParams(
                n=n,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=-1 if self.top_k is None else self.top_k,
                max_tokens=room if max_tokens is None else max_tokens,
                min_tokens=self.min_tokens,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                seed=self.seed,
                skip_special_tokens=self.skip_special_tokens,
                logprobs=self.requested_logprobs(),
                prompt_logprobs=self.requested_prompt_logprobs(),
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=1.0
                if self.repetition_penalty is None
                else self.repetition_penalty,
                min_p=self.min_p or 0.0,
                logit_bias=self.logit_bias_ids(),
                allowed_token_ids=self.allowed_token_ids,
                bad_words=self.bad_words,
                include_stop_str_in_output=self.include_stop_str_in_output,
                structured_outputs=structured,
            )
        except ValueError as exc:  # SamplingParams names the field first
            first = str(exc).split(" ", 1)[0]
            param = first if first in type(self).model_fields else None
            raise APIError(400, str(exc), param=param) from exc


# The most prompts one /v1/completions request may carry (OpenAI's own cap is 2048).
MAX_PROMPTS_PER_REQUEST = 1024


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    add_special_tokens: bool = True  # vLLM's: BOS and the like, as the tokenizer adds them
    # OpenAI's legacy completions: the top `logprobs` of each token (0: the token's own only);
    # the engine caps it at max_logprobs.
    logprobs: int | None = Field(None, ge=0)
    # 0 only with echo (vLLM's): the prompt alone comes back (one token is computed, not shown).
    max_tokens: int | None = Field(None, ge=0)

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def requested_prompt_logprobs(self) -> int | None:
        # With echo, the prompt's tokens are listed in `logprobs` too (vLLM's rule).
        if self.prompt_logprobs is None and self.echo:
            return self.logprobs
        return self.prompt_logprobs

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the response holds the prompt and nothing generated."""
        return bool(self.echo) and self.max_tokens == 0

    def requested_max_tokens(self) -> int | None:
        if self.max_tokens == 0:
            if not self.echo:
                raise APIError(
                    400,
                    "max_tokens must be at least 1 (0 is accepted only with echo)",
                    param="max_tokens",
                )
            return 1
        return self.max_tokens

    def prompt_list(self) -> tuple[list[str | list[int]], bool]:
        """The prompts, and whether the request is a batch (a list of prompts, even of one):
        then each is a choice of its own and is named `prompt.<i>` in errors."""
        p = self.prompt
        if isinstance(p, str) or all(isinstance(t, int) for t in p):  # `[]`: one empty id list
            return [p], False  # type: ignore[list-item]
        if len(p) > MAX_PROMPTS_PER_REQUEST:
            raise APIError(
                400,
                f"prompt holds {len(p)} prompts; at most {MAX_PROMPTS_PER_REQUEST} are accepted "
                "in one request",
                param="prompt",
            )
        return list(p), True  # type: ignore[arg-type]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class MessageFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends JSON text; templates want a mapping


class MessageToolCall(BaseModel):
    """A tool call of an earlier assistant message, sent back in the history."""

    model_config = ConfigDict(strict=True, extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: MessageFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # An assistant's earlier tool calls, and a tool message's answer to one of them.
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def template_dict(self) -> dict[str, Any]:
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # OpenAI's "developer" is the newer name for "system"; templates know only the latter.
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": content}
        if self.tool_calls:
            # Templates (transformers' convention) read arguments as a mapping: OpenAI sends
            # them as JSON text.
            calls = []
            for call in self.tool_calls:
                args: Any = call.function.arguments
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError:
                        pass  # not JSON: the template gets the text
                fn = {"name": call.function.name, "arguments": args}
                calls.append({"id": call.id, "type": call.type, "function": fn})
            out["tool_calls"] = calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and role == "tool":
            out["name"] = self.name
        if role == "assistant":  # an earlier reply's reasoning, for the template
            extra = self.model_extra or {}
            thought = extra.get("reasoning_content", extra.get("reasoning"))
            if isinstance(thought, str):  # Qwen3's and DeepSeek's read reasoning_content
                out["reasoning_content"] = out["reasoning"] = thought
        return out


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # OpenAI's chat: logprobs of the output tokens, with `top_logprobs` most likely (0-20).
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    # vLLM's chat extras, passed to the chat template.
    continue_final_message: bool = False
    add_special_tokens: bool = False  # on top of what the template writes (vLLM's default)
    documents: list[dict[str, str]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Annotated[str, Field(max_length=32)] | None = None
    # OpenAI's tools (server/tools.py): functions the model may call, and whether it must.
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's: false drops the reasoning (and, as vLLM does, the logprobs, whose tokens would
    # show it) from the reply. Only a server with --reasoning-parser knows what the reasoning
    # is; without one it changes nothing (vLLM's behaviour: reasoning stays in content).
    include_reasoning: bool = True

    prompt_param: ClassVar[str] = "messages"

    def requested_max_tokens(self) -> int | None:
        # OpenAI deprecated max_tokens for max_completion_tokens; the newer one wins.
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def requested_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return self.top_logprobs or 0

    def generation_prompt(self) -> bool:
        """add_generation_prompt, off by default when the last message is to be continued
        (both asked for explicitly is a 400, as in vLLM)."""
        if not self.continue_final_message:
            return self.add_generation_prompt
        if self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
            raise APIError(
                400,
                "continue_final_message and add_generation_prompt cannot both be true",
                param="continue_final_message",
            )
        return False

    def template_kwargs(self) -> dict[str, Any]:
        """What the chat template sees beyond the messages: chat_template_kwargs, and
        reasoning_effort when given (as vLLM passes it)."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", self.reasoning_effort)
        return kwargs


# --------------------------------------------------------------------------------- responses
class CompletionTokensDetails(BaseModel):
    """OpenAI's breakdown of the completion tokens: how many were the reasoning's."""

    reasoning_tokens: int


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Only with a --reasoning-parser on the chat route; left out of the body otherwise.
    completion_tokens_details: CompletionTokensDetails | None = None

    @model_serializer(mode="wrap")
    def _drop_empty_details(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body: dict[str, Any] = handler(self)
        if body.get("completion_tokens_details") is None:
            body.pop("completion_tokens_details", None)
        return body

    @classmethod
    def of(
        cls, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None
    ) -> UsageInfo:
        details = None
        if reasoning_tokens is not None:
            details = CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            completion_tokens_details=details,
        )


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: by token, its text, logprob, the top ones and its text offset."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class LogprobEntry(BaseModel):
    """vLLM's Logprob in its `prompt_logprobs` lists (keyed by token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's `prompt_logprobs`: None for the first prompt token, then by token id (as a string).
PromptLogprobsJSON = list[dict[str, LogprobEntry] | None]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobsJSON | None = None  # vLLM's, not streamed


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# The reasoning of a reasoning model's reply (server/reasoning.py), under both names clients
# read: `reasoning` (vLLM's since vllm-project/vllm#27752, Oct 2025: OpenAI's guidance for chat
# completions, OpenRouter's) and `reasoning_content` (DeepSeek's API, and vLLM's until #33402
# removed it in Jan 2026; many clients still read only it). Absent, not null, when there is
# none.
REASONING_KEYS = ("reasoning", "reasoning_content")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    reasoning: str | None = None
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_no_reasoning(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        for key in REASONING_KEYS:
            if out.get(key) is None:
                out.pop(key, None)
        return out


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobsJSON | None = None  # vLLM's, not streamed


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None  # both names, as in AssistantMessage
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends the role in the first delta only, not `"role": null` in every one.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "graphwise"
    root: str | None = None  # where the weights came from: `bench serve` finds the tokenizer
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
