"""What a request's parameters do to its logits before sampling, batched on the device.

In vLLM's order: `allowed_token_ids` (everything else masked), the `min_tokens` ban of stop and
EOS ids, `logit_bias` (added, clamped to [-100, 100]), then the penalties: repetition over the
prompt and the generated tokens (HF's rule), presence and frequency over the generated ones
(OpenAI's). Rows that ask for nothing cost nothing; none of it syncs with the host, so it runs
inside an async step.

The penalties need every token so far, and with async scheduling the newest is known only on
the device. `TokenHistory` therefore keeps, for each request with a penalty, its tokens by
position in a device buffer, written from each step's input ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from graphwise.core.step import ScheduledRow
    from graphwise.runner.inputs import RequestStates, StepInputs

Upload = Callable[..., list[torch.Tensor]]
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for logit_bias values


class TokenHistory:
    """Tokens by position of the requests that need them, in a [slots, max_len] int32 device
    buffer that is allocated on first use and grows by doubling its slots."""

    def __init__(self, device: torch.device, first_slots: int = 16) -> None:
        self.device = device
        self.first_slots = first_slots
        self.max_len = 0
        self.buffer: torch.Tensor | None = None
        self.slots: dict[str, int] = {}
        self._free: list[int] = []

    def set_max_len(self, max_len: int) -> None:
        self.max_len = max_len

    def forget(self, request_id: str) -> None:
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)

    def _slot(self, request_id: str) -> int:
        slot = self.slots.get(request_id)
        if slot is not None:
            return slot
        if not self._free:
            self._grow()
        slot = self.slots[request_id] = self._free.pop()
        return slot

    def _grow(self) -> None:
        if not self.max_len:
            raise RuntimeError("TokenHistory used before the runner knew max_model_len")
        old = 0 if self.buffer is None else self.buffer.shape[0]
        new = max(self.first_slots, 2 * old)
        buffer = torch.zeros((new, self.max_len), dtype=torch.int32, device=self.device)
        if self.buffer is not None:
            buffer[:old] = self.buffer
        self.buffer = buffer
        self._free.extend(range(new - 1, old - 1, -1))

    def record(
        self, rows: list[ScheduledRow], input_ids: torch.Tensor, states: RequestStates,
        upload: Upload,
    ) -> None:  # fmt: skip
        """Write this step's input ids of every tracked request at their positions. A forked
        sample (n > 1) starts from a copy of its prompt's history."""
        slots: list[int] = []
        positions: list[int] = []
        sources: list[int] = []
        forks: list[tuple[int, int]] = []
        at = 0
        for row in rows:
            n = row.num_new_tokens
            if states[row.request_id].needs_history:
                slot = self._slot(row.request_id)
                if row.fork_of is not None:
                    forks.append((self._slot(row.fork_of), slot))
                c = row.num_computed_tokens
                slots.extend([slot] * n)
                positions.extend(range(c, c + n))
                sources.extend(range(at, at + n))
            at += n
        if slots:
            assert self.buffer is not None
            slot_t, pos_t, src_t = upload(torch.int64, slots, positions, sources)
            values = input_ids.index_select(0, src_t).to(torch.int32)
            self.buffer.index_put_((slot_t, pos_t), values)
        if forks:
            assert self.buffer is not None
            src, dst = upload(torch.int64, [s for s, _ in forks], [d for _, d in forks])
            self.buffer.index_copy_(0, dst, self.buffer.index_select(0, src))

    def counts(
        self,
        request_ids: list[str],
        lengths: list[int],
        prompt_lengths: list[int],
        vocab: int,
        upload: Upload,
    ) -> torch.Tensor:
        """[R, > vocab] int32 counts of each request's tokens so far, packed in one tensor
        (the kernels read one value per token, not two): bit 0 set where the token occurs at
        all, the other bits twice how often it was generated (positions from its prompt
        length on). Columns from `vocab` on are spare (column `vocab` takes the padding)."""
        assert self.buffer is not None
        width = max(lengths)
        slot_t, len_t, prompt_t = upload(
            torch.int64, [self.slots[r] for r in request_ids], lengths, prompt_lengths
        )
        # Only the first `width` positions of each slot's row (not max_model_len of them).
        tokens = self.buffer[:, :width].index_select(0, slot_t).long()
        pos = torch.arange(width, device=self.device)
        seen = pos[None, :] < len_t[:, None]
        generated = seen & (pos[None, :] >= prompt_t[:, None])
        # Rows padded to 16 ints (64 bytes): aligned rows let the kernel use wide loads.
        columns = (vocab + 1 + 15) // 16 * 16
        counts = torch.zeros((len(request_ids), columns), dtype=torch.int32, device=self.device)
        pad = torch.full_like(tokens, vocab)  # the spare column takes what is not counted
        # Every occurrence sets bit 0 (a set, not an add: a prompt's repeats do not carry into
        # the generated count), then each generated one adds 2.
        counts.scatter_(1, torch.where(seen, tokens, pad), 1)
        counts.scatter_add_(1, torch.where(generated, tokens, pad), generated.int() * 2)
        return counts


