"""OutputProcessor: a request's updates become text and `RequestOutput`s.

It owns what the user sees of a request: the detokenized text (incrementally, see
detokenizer.py), the stop strings (text-level stops: the engine then tells the scheduler to
finish the request), the text held back while it may still become a stop string, and the
timing metrics. The scheduler owns everything the model needs; neither reads the other's state.

A request with n > 1 samples runs as n scheduler sequences (ids "<i>_<request id>", vLLM's);
here each has its own state (text, stops, logprobs) and `Samples` gathers them into one
`RequestOutput` per step: while any runs, the deltas of the samples that advanced (each a
`CompletionOutput` with its index); once all have finished, one more with every sample whole.
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
    index: int = 0  # which sample of an n > 1 request
    samples: Samples | None = None  # the request's samples, when n > 1
    prompt_logprobs: PromptLogprobList | None = None  # once the prompt's are all in


@dataclass
class Samples:
    """An n > 1 request: its samples' states (by index) and what the user sees of it whole."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    arrival_time: float
    states: list[RequestState]
    finals: dict[int, CompletionOutput] = field(default_factory=dict)
    deltas: list[CompletionOutput] = field(default_factory=list)  # this step's
    first_token_time: float | None = None
    first_scheduled_time: float | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs_sent: bool = False


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}  # by the scheduler's (sample's) id
        self.samples: dict[str, Samples] = {}  # n > 1 requests, by request id

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        sample_ids: list[str] | None = None,
    ) -> None:
        """`sample_ids`: the scheduler's ids of the n samples of an n > 1 request."""
        ids = sample_ids or [request_id]
        states = [
            RequestState(
                rid,
                prompt,
                prompt_token_ids,
                params,
                IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
                arrival_time,
                index=i,
            )
            for i, rid in enumerate(ids)
        ]
        if sample_ids is not None:
            group = Samples(request_id, prompt, prompt_token_ids, arrival_time, states)
            self.samples[request_id] = group
        for state in states:
            if params.logprobs is not None:
                state.logprobs = []
            if sample_ids is not None:
                state.samples = group
            self.requests[state.request_id] = state

    def sample_ids(self, request_id: str) -> list[str]:
        """The scheduler's ids of a request's samples (itself, unless n > 1)."""
        group = self.samples.get(request_id)
        return [request_id] if group is None else [s.request_id for s in group.states]

    def request_id_of(self, sample_id: str) -> str:
        """The user's request id of a scheduler sequence."""
        state = self.requests.get(sample_id)
        return sample_id if state is None or state.samples is None else state.samples.request_id

    def abort(self, request_id: str) -> bool:
        group = self.samples.pop(request_id, None)
        if group is not None:
            for state in group.states:
                self.requests.pop(state.request_id, None)
            return True
        return self.requests.pop(request_id, None) is not None

    def process(
        self, updates: list[RequestUpdate]
    ) -> tuple[list[RequestOutput], list[tuple[str, str]]]:
        """Outputs for a step's updates, and the requests a stop string ended that the
        scheduler still runs (request id, stop string): the engine finishes those."""
        outputs: list[RequestOutput] = []
        stopped: list[tuple[str, str]] = []
        now = time.monotonic()
        touched: dict[str, Samples] = {}  # n > 1 requests with news this step, in order
        for update in updates:
            state = self.requests.get(update.request_id)
            if state is None:
                continue
            reason, stop_reason = update.finish_reason, update.stop_reason
            before = len(state.text)
            p = state.params
            found = None
            if len(update.new_token_ids) > 1 and p.stop_strings and reason in (None, "length"):
                # Several tokens at once (a verify step's accepted drafts): look for stop
                # strings token by token, so that the tokens after one are dropped as they
                # would never have been sampled without speculation.
                found = self._push_until_stop(state, update)
            else:
                for token in update.new_token_ids:
                    state.output_token_ids.append(token)
                    state.text += state.detokenizer.push(token)
            new_logprobs = self._logprobs(state, update)
            if update.prompt_logprobs is not None:
                state.prompt_logprobs = self._prompt_logprobs(state, update.prompt_logprobs)
            if update.new_token_ids and state.first_token_time is None:
                state.first_token_time = now
            if (
                found is None
                and p.stop_strings
                and reason in (None, "length")
                and len(state.output_token_ids) >= p.min_tokens
            ):
                found = self._find_stop_string(state, before)
            if found is not None:
                if reason is None:
                    stopped.append((state.request_id, found))
                reason, stop_reason = "stop", found
            if state.samples is not None:
                self._sample_delta(state, update, reason, stop_reason, now, new_logprobs)
                touched[state.samples.request_id] = state.samples
            else:
                outputs.append(
                    self._make_output(state, update, reason, stop_reason, now, new_logprobs)
                )
            if reason is not None:
                del self.requests[state.request_id]
        for group in touched.values():
            outputs.extend(self._samples_outputs(group, now))
        return outputs, stopped

    def _sample_delta(
        self,
        state: RequestState,
        update: RequestUpdate,
        reason: str | None,
        stop_reason: int | str | None,
        now: float,
        new_logprobs: list[SampleLogprob],
    ) -> None:
        """One sample's news of this step (n > 1): its delta, and its whole completion once
        it has finished."""
        group = state.samples
        assert group is not None
        done = reason is not None
        hold = 0 if done else max((len(s) for s in state.params.stop_strings), default=1) - 1
        visible = max(state.reported_text_len, len(state.text) - hold)
        delta_text = state.text[state.reported_text_len : visible]
        state.reported_text_len = visible
        wants_lp = state.logprobs is not None
        if delta_text or update.new_token_ids or done:
            group.deltas.append(
                CompletionOutput(
                    index=state.index,
                    text=delta_text,
                    token_ids=list(update.new_token_ids),
                    finish_reason=reason,
                    stop_reason=stop_reason,
                    logprobs=new_logprobs if wants_lp else None,
                    cumulative_logprob=state.cumulative_logprob if wants_lp else None,
                )
            )
        if group.first_token_time is None and update.new_token_ids:
            group.first_token_time = now
        if group.first_scheduled_time is None:
            group.first_scheduled_time = update.first_scheduled_time
        group.num_cached_tokens = update.num_cached_tokens
        if update.error is not None and group.error is None:
            group.error = update.error
        if done:
            group.finals[state.index] = CompletionOutput(
                index=state.index,
                text=state.text,
                token_ids=list(state.output_token_ids),
                finish_reason=reason,
                stop_reason=stop_reason,
                logprobs=list(state.logprobs) if wants_lp else None,  # type: ignore[arg-type]
                cumulative_logprob=state.cumulative_logprob if wants_lp else None,
            )

    def _samples_outputs(self, group: Samples, now: float) -> list[RequestOutput]:
        """An n > 1 request's outputs for this step: the samples' deltas (not finished), then,
        once every sample has finished, all of them whole (finished)."""
        done = len(group.finals) == len(group.states)
        outputs = []

        def prompt_logprobs(finished: bool) -> PromptLogprobList | None:
            """Sample 0 computed the prompt: its prompt logprobs are the request's, handed over
            with the first output that can carry them and again with the finished one."""
            plp = group.states[0].prompt_logprobs
            if plp is None or (group.prompt_logprobs_sent and not finished):
                return None
            group.prompt_logprobs_sent = True
            return plp

        def output(completions: list[CompletionOutput], finished: bool) -> RequestOutput:
            return RequestOutput(
                request_id=group.request_id,
                prompt=group.prompt,
                prompt_token_ids=group.prompt_token_ids,
                outputs=completions,
                finished=finished,
                num_cached_tokens=group.num_cached_tokens,
                prompt_logprobs=prompt_logprobs(finished),
                metrics=RequestMetrics(
                    arrival_time=group.arrival_time,
                    first_scheduled_time=group.first_scheduled_time,
                    first_token_time=group.first_token_time,
                    finished_time=now if finished else None,
                ),
                error=group.error if finished else None,
            )

        if group.deltas:
            outputs.append(output(group.deltas, False))
            group.deltas = []
        if done:
            outputs.append(output([group.finals[i] for i in range(len(group.states))], True))
            del self.samples[group.request_id]
        return outputs

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

    @classmethod
    def _push_until_stop(cls, state: RequestState, update: RequestUpdate) -> str | None:
        """Append the update's tokens one at a time until the text holds a stop string; the
        tokens after it (and their logprobs) are cut from the update. Returns the stop string
        found, if any."""
        tokens = update.new_token_ids
        for i, token in enumerate(tokens):
            before = len(state.text)
            state.output_token_ids.append(token)
            state.text += state.detokenizer.push(token)
            if len(state.output_token_ids) >= state.params.min_tokens:
                found = cls._find_stop_string(state, before)
                if found is not None:
                    del tokens[i + 1 :]
                    del update.logprobs[i + 1 :]  # (empty unless the request asked)
                    return found
        return None

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
