"""The one check every new request passes, wherever it comes from (`LLM.generate`, the server,
the data-parallel front): its prompt and every token id it carries must fit the model.

A bad id must be refused here, at admission, with the field named: inside a step it would fail
(or silently corrupt) every request batched with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from graphwise.sampling_params import SamplingParams


class InvalidRequest(ValueError):
    """A request the engine cannot run; `param` names the offending field (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    max_logprobs: int = 20
    # Pipeline parallelism sends back only the sampled rows' hidden states: no prompt logprobs.
    prompt_logprobs: bool = True


def check_token_ids(ids: Sequence[object], param: str, vocab_size: int) -> None:
    """Every id an int in [0, vocab_size); raises InvalidRequest naming `param`. The common case
    (all good) runs in C loops: a prompt can hold a whole context of ids."""
    try:
        if not ids or (
            min(ids) >= 0  # type: ignore[operator]
            and max(ids) < vocab_size  # type: ignore[operator]
            and all(type(t) is int for t in ids)
        ):
            return
    except TypeError:  # not all numbers: the loop below names the first bad one
        pass
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InvalidRequest(
                f"{param} contains {t!r}, not a token id in [0, {vocab_size})", param
            )


def check_prompt_ids(ids: object, limits: RequestLimits, param: str = "prompt_token_ids") -> None:
    if not isinstance(ids, list) or not ids:
        raise InvalidRequest(f"{param} must be a non-empty list of token ids", param)
    check_token_ids(ids, param, limits.vocab_size)
    if len(ids) >= limits.max_model_len:
        raise InvalidRequest(
            f"prompt is {len(ids)} tokens, too long for max_model_len={limits.max_model_len} "
            "(it must leave room for at least one generated token)",
            param,
        )


def check_sampling_params(params: SamplingParams, limits: RequestLimits) -> None:
    """What a request's sampling parameters carry that depends on the model and the engine: the
    token ids, and how many logprobs it asks for."""
    check_token_ids(params.stop_token_ids or [], "stop_token_ids", limits.vocab_size)
    check_token_ids(list(params.logit_bias or ()), "logit_bias", limits.vocab_size)
    check_token_ids(params.allowed_token_ids or [], "allowed_token_ids", limits.vocab_size)
    if params.reasoning is not None:
        marks = params.reasoning
        check_token_ids(
            [*marks.start_token_ids, *marks.end_token_ids], "reasoning", limits.vocab_size
        )
    if params.logprobs is not None and params.logprobs > limits.max_logprobs:
        raise InvalidRequest(
            f"logprobs is {params.logprobs}, more than this engine's max_logprobs "
            f"({limits.max_logprobs})",
            "logprobs",
        )
    if params.prompt_logprobs is not None and not limits.prompt_logprobs:
        raise InvalidRequest(
            "prompt_logprobs is not supported with pipeline parallelism", "prompt_logprobs"
        )
    if params.prompt_logprobs is not None and params.prompt_logprobs > limits.max_logprobs:
        raise InvalidRequest(
            f"prompt_logprobs is {params.prompt_logprobs}, more than this engine's max_logprobs "
            f"({limits.max_logprobs})",
            "prompt_logprobs",
        )


def normalize_request(
    prompt: str | None,
    sampling_params: SamplingParams | None,
    prompt_token_ids: list[int] | None,
    tokenize: Callable[[str], list[int]],
    limits: RequestLimits,
) -> tuple[SamplingParams, list[int]]:
    """A new request's parameters (defaults filled in) and prompt ids, checked."""
    params = sampling_params or SamplingParams()
    if not isinstance(params, SamplingParams):
        raise InvalidRequest("sampling_params must be a SamplingParams", "sampling_params")
    if prompt_token_ids is None:
        if not isinstance(prompt, str):
            raise InvalidRequest(f"prompt must be a string, got {type(prompt).__name__}", "prompt")
        prompt_token_ids = tokenize(prompt)
    check_prompt_ids(prompt_token_ids, limits)
    check_sampling_params(params, limits)
    return params, prompt_token_ids