def apply_grammar_bitmask(
    logits: torch.Tensor,
    rows: list[int],
    bitmask,
    upload: Upload,  # bitmask: an int32 CPU tensor or np.ndarray
) -> None:
    """Mask to -inf the tokens a structured-output constraint forbids, in place on the
    [N, V] logits: `rows` of them, by their int32 words (bit j of word i: token 32 i + j).
    Applied after the logits (outside any CUDA graph), before every other processor."""
    vocab = logits.shape[-1]
    (row_t,) = upload(torch.int64, rows)
    if isinstance(bitmask, torch.Tensor):
        # The engine's mask (engine/mask_fill.py): on a CUDA engine it was filled in pinned
        # memory, so this is its one copy, asynchronous (torch's host allocator recycles the
        # block only after the copy has run); from pageable memory the copy waits for itself.
        words = bitmask.to(logits.device, non_blocking=logits.device.type == "cuda")
    else:
        (words,) = upload(torch.int32, bitmask)
    words = words.view(len(rows), -1)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = ((words[:, :, None] >> shifts) & 1).view(len(rows), -1)
    width = bits.shape[1]
    if width < vocab:  # ids past the mask: never allowed
        bits = torch.nn.functional.pad(bits, (0, vocab - width))
    allowed = bits[:, :vocab].bool()
    sub = logits.index_select(0, row_t)
    sub.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, row_t, sub)


def apply_logits_processors(
    logits: torch.Tensor,
    inputs: StepInputs,
    states: RequestStates,
    history: TokenHistory,
    upload: Upload,
    vocab_limit: int | None,
    use_triton: bool = False,
) -> None:
    """In place on [N, V] float32 logits of the step's sampled rows (`use_triton`: the
    penalties in one Triton pass, kernels/sampling.py, instead of torch's many)."""
    vocab = logits.shape[-1]
    if vocab_limit is not None:  # ids past the tokenizer's vocabulary cannot be decoded
        logits[:, vocab_limit:] = float("-inf")
    if not states.num_special:  # the common step: at most the min_tokens ban
        if any(row.ban_stop_tokens for row in inputs.sampled):
            banned = [
                (i, states[row.request_id].banned)
                for i, row in enumerate(inputs.sampled)
                if row.ban_stop_tokens and states[row.request_id].banned
            ]
            _set(logits, banned, float("-inf"), upload)
        return
    rows = [(i, states[row.request_id], row) for i, row in enumerate(inputs.sampled)]
    _mask_to_allowed(logits, [(i, s.params.allowed_token_ids) for i, s, _ in rows], upload)
    _ban_bad_words(logits, [(i, s, row) for i, s, row in rows if s.bad_words], history, upload)
    banned = [(i, s.banned) for i, s, row in rows if row.ban_stop_tokens and s.banned]
    _set(logits, banned, float("-inf"), upload)
    _add_bias(logits, [(i, s.params.logit_bias) for i, s, _ in rows], upload)
    penalized = [(i, s, row) for i, s, row in rows if s.params.penalized]
    if penalized:
        _penalize(logits, penalized, history, upload, vocab, use_triton)


def _mask_to_allowed(
    logits: torch.Tensor, allowed: list[tuple[int, list[int] | None]], upload: Upload
) -> None:
    allowed = [(i, ids) for i, ids in allowed if ids]
    if not allowed:
        return
    rows = [i for i, ids in allowed for _ in ids]
    cols = [t for _, ids in allowed for t in ids]
    row_t, col_t, which = upload(torch.int64, rows, cols, [i for i, _ in allowed])
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep.index_put_((row_t, col_t), torch.ones_like(row_t, dtype=torch.bool))
    drop = ~keep
    restricted = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    restricted[which] = True
    logits.masked_fill_(drop & restricted[:, None], float("-inf"))


