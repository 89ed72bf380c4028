"""Prompt limits that need no tokenizing, and tokenizer threads that keep prompts off the loop.

A text prompt far too long for the context used to be tokenized in full before being refused:
20 MB took ~10 s of a tokenizer thread (queueing every other request behind it) and left >1 GB
in the allocator's arenas. Now a text is refused first if it *cannot* fit: no token stands for
more than `bytes_per_token` bytes of input, so a text of B bytes is at least B / bytes_per_token
tokens under this tokenizer, whatever it is. The same figure bounds the request body, so the
JSON parse on the event loop is bounded too. What is tokenized runs in worker threads, on a
short lane and a long lane, so a long prompt never delays a short one.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from graphwise.server.protocol import APIError

logger = logging.getLogger(__name__)
T = TypeVar("T")

# One byte of UTF-8 text takes at most 6 bytes of JSON ("\u0001"; two-byte characters take
# 6 for 2, astral ones 12 for 4).
JSON_BYTES_PER_TEXT_BYTE = 6
BODY_SLACK_BYTES = 64 * 1024  # the request's other fields: sampling options, stop strings
MIN_BODY_BYTES_PER_TOKEN = 32  # a token id in JSON, with room for pretty-printing
# Unicode normalization and case mapping can shrink text: one character of up to 4 bytes may
# become 1 ('𝐀' -> 'A' under NFKC, the Kelvin sign -> 'k'), and composition merges several
# characters into one that is never shorter than a quarter of them ('ᄀ'+'ᅡ'+'ᆨ' -> '각').
UNICODE_SHRINK = 4


@dataclass(frozen=True)
class TokenBound:
    """A lower bound on a text's token count, computed without tokenizing it."""

    bytes_per_token: int  # no token stands for more bytes of (un-normalized) input than this
    # Byte values the tokenizer silently drops (no token in its vocabulary), counted in the raw
    # text: no normalizer we accept maps other text into them (C0 controls, unassigned planes).
    dropped: bytes = b""
    why: str = ""

    def min_tokens(self, text: str) -> int:
        data = text.encode("utf-8", "surrogatepass")
        kept = len(data.translate(None, self.dropped)) if self.dropped else len(data)
        return math.ceil(kept / self.bytes_per_token)


