"""Structured output on the engine side: grammars compiled off the caller's thread, one matcher
per constrained request, and the per-row token bitmask of each step, filled on the host.

The grammar engine is xgrammar (docs/structured-output.md says why). It is imported the first
time a request asks for a constraint: an engine that serves none never loads it. What crosses
into the runner is data alone (`core.step.GrammarBitmask`: the rows and an int32 numpy array,
bit j of word i allows token 32 i + j), applied there with plain torch ops.

A request's constraint is parsed at `add_request` (a bad schema, regex or grammar is refused
there, naming the problem) and compiled against the tokenizer in a thread pool; compiled
grammars are cached by the constraint's key. The scheduler admits a constrained request once
its grammar is ready (`RequestGrammar.ready`). The scheduler advances each request's matcher
with its accepted tokens (`accept`); a matcher that reaches its end finishes the request.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from graphwise.engine.mask_fill import MaskFiller
from graphwise.engine.reasoning import adjust_masks
from graphwise.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept, least recently used dropped first


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ValueError(
            "structured output needs the xgrammar package (pip install xgrammar)"
        ) from exc
    return xgrammar


def _ebnf_literal(text: str) -> str:
    """A string literal of xgrammar's EBNF (C-style escapes, like JSON's)."""
    return json.dumps(text, ensure_ascii=False)


class RequestGrammar:
    """One request's constraint: its compiled grammar (a future until the compile ends) and,
    from its first step on, its matcher."""

    __slots__ = ("future", "key", "matcher", "stop_ids", "failed", "reasoning")

    def __init__(self, future: Future, key: tuple[str, str], stop_ids: list[int]) -> None:
        self.future = future
        self.key = key
        self.stop_ids = stop_ids
        self.matcher: Any = None
        self.failed: str | None = None
        # engine/reasoning.py ReasoningPhase when the output reasons first: the constraint
        # starts after the reasoning (tokens before are not the matcher's).
        self.reasoning: Any = None

    @property
    def ready(self) -> bool:
        """Compiled (or failed: then `failed` says why and the request fails at admission)."""
        if self.matcher is not None or self.failed is not None:
            return True
        if not self.future.done():
            return False
        try:
            compiled = self.future.result()
            self.matcher = _xgrammar().GrammarMatcher(compiled, override_stop_tokens=self.stop_ids)
        except Exception as exc:  # noqa: BLE001 - the request fails, the engine serves on
            self.failed = f"structured output grammar failed to compile: {exc}"
        return True

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar refuses it."""
        if self.reasoning is not None and self.reasoning.take(token):
            return True  # a reasoning token: not the constraint's
        return bool(self.matcher.accept_token(token))

    @property
    def follows_grammar(self) -> bool:
        """Whether the grammar masks the next token (not inside the reasoning)."""
        return self.reasoning is None or self.reasoning.follows_grammar

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