def _ban_bad_words(logits: torch.Tensor, rows: list, history: TokenHistory, upload: Upload) -> None:
    """A one-token bad word is always banned; a longer one's last token when the tokens so far
    end with the rest of it (checked on the device: the newest token may not be on the host)."""
    singles = [(i, tuple(w[0] for w in s.bad_words if len(w) == 1)) for i, s, _ in rows]
    _set(logits, [(i, ids) for i, ids in singles if ids], float("-inf"), upload)
    pairs = [(i, row, w) for i, s, row in rows for w in s.bad_words if len(w) > 1]
    if not pairs:
        return
    assert history.buffer is not None
    width = max(len(w) for _, _, w in pairs) - 1  # prefix lengths, padded to the longest
    slots, starts, prefixes, used, rows_i, lasts, fits = [], [], [], [], [], [], []
    for i, row, w in pairs:
        m = len(w) - 1
        slots.append(history.slots[row.request_id])
        starts.append(max(0, row.num_tokens_after - m))
        fits.append(int(row.num_tokens_after >= m))  # enough tokens so far to end with it
        prefixes.extend([*w[:-1], *([0] * (width - m))])
        used.extend([1] * m + [0] * (width - m))
        rows_i.append(i)
        lasts.append(w[-1])
    slot_t, start_t, prefix_t, used_t, row_t, last_t, fits_t = upload(
        torch.int64, slots, starts, prefixes, used, rows_i, lasts, fits
    )
    offsets = torch.arange(width, device=logits.device)
    cols = (start_t[:, None] + offsets[None, :]).clamp(max=history.buffer.shape[1] - 1)
    tails = history.buffer[slot_t[:, None], cols].long()
    prefix_t, used_t = prefix_t.view(len(pairs), width), used_t.view(len(pairs), width) > 0
    match = ((tails == prefix_t) | ~used_t).all(dim=1) & (fits_t > 0)
    penalty = torch.where(match, float("-inf"), 0.0).to(logits.dtype)
    logits.index_put_((row_t, last_t), penalty, accumulate=True)


def _set(
    logits: torch.Tensor, per_row: list[tuple[int, tuple[int, ...]]], value: float, upload: Upload
) -> None:
    if not per_row:
        return
    rows = [i for i, ids in per_row for _ in ids]
    cols = [t for _, ids in per_row for t in ids]
    row_t, col_t = upload(torch.int64, rows, cols)
    logits.index_put_((row_t, col_t), logits.new_full((len(rows),), value))


def _add_bias(
    logits: torch.Tensor, biases: list[tuple[int, dict[int, float] | None]], upload: Upload
) -> None:
    biases = [(i, b) for i, b in biases if b]
    if not biases:
        return
    rows = [i for i, b in biases for _ in b]
    cols = [t for _, b in biases for t in b]
    lim = LOGIT_BIAS_LIMIT
    values = [max(-lim, min(lim, float(v))) for _, b in biases for v in b.values()]
    row_t, col_t = upload(torch.int64, rows, cols)
    (val_t,) = upload(torch.float32, values)
    logits.index_put_((row_t, col_t), val_t, accumulate=True)


def _penalize(
    logits: torch.Tensor,
    penalized: list,
    history: TokenHistory,
    upload: Upload,
    vocab: int,
    use_triton: bool,
) -> None:
    counts = history.counts(
        [row.request_id for _, _, row in penalized],
        [row.num_tokens_after for _, _, row in penalized],
        [s.num_prompt_tokens for _, s, _ in penalized],
        vocab,
        upload,
    )
    (idx_t,) = upload(torch.int64, [i for i, _, _ in penalized])
    rep, pres, freq = upload(
        torch.float32,
        [s.params.repetition_penalty for _, s, _ in penalized],
        [s.params.presence_penalty for _, s, _ in penalized],
        [s.params.frequency_penalty for _, s, _ in penalized],
    )
    if use_triton:  # one pass over the rows, in place (kernels/sampling.py)
        from graphwise.kernels.sampling import apply_penalties_

        apply_penalties_(logits, idx_t, counts, rep, pres, freq)
    else:
        penalize_reference(logits, idx_t, counts, rep, pres, freq)


def penalize_reference(
    logits: torch.Tensor,
    rows: torch.Tensor,
    counts: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> None:
    """The penalties in torch (the CPU path, and what the Triton kernel must equal), in place
    on `logits` [N, V]: rows `rows` [R], packed `counts` [R, >= V] (TokenHistory.counts)."""
    vocab = logits.shape[1]
    counts = counts[:, :vocab]
    generated = counts >> 1
    sub = logits.index_select(0, rows)
    rep = repetition[:, None]
    repeated = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(counts > 0, repeated, sub)
    sub = sub - frequency[:, None] * generated - presence[:, None] * (generated > 0)
    logits.index_copy_(0, rows, sub)