def token_bound(tokenizer: Any) -> tuple[TokenBound | None, str]:
    """The bound for a HF fast tokenizer, or None and why there is none.

    The bound is the longest token in bytes: the vocabulary's longest entry and the longest
    added (special) token, times what normalization can shrink. It holds when every byte of
    input ends up inside some token: true of byte-level BPE (every byte is in its alphabet;
    the few byte values a vocabulary lacks are dropped, and are not counted), and of
    SentencePiece-style BPE and Unigram with byte fallback. It fails where text can vanish or
    fuse: WordPiece (a long word becomes one [UNK]), fused unknowns, normalizers that strip,
    pre-tokenizers that remove whitespace, added tokens that swallow the whitespace beside
    them. Those get no bound: the body limit and the tokenizer threads still apply.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, "not a fast (Rust) tokenizer"
    try:
        spec = json.loads(backend.to_str())
        return _bound_from_spec(spec)
    except (ValueError, KeyError, TypeError) as exc:  # a layout we do not know: no claim
        return None, f"tokenizer layout not understood ({type(exc).__name__}: {exc})"


def _bound_from_spec(spec: dict[str, Any]) -> tuple[TokenBound | None, str]:
    model = spec["model"]
    kind = model.get("type")
    shrink, why_not = _normalizer_shrink(spec.get("normalizer"))
    if shrink is None:
        return None, f"the normalizer {why_not}"
    if (bad := _pre_tokenizer_drops(spec.get("pre_tokenizer"))) is not None:
        return None, f"the pre-tokenizer {bad} drops text"
    added = spec.get("added_tokens") or []
    if any(a.get("lstrip") or a.get("rstrip") for a in added):
        return None, "an added token swallows the whitespace beside it (lstrip/rstrip)"
    byte_level = _has_type(spec.get("pre_tokenizer"), "ByteLevel") or _has_type(
        spec.get("normalizer"), "ByteLevel"
    )
    if kind == "BPE":
        vocab: Iterable[str] = model["vocab"].keys()
    elif kind == "Unigram":
        vocab = (piece for piece, _score in model["vocab"])
        if not model.get("byte_fallback"):
            return None, "Unigram without byte fallback fuses unknown characters"
    else:
        return None, f"a {kind} model can turn any length of text into one unknown token"
    vocab = list(vocab)
    known = set(vocab)
    dropped = b""
    unknown_bytes = 0  # input bytes one unknown-token can stand for
    if byte_level:
        # Each character of a byte-level token stands for exactly one byte.
        longest = max(len(t) for t in vocab)
        missing = bytes(b for b, ch in enumerate(_byte_level_alphabet()) if ch not in known)
        if missing and model.get("unk_token") is not None:
            if model.get("fuse_unk"):
                return None, "runs of bytes missing from the vocabulary fuse into one token"
            unknown_bytes = 1
        else:
            dropped = missing  # BPE without an unknown token drops what it cannot spell
    else:
        # UTF-8 length of the token's text: at least the input it stands for ('▁' is 3 bytes
        # for a 1-byte space, '<0x0A>' 6 for 1 byte).
        longest = max(len(t.encode("utf-8", "surrogatepass")) for t in vocab)
        if model.get("byte_fallback"):
            if not all(f"<0x{b:02X}>" in known for b in range(256)):
                return None, "byte fallback without all 256 byte tokens"
        elif model.get("unk_token") is None:
            return None, "characters missing from the vocabulary are dropped"
        elif model.get("fuse_unk"):
            return None, "runs of unknown characters fuse into one token"
        else:
            unknown_bytes = 4  # one unknown character
    longest_added = max((len(a["content"].encode("utf-8")) for a in added), default=0)
    per_token = max(longest, longest_added, unknown_bytes, 1) * shrink
    how = "byte-level BPE" if byte_level else f"{kind}"
    why = f"{how}: no token stands for more than {per_token} bytes of text"
    if shrink > 1:
        why += f" (x{shrink} for the normalizer)"
    return TokenBound(per_token, dropped, why), why


def _byte_level_alphabet() -> list[str]:
    """The character byte-level BPE writes for each byte value, indexed by the byte.

    GPT-2's table: printable Latin-1 bytes stand for themselves, the other 68 (controls,
    space, DEL, NBSP, soft hyphen) for the characters from U+0100 on, in byte order.
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(0x100 + shifted))
            shifted += 1
    return table


def _has_type(component: dict[str, Any] | None, kind: str) -> bool:
    if not component:
        return False
    if component.get("type") == kind:
        return True
    parts = component.get("pretokenizers") or component.get("normalizers") or []
    return any(_has_type(p, kind) for p in parts)


def _normalizer_shrink(norm: dict[str, Any] | None) -> tuple[int | None, str]:
    """How many bytes of input one byte of normalized text may come from (None: unbounded)."""
    if not norm:
        return 1, ""
    kind = norm.get("type")
    if kind == "Sequence":
        total = 1
        for part in norm.get("normalizers") or []:
            factor, why = _normalizer_shrink(part)
            if factor is None:
                return None, why
            total *= factor
        return total, ""
    if kind in ("Prepend", "Append", "ByteLevel"):
        return 1, ""  # only adds
    if kind in ("NFC", "NFD", "NFKC", "NFKD", "Lowercase"):
        return UNICODE_SHRINK, ""
    if kind == "Replace":
        pattern = (norm.get("pattern") or {}).get("String")
        if pattern is None:
            return None, "replaces a regex"
        src, dst = len(pattern.encode("utf-8")), len(str(norm.get("content", "")).encode("utf-8"))
        if dst == 0:
            return None, f"deletes {pattern!r}"
        return max(1, math.ceil(src / dst)), ""
    return None, f"{kind} can delete text"


_DROPPING_PRE_TOKENIZERS = {
    "Whitespace",
    "WhitespaceSplit",
    "BertPreTokenizer",
    "CharDelimiterSplit",
}
_KEEPING_PRE_TOKENIZERS = {
    "ByteLevel",
    "Metaspace",
    "Digits",
    "UnicodeScripts",
    "Split",
    "Punctuation",
}