class StructuredOutputs:
    """The engine's grammar compiler: tokenizer info once, a compile pool, a cache by key."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_ids: frozenset[int],
        fill_threads: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self.num_compiled = 0
        self.compile_s: list[float] = []  # seconds each compile took (benchmarks report them)
        self.fill_s = 0.0  # host seconds spent filling masks, and how many steps
        self.num_fills = 0
        self.recent_fill_s: deque[float] = deque(maxlen=1024)  # the last fills' seconds
        # fill_threads: None sizes the pool from the CPUs (engine/mask_fill.py).
        self.filler = MaskFiller(self.words, fill_threads, pin_memory)

    @property
    def words(self) -> int:
        return (self.vocab_size + 31) // 32

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler

    def parse(self, params: StructuredOutputsParams) -> Any:
        """The constraint as an xgrammar `Grammar` (tokenizer-free, cheap); a ValueError naming
        the problem if it is not a valid schema, regex or grammar."""
        xgr = _xgrammar()
        kind = params.kind
        try:
            if kind == "json":
                schema = params.json
                if params.disable_additional_properties and isinstance(schema, dict):
                    schema = _no_additional_properties(schema)
                return xgr.Grammar.from_json_schema(
                    json.dumps(schema),
                    any_whitespace=not params.disable_any_whitespace,
                    strict_mode=True,
                )
            if kind == "json_object":
                if params.disable_any_whitespace:
                    return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
                return xgr.Grammar.builtin_json_grammar()
            if kind == "regex":
                return xgr.Grammar.from_regex(params.regex)
            if kind == "choice":
                alternatives = " | ".join(_ebnf_literal(c) for c in params.choice or ())
                return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
            assert kind == "grammar"
            return xgr.Grammar.from_ebnf(params.grammar)
        except Exception as exc:  # xgrammar raises RuntimeError with its parser's message
            what = {"json": "JSON schema", "json_object": "JSON grammar"}.get(kind, kind)
            raise ValueError(f"invalid {what} in structured_outputs.{kind}: {_clean(exc)}") from exc

    def request_grammar(self, params: StructuredOutputsParams) -> RequestGrammar:
        """Parse now (errors are the caller's), compile in the pool (cached by key)."""
        if self.tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer")
        key = params.key
        with self._lock:
            future = self._cache.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                self._cache.move_to_end(key)
                return RequestGrammar(future, key, self.stop_ids)
        grammar = self.parse(params)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(2, thread_name_prefix="graphwise-grammar")
            future = self._pool.submit(self._compile, grammar)
            self._cache[key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return RequestGrammar(future, key, self.stop_ids)

    def _compile(self, grammar: Any) -> Any:
        compiler = self._get_compiler()
        start = time.perf_counter()
        compiled = compiler.compile_grammar(grammar)
        self.compile_s.append(time.perf_counter() - start)
        self.num_compiled += 1
        return compiled

    def fill(self, grammars: list[RequestGrammar | None]) -> Any:
        """The [len(grammars), words] int32 bitmask (a CPU tensor, pinned on CUDA engines) of
        the next token of each row: its matcher's allowed tokens, or every token for a row
        whose request has ended (its token will be dropped) or whose matcher allows none (it
        cannot be sampled from nothing). Rows in parallel: engine/mask_fill.py."""
        start = time.perf_counter()
        # Rows inside their reasoning follow no grammar yet: filled as unconstrained (all ones).
        mask = self.filler.fill(
            [g.matcher if g is not None and g.follows_grammar else None for g in grammars]
        )
        if any(g is not None and g.reasoning is not None for g in grammars):
            arr = mask.numpy()
            adjust_masks(grammars, arr)  # rows that reason first (engine/reasoning.py)
            empty = ~arr.any(axis=1)
            if empty.any():
                arr[empty] = -1
        took = time.perf_counter() - start
        self.fill_s += took
        self.num_fills += 1
        self.recent_fill_s.append(took)
        return mask

    def shutdown(self) -> None:
        self.filler.shutdown()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _no_additional_properties(schema: Any) -> Any:
    """A copy of the schema where every object without `additionalProperties` forbids them."""
    if isinstance(schema, dict):
        out = {k: _no_additional_properties(v) for k, v in schema.items()}
        if out.get("type") == "object" and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_no_additional_properties(v) for v in schema]
    return schema


def _clean(exc: Exception) -> str:
    """xgrammar's message without its time stamp, C++ source location and check text."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    text = re.sub(r"^\S+\.(?:cc|h|cpp):\d+:\s*", "", text)
    text = re.sub(r"^Check failed: \(.*?\) is false:\s*", "", text)
    return text.strip()


def check_constraint(params: StructuredOutputsParams) -> None:
    """Parse the constraint without a tokenizer (what `add_request` does first): a ValueError
    naming the problem if it is not a valid schema, regex or grammar. The server calls it to
    answer a 400 naming the request field the constraint came from."""
    StructuredOutputs(None, 32, frozenset()).parse(params)
