"""OutputProcessor: a request's updates become text and `RequestOutput`s.

It owns what the user sees of a request: the detokenized text (incrementally, see
detokenizer.py), the stop strings (text-level stops: the engine then tells the scheduler to
finish the request), the text held back while it may still become a stop string, and the
timing metrics. The scheduler owns everything the model needs; neither reads the other's state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from graphwise.core.step import PromptLogprobs
from graphwise.engine.detokenizer import IncrementalDetokenizer
from graphwise.engine.scheduler import RequestUpdate
from graphwise.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobList,
    RequestMetrics,
    RequestOutput,
    SampleLogprob,
)
from graphwise.sampling_params import SamplingParams


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reported_text_len: int = 0  # characters of text already streamed out
    first_token_time: float | None = None
    logprobs: list[SampleLogprob] | None = None  # when the request asked for them
    cumulative_logprob: float = 0.0
    prompt_logprobs: PromptLogprobList | None = None  # once the prompt's are all in


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
    ) -> None:
        state = RequestState(
            request_id,
            prompt,
            prompt_token_ids,
            params,
            IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
            arrival_time,
        )
        if params.logprobs is not None:
            state.logprobs = []
        self.requests[request_id] = state

    def abort(self, request_id: str) -> bool:
        return self.requests.pop(request_id, None) is not None

    def process(
        self, updates: list[RequestUpdate]
    ) -> tuple[list[RequestOutput], list[tuple[str, str]]]:
        """Outputs for a step's updates, and the requests a stop string ended that the
        scheduler still runs (request id, stop string): the engine finishes those."""
        outputs: list[RequestOutput] = []
        stopped: list[tuple[str, str]] = []
        now = time.monotonic()
        for update in updates:
            state = self.requests.get(update.request_id)
            if state is None:
                continue
            reason, stop_reason = update.finish_reason, update.stop_reason
            before = len(state.text)
            for token in update.new_token_ids:
                state.output_token_ids.append(token)
                state.text += state.detokenizer.push(token)
            new_logprobs = self._logprobs(state, update)
            if update.prompt_logprobs is not None:
                state.prompt_logprobs = self._prompt_logprobs(state, update.prompt_logprobs)
            if update.new_token_ids and state.first_token_time is None:
                state.first_token_time = now
            p = state.params
            if (
                p.stop_strings
                and reason in (None, "length")
                and len(state.output_token_ids) >= p.min_tokens
            ):
                found = self._find_stop_string(state, before)
                if found is not None:
                    if reason is None:
                        stopped.append((state.request_id, found))
                    reason, stop_reason = "stop", found
            outputs.append(self._make_output(state, update, reason, stop_reason, now, new_logprobs))
            if reason is not None:
                del self.requests[state.request_id]
        return outputs, stopped

    def _logprobs(self, state: RequestState, update: RequestUpdate) -> list[SampleLogprob]:
        """The step's entries in vLLM's shape: the sampled token and the top ones, by id."""
        if state.logprobs is None:
            return []
        entries = []
        for token, lp in zip(update.new_token_ids, update.logprobs, strict=True):
            entry = {
                tid: Logprob(value, rank + 1, self._decode(tid))
                for rank, (tid, value) in enumerate(zip(lp.top_ids, lp.top_logprobs, strict=True))
            }
            if token not in entry:
                entry[token] = Logprob(lp.logprob, lp.rank, self._decode(token))
            entries.append(entry)
            state.cumulative_logprob += lp.logprob
        state.logprobs.extend(entries)
        return entries

    def _prompt_logprobs(self, state: RequestState, pl: PromptLogprobs) -> PromptLogprobList:
        """vLLM's shape: None for the first prompt token, then each one's entry (the prompt
        token, its logprob and rank, and the top ones), by id."""
        out: PromptLogprobList = [None]
        prompt = state.prompt_token_ids
        for i, (value, rank, ids, values) in enumerate(
            zip(pl.logprobs, pl.ranks, pl.top_ids, pl.top_logprobs, strict=True)
        ):
            entry = {
                tid: Logprob(v, r + 1, self._decode(tid))
                for r, (tid, v) in enumerate(zip(ids, values, strict=True))
            }
            token = prompt[pl.start + i + 1]
            if token not in entry:
                entry[token] = Logprob(value, rank, self._decode(token))
            out.append(entry)
        return out

    def _decode(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token])

    @staticmethod
    def _find_stop_string(state: RequestState, before: int) -> str | None:
        text = state.text
        for stop in state.params.stop_strings:
            idx = text.find(stop, max(0, before - len(stop) + 1))
            if idx != -1:
                keep = len(stop) if state.params.include_stop_str_in_output else 0
                state.text = text[: idx + keep]
                return stop
        return None

    def _make_output(
        self,
        state: RequestState,
        update: RequestUpdate,
        reason: str | None,
        stop_reason: int | str | None,
        now: float,
        new_logprobs: list[SampleLogprob],
    ) -> RequestOutput:
        # Like vLLM's DELTA output kind: a running request's output carries only what this step
        # added (copying the whole text and token list every step would cost O(length^2) per
        # request); the final output carries everything.
        done = reason is not None
        # Hold back text that could still turn out to start a stop string.
        hold = 0 if done else max((len(s) for s in state.params.stop_strings), default=1) - 1
        visible = max(state.reported_text_len, len(state.text) - hold)
        delta_text = state.text[state.reported_text_len : visible]
        state.reported_text_len = visible
        completion = CompletionOutput(
            index=0,
            text=state.text if done else delta_text,
            token_ids=list(state.output_token_ids) if done else list(update.new_token_ids),
            finish_reason=reason,
            stop_reason=stop_reason,
        )
        if state.logprobs is not None:
            completion.logprobs = list(state.logprobs) if done else new_logprobs
            completion.cumulative_logprob = state.cumulative_logprob
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[completion],
            finished=done,
            num_cached_tokens=update.num_cached_tokens,
            metrics=RequestMetrics(
                arrival_time=state.arrival_time,
                first_scheduled_time=update.first_scheduled_time,
                first_token_time=state.first_token_time,
                finished_time=now if done else None,
            ),
            delta_text=delta_text,
            delta_token_ids=list(update.new_token_ids),
            error=update.error,
            prompt_logprobs=(
                state.prompt_logprobs if done or update.prompt_logprobs is not None else None
            ),
        )