def _pre_tokenizer_drops(pre: dict[str, Any] | None) -> str | None:
    """The name of a pre-tokenizer step that can remove text, or None."""
    if not pre:
        return None
    kind = pre.get("type")
    if kind == "Sequence":
        for part in pre.get("pretokenizers") or []:
            if (bad := _pre_tokenizer_drops(part)) is not None:
                return bad
        return None
    if kind in _DROPPING_PRE_TOKENIZERS or kind not in _KEEPING_PRE_TOKENIZERS:
        return str(kind)
    if pre.get("behavior") == "Removed":
        return f"{kind}(behavior=Removed)"
    return None


@dataclass(frozen=True)
class PromptLimits:
    """What a request may be, from the context length and the tokenizer, before tokenizing."""

    max_model_len: int
    bound: TokenBound | None  # None: text prompts of unknown density (or none at all)
    text_prompts: bool = True  # False: the model has no tokenizer, only token ids are taken

    def body_limit(self, configured: int, contexts: int = 1) -> int:
        """The most request-body bytes that `contexts` prompts filling the context can need
        (their text at the most bytes per token, JSON-escaped, plus the other fields), within
        `configured`. Text the tokenizer would drop, or a chat template trim, counts against it
        too. Ordinary text takes ~100 times fewer bytes per token than this bound allows, so
        a batch of many prompts fits in a few contexts' worth."""
        if self.text_prompts and self.bound is None:
            return configured
        per_token = MIN_BODY_BYTES_PER_TOKEN
        if self.bound is not None:
            per_token = max(per_token, JSON_BYTES_PER_TEXT_BYTE * self.bound.bytes_per_token)
        return min(configured, contexts * self.max_model_len * per_token + BODY_SLACK_BYTES)

    def check_text(self, text: str, param: str) -> None:
        """Refuses (400) a text certain to leave no room for output, without tokenizing it."""
        bound = self.bound
        if bound is None:
            return
        # Cheap first: a character is at most 4 bytes, so a short text cannot be refused.
        if math.ceil(4 * len(text) / bound.bytes_per_token) < self.max_model_len:
            return
        at_least = bound.min_tokens(text)
        if at_least >= self.max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens, and the "
                f"prompt is at least {at_least} tokens ({len(text)} characters; with this "
                f"tokenizer no token stands for more than {bound.bytes_per_token} bytes)",
                param=param,
                code="context_length_exceeded",
            )


def private_copy(tokenizer: Any) -> Any:
    """A tokenizer for one thread alone (HF fast tokenizers are not safe to share)."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # then only this lane and the engine thread share it
        logger.warning("could not copy the tokenizer; a tokenizer thread shares the engine's")
        return tokenizer


class TokenizerLanes:
    """Tokenization and chat templates on worker threads, in two lanes by input size.

    Each lane is one thread with its own copy of the tokenizer. Inputs up to `short_chars`
    characters take the short lane, the rest the long one, so a long prompt (bounded by the
    body limit, but still up to seconds of work on a large context) never queues a short one.
    HF fast tokenizers release the GIL while encoding, so the event loop runs meanwhile.
    """

    def __init__(self, tokenizer: Any, short_chars: int = 32 * 1024) -> None:
        self.short_chars = short_chars
        self._lanes = {
            name: (
                ThreadPoolExecutor(1, thread_name_prefix=f"graphwise-tokenize-{name}"),
                private_copy(tokenizer),
            )
            for name in ("short", "long")
        }

    def lane_for(self, size: int) -> str:
        return "short" if size <= self.short_chars else "long"

    async def run(self, fn: Callable[[Any], T], size: int) -> T:
        """fn(tokenizer) on the lane for an input of `size` characters."""
        pool, tokenizer = self._lanes[self.lane_for(size)]
        return await asyncio.get_running_loop().run_in_executor(pool, fn, tokenizer)

    def shutdown(self) -> None:
        for pool, _ in self._lanes.values():
            pool.shutdown(wait=False, cancel_futures=True)
