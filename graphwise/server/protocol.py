"""Request and response models in OpenAI's shapes, and the error type every route raises.

Requests are parsed in pydantic's strict mode: OpenAI rejects `"max_tokens": "16"`, and so do
we (a silently coerced string hides client bugs). Floats still accept JSON integers.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

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
    include_usage: bool = False


# OpenAI fields we do not implement. Silently ignoring them would return something the client
# did not ask for, so a non-default value is a 400 (the defaults are fine: clients send them).
_UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


class _SamplingRequest(BaseModel):
    # extra="allow" keeps unknown fields in model_extra, so unsupported ones can be refused.
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
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
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise APIError(
                400, f"n must be 1 (got {self.n}); send one request per sample", param="n"
            )
        for name, value in (self.model_extra or {}).items():
            allowed = _UNSUPPORTED_UNLESS.get(name)
            if allowed is not None and not any(value == a for a in allowed):
                raise APIError(400, f"{name} is not supported by this server", param=name)

    prompt_param: ClassVar[str] = "prompt"

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, prompt_len: int, max_model_len: int) -> SamplingParams:
        """Engine parameters; raises APIError(400) if the prompt plus output would not fit."""
        room = max_model_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"this model's maximum context length is {max_model_len} tokens, and the prompt "
                f"is {prompt_len} tokens, leaving no room for output",
                param=self.prompt_param,
                code="context_length_exceeded",
            )
        max_tokens = self.requested_max_tokens()
        if max_tokens is not None and max_tokens > room:
            raise APIError(
                400,
                f"this model's maximum context length is {max_model_len} tokens; the prompt is "
                f"{prompt_len} tokens and {max_tokens} output tokens were requested "
                f"(at most {room} fit)",
                param=self.max_tokens_param(),
                code="context_length_exceeded",
            )
        try:
            return SamplingParams(
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
            )
        except ValueError as exc:  # SamplingParams names the field first
            first = str(exc).split(" ", 1)[0]
            param = first if first in type(self).model_fields else None
            raise APIError(400, str(exc), param=param) from exc


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str) or all(isinstance(t, int) for t in p):
            return p  # type: ignore[return-value]
        if len(p) != 1:
            raise APIError(
                400,
                f"prompt holds {len(p)} prompts; this server takes one per request",
                param="prompt",
            )
        return p[0]  # type: ignore[return-value]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict[str, str]:
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # OpenAI's "developer" is the newer name for "system"; templates know only the latter.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    add_generation_prompt: bool = True

    prompt_param: ClassVar[str] = "messages"

    def requested_max_tokens(self) -> int | None:
        # OpenAI deprecated max_tokens for max_completion_tokens; the newer one wins.
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


# --------------------------------------------------------------------------------- responses
class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends the role in the first delta only, not `"role": null` in every one.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
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
