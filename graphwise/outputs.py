"""RequestOutput / CompletionOutput: what generate() returns, in vLLM's shape."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """vLLM's shape: a token's log-probability, its rank among all tokens (1: the most likely)
    and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One generated token's entry: the sampled token and the requested most likely ones, by id.
SampleLogprob = dict[int, Logprob]
# With SamplingParams(prompt_logprobs=k): None for the first prompt token (nothing precedes
# it), then per prompt token an entry like SampleLogprob's (the prompt token and the top k).
PromptLogprobList = list[SampleLogprob | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or token that ended it
    # With SamplingParams(logprobs=k): one entry per token in token_ids, and their sum.
    logprobs: list[SampleLogprob] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """One request's output. While it runs, `outputs[0]` holds what the latest step added (also
    in `delta_text` / `delta_token_ids`); once `finished`, it holds the whole completion.

    With n > 1 samples (SamplingParams.n), `outputs` holds CompletionOutputs by `index`: while
    the request runs, the deltas of the samples that advanced in the latest step (a sample that
    ended in it has its finish_reason set); the `finished` output, which follows the last
    step's deltas, holds every sample whole, in index order. `delta_text` and
    `delta_token_ids` stay empty (they describe a single completion)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    # Streaming: the text and tokens added since the previous output for this request.
    delta_text: str = field(default="", repr=False)
    delta_token_ids: list[int] = field(default_factory=list, repr=False)
    # Why the request failed, when finish_reason is "error" (the engine kept serving the rest).
    error: str | None = None
    # With prompt_logprobs: on the final output, and on the streamed output of the first token.
    prompt_logprobs: PromptLogprobList | None = None
