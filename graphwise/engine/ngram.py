"""The n-gram (prompt lookup) proposer: draft tokens from a request's own tokens, on the host.

Text that repeats what came before (code being edited, a document being quoted, an answer
re-asked) continues the way it continued last time. For the request's tokens so far (prompt and
output) the proposer finds the most recent earlier occurrence of its last n tokens, for the
longest n in [prompt_lookup_min, prompt_lookup_max] that occurs, and proposes the (up to) k
tokens that followed it (preferring, among the longest matches, the most recent one that k
tokens follow: in a run like "a a a a" the latest match overlaps the suffix and has one). The target model verifies them in one forward; no model runs here.

Cost: numpy over the request's tokens, O(length) for the candidate scan plus O(matches * n) to
extend the matches, a few microseconds to tens of microseconds per request and step.
"""

from __future__ import annotations

import numpy as np


class TokenArray:
    """A request's tokens as a growing numpy array, extended by the tokens appended since the
    last call (converting the whole list every step would cost O(length) Python work)."""

    __slots__ = ("array", "size")

    def __init__(self) -> None:
        self.array = np.zeros(64, dtype=np.int64)
        self.size = 0

    def sync(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        if n < self.size:  # (never shrinks in practice; start over if it does)
            self.size = 0
        if n > self.array.size:
            grown = np.zeros(max(n, 2 * self.array.size), dtype=np.int64)
            grown[: self.size] = self.array[: self.size]
            self.array = grown
        if n > self.size:
            self.array[self.size : n] = tokens[self.size : n]
            self.size = n
        return self.array[:n]


def propose_ngram(tokens: np.ndarray | list[int], max_n: int, min_n: int, k: int) -> list[int]:
    """Up to `k` draft tokens continuing `tokens`, or [] when its last `min_n` tokens never
    occurred before."""
    if k <= 0:
        return []
    a = np.asarray(tokens, dtype=np.int64)
    length = a.size
    if length < min_n + 1:
        return []
    # Candidate ends: earlier positions holding the last token (the match's last token), with
    # at least one token after them to propose.
    ends = np.flatnonzero(a[: length - 1] == a[length - 1])
    if ends.size == 0:
        return []
    # How far back each candidate matches the suffix, up to max_n.
    matched = np.ones(ends.size, dtype=np.int64)
    for j in range(1, max_n):
        alive = (matched == j) & (ends >= j)
        if not alive.any():
            break
        idx = np.flatnonzero(alive)
        same = a[ends[idx] - j] == a[length - 1 - j]
        matched[idx[same]] += 1
    best = int(matched.max())
    if best < min_n:
        return []
    best_ends = ends[matched >= best]
    # The most recent of the longest matches, unless fewer than k tokens follow it (a match
    # overlapping the suffix, as in a run of one token): then the most recent that has k.
    full = best_ends[best_ends + k < length]
    end = int(full[-1] if full.size else best_ends[-1])
    return a[end + 1 : end + 1 + k].tolist()
