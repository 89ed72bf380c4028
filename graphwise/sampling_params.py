"""SamplingParams: how one request is decoded (vLLM's names and defaults)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

# Temperatures below this decode greedily (vLLM's threshold): logits / T overflows float32 as T
# nears 0 (1e-40 did), and this cold a distribution differs from argmax only between near-ties.
GREEDY_TEMPERATURE = 1e-5


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """One constraint on a request's output (vLLM's `StructuredOutputsParams`): exactly one of
    a JSON schema (`json`, a dict or its JSON text), a `regex`, a `choice` of strings, an EBNF
    `grammar` (xgrammar's GBNF dialect), or `json_object` (any JSON object). The output is
    masked token by token to stay inside it, and the request finishes when it is complete."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # JSON only: no free whitespace between tokens (a model cannot loop on blanks).
    disable_any_whitespace: bool = False
    # Accepted for vLLM compatibility; xgrammar's backend is the only one.
    disable_fallback: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                f"json_object; got {given or 'none'}"
            )
        if self.structural_tag is not None:
            raise ValueError("structured_outputs.structural_tag is not supported")
        if self.whitespace_pattern is not None:
            raise ValueError(
                "structured_outputs.whitespace_pattern is not supported (xgrammar's backend "
                "has none; use disable_any_whitespace)"
            )
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from exc
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object)")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError("structured_outputs.regex must be a non-empty string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise ValueError("structured_outputs.grammar must be a non-empty string")
        if self.choice is not None and (
            not isinstance(self.choice, (list, tuple))
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError(
                "structured_outputs.choice must be a non-empty list of non-empty strings"
            )
        if self.choice is not None:
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar (compiled grammars are cached by it)."""
        kind = self.kind
        if kind == "json":
            spec = json.dumps(self.json, sort_keys=True)
        elif kind == "choice":
            spec = json.dumps(self.choice)
        elif kind == "json_object":
            spec = ""
        else:
            spec = getattr(self, kind)
        if kind in ("json", "json_object"):
            spec += f"|ws={not self.disable_any_whitespace}"
            spec += f"|noextra={self.disable_additional_properties}"
        return kind, spec


@dataclass
class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's older name (`SamplingParams(guided_decoding=...)`), with its `backend` field
    (accepted; xgrammar is the only backend here)."""

    backend: str | None = None


REASONING_STARTS = ("inside", "optional")


@dataclass(frozen=True)
class ReasoningSpec:
    """How a request's output reasons before it answers, for its structured-output constraint,
    which applies to the answer alone: no mask and no grammar step while the output is inside
    the reasoning. Made by the server's `--reasoning-parser` from the tokenizer and the prompt
    (`server/reasoning.py`); offline, by hand or with the same parser.

    `end_token_ids`: the tokenizer's encoding of the end marker (`</think>`: one token or
    several); the reasoning ends once the output's last tokens are these. `start`: "inside"
    (the output begins inside the reasoning: DeepSeek-R1, or a template that opened it) or
    "optional" (Qwen3: the output reasons only if its first tokens are `start_token_ids`; its
    first token may be the marker's first or one the constraint allows, and a begun marker is
    completed)."""

    end_token_ids: tuple[int, ...]
    start_token_ids: tuple[int, ...] = ()
    start: str = "inside"

    def __post_init__(self) -> None:
        for name in ("end_token_ids", "start_token_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise ValueError(f"reasoning.{name} must be a list of token ids")
            object.__setattr__(self, name, tuple(ids))
        if not self.end_token_ids:
            raise ValueError("reasoning.end_token_ids must not be empty")
        if self.start not in REASONING_STARTS:
            raise ValueError(
                f"reasoning.start must be one of {REASONING_STARTS}, got {self.start!r}"
            )
        if self.start == "optional" and not self.start_token_ids:
            raise ValueError("reasoning.start 'optional' needs start_token_ids")


@dataclass
class SamplingParams:
    # Completions sampled from the prompt (vLLM's `n`): its KV is computed once and shared
    # copy-on-write; child i samples with `seed + i` when a seed is given.
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    # Log-probabilities of each sampled token and of the `logprobs` most likely ones (0: the
    # sampled token's alone), log-softmax of the model's raw logits (vLLM's default).
    logprobs: int | None = None
    # Log-probabilities of the prompt's tokens (each given the tokens before it; the first has
    # none) and of the `prompt_logprobs` most likely tokens at each prompt position.
    prompt_logprobs: int | None = None
    # Penalties (vLLM's semantics): presence and frequency over the generated tokens (OpenAI's),
    # repetition over prompt and generated tokens (HF's: divide a positive logit, multiply a
    # negative one). Filters: min_p (drop tokens under min_p x the top probability),
    # logit_bias (token id -> added to its logit, clamped to [-100, 100]), allowed_token_ids.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    # Words never generated (each as tokenized alone and after a space, vLLM's rule), and
    # whether a stop string that ended the output stays in its text.
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    # A constraint on the output (JSON schema, regex, choice, grammar, JSON object); vLLM's
    # older `guided_decoding` is the same thing under another name.
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None
    # The output reasons before it answers (ReasoningSpec): the constraint starts after the
    # reasoning's end marker. Without structured_outputs it changes nothing.
    reasoning: ReasoningSpec | None = None
    # Normalised forms, filled by __post_init__.
    stop_strings: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self._validate()
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("give structured_outputs or guided_decoding, not both")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            if not isinstance(self.structured_outputs, dict):
                raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.reasoning is not None and not isinstance(self.reasoning, ReasoningSpec):
            if not isinstance(self.reasoning, dict):
                raise ValueError("reasoning must be a ReasoningSpec or a dict")
            self.reasoning = ReasoningSpec(**self.reasoning)
        if isinstance(self.stop, str):
            self.stop_strings = [self.stop] if self.stop else []
        else:
            self.stop_strings = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])

    def _validate(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            return value

        if integer("n") < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        temperature = number("temperature")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        top_p = number("top_p")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        top_k = integer("top_k")
        if top_k == 0 or top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if self.max_tokens is not None and integer("max_tokens") < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if integer("min_tokens") < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        if self.seed is not None:
            integer("seed")
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if isinstance(self.stop, (list, tuple)) and not all(isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a string or a list of strings")
        if self.stop_token_ids is not None:
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
                raise ValueError("stop_token_ids must be a list of integers")
        if self.logprobs is not None and integer("logprobs") < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if self.prompt_logprobs is not None and integer("prompt_logprobs") < 0:
            raise ValueError(f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = number(name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        repetition = number("repetition_penalty")
        if not (math.isfinite(repetition) and repetition > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {repetition}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                isinstance(k, int) and not isinstance(k, bool) for k in self.logit_bias
            ):
                raise ValueError("logit_bias must map token ids (integers) to numbers")
            for value in self.logit_bias.values():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"logit_bias values must be numbers, got {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"logit_bias values must be finite, got {value!r}")
        if self.allowed_token_ids is not None and (
            not isinstance(self.allowed_token_ids, list)
            or not self.allowed_token_ids
            or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.allowed_token_ids
            )
        ):
            raise ValueError("allowed_token_ids must be a non-empty list of integers")
        if self.bad_words is not None and (
            not isinstance(self.bad_words, list)
            or not all(isinstance(w, str) and w for w in self.bad_words)
        ):
            raise ValueError("bad_words must be a list of non-empty strings")

    def for_sample(self, index: int) -> SamplingParams:
        """The parameters of sample `index` of an n > 1 request: n = 1, and seed + index when
        seeded (vLLM V1's rule), so each sample equals a lone request with that seed; prompt
        logprobs are sample 0's to compute."""
        seed = None if self.seed is None else self.seed + index
        # The prompt is scored once, by sample 0 (the others fork from its computed prompt).
        prompt_logprobs = self.prompt_logprobs if index == 0 else None
        return dataclasses.replace(self, n=1, seed=seed, prompt_logprobs=prompt_logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        """Any penalty that needs the tokens so far."""
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )
