"""Where a constrained request's output stands relative to its reasoning, token by token.

A reasoning model writes `<think> ... </think>` before its answer; a structured-output
constraint is about the answer. `ReasoningPhase` follows one request's accepted tokens (the
scheduler feeds them through `RequestGrammar.accept`) and says, for the next token, whether the
grammar decides it:

- INSIDE: the reasoning is free. The matcher is not advanced and the row's mask allows every
  token (the same as no mask). The end marker's tokens, the last one included, are reasoning;
  once the output's last tokens are `end_token_ids` the phase is ANSWER.
- OPENING (`start="optional"`, Qwen3): the output may open with the start marker. Before its
  first token the mask is the grammar's plus the marker's first token; a sampled marker token
  (not fed to the matcher) makes the marker the output's beginning, and while it is begun the
  mask allows only its next token, so the output literally begins with the marker (what the
  server's text parser looks for). Any other first token is the answer's.
- ANSWER: the grammar decides every token.

The markers are token ids (data in `SamplingParams.reasoning`, made from the tokenizer by the
server): the end is recognised as the tokenizer's own encoding of `</think>`, one token or
several. A model that spells a multi-token marker with other tokens stays in the reasoning.
"""

from __future__ import annotations

from typing import Any

from graphwise.sampling_params import ReasoningSpec

INSIDE, OPENING, ANSWER = 0, 1, 2


class ReasoningPhase:
    __slots__ = ("end", "start", "state", "matched", "recent")

    def __init__(self, spec: ReasoningSpec) -> None:
        self.end = spec.end_token_ids
        self.start = spec.start_token_ids
        self.state = INSIDE if spec.start == "inside" else OPENING
        self.matched = 0  # OPENING: tokens of the start marker the output began with
        self.recent: list[int] = []  # INSIDE: the last len(end) tokens

    @property
    def follows_grammar(self) -> bool:
        """Whether the grammar's mask is the next token's (INSIDE: free; a begun start marker:
        forced)."""
        return self.state == ANSWER or (self.state == OPENING and self.matched == 0)

    def take(self, token: int) -> bool:
        """Advance by an accepted token; True when it belongs to the reasoning (its markers
        included), False when it is the answer's and the matcher must take it."""
        if self.state == ANSWER:
            return False
        if self.state == OPENING:
            if token == self.start[self.matched]:
                self.matched += 1
                if self.matched == len(self.start):
                    self.state = INSIDE
                return True
            # Not the marker: the answer begins (a begun marker is forced, so only at 0).
            self.state = ANSWER
            return False
        recent = self.recent
        recent.append(token)
        if len(recent) > len(self.end):
            del recent[0]
        if tuple(recent) == self.end:
            self.state = ANSWER
        return True

    def adjust_mask(self, row: Any) -> None:
        """The row's int32 bitmask words (numpy) for the next token, after the grammar's fill:
        OPENING adds the start marker's next token (alone once the marker has begun). INSIDE
        rows are not filled (all ones: no mask); ANSWER rows keep the grammar's."""
        if self.state != OPENING:
            return
        token = self.start[self.matched]
        if self.matched:
            row[:] = 0
        row[token >> 5] |= _bit(token & 31)


def _bit(j: int) -> int:
    """Bit j of an int32 word, as the signed value numpy stores (bit 31 is the sign)."""
    return (1 << j) - (1 << 32) if j == 31 else 1 << j


def adjust_masks(grammars: list[Any], mask: Any) -> None:
    """Apply each constrained row's reasoning phase to its filled mask row (rows of requests
    without a reasoning phase, or ended, are left as filled)."""
    for i, g in enumerate(grammars):
        phase = None if g is None else g.reasoning
        if phase is not None:
            phase.adjust_mask(mask[i])
