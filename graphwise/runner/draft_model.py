"""The draft-model proposer (`speculative_config` method "draft_model"): a small model with the
target's vocabulary drafts each speculating request's next k tokens inside the step that
verifies them.

The draft's KV cache is a second set of tensors (one (k, v) pair per draft layer) addressed by
the target's block ids: a request's block table and slot mapping serve both models, so the
scheduler's one block manager (allocation, prefix cache, copy-on-write, rollback by
`BlockManager.trim`) governs both caches, and the memory planner prices a block as the two
models' bytes together (runner/memory.py).

One step, before the target's forward (ModelRunner._execute):

1. **Mirror.** One draft forward over the step's rows at the target's positions and slots, so
   the draft's KV covers what the target's does (a prompt chunk, a plain decode token, a
   prefix-cache hit computed by an earlier request). A row that verifies drafts (`propose`)
   computes instead the tokens its draft KV lacks (`draft_catch_up`: after a verify step that
   accepted every draft, that last draft) and its first token; its logits there give draft 1.
2. **Draft decode.** k - 1 single-token steps over the proposing rows, each fed the draft
   drawn by the step before (on the device, as an async step's pending token); a row with
   fewer drafts (its k cut by max_tokens or the token budget) drops out, so no draft writes
   past the slots the scheduler allocated.
3. The drafts go into the target step's input ids and `SpecInputs.draft_ids`; for random rows
   the distributions they were drawn from go to `SpecInputs.draft_probs`, which rejection
   sampling needs (layers/sampler.py verify_drafts: the output stays the target's).

Where the draft's KV is stale it only costs acceptance, never correctness: the target verifies
every token. The draft computes the KV of positions 0 .. c + k - 1 of a verify row [t, d1 .. dk]
at c; the scheduler keeps, per request, how many positions are valid (`num_draft_computed`)
and sends the gap as the next row's catch-up.

Draft steps run eagerly (no CUDA graphs yet: docs/architecture.md).
"""

from __future__ import annotations

import torch
from torch import nn

from graphwise.config import EngineConfig
from graphwise.core.step import ScheduledRow, SchedulerOutput
from graphwise.layers import ops
from graphwise.layers.attention import AttentionBackend, ForwardContext
from graphwise.layers.attention.torch_backend import TorchAttentionBackend
from graphwise.layers.sampler import SamplingTensors, draft_sample
from graphwise.models.loader import ModelSource, build_model, draft_source, model_config_of
from graphwise.models.model_config import ModelConfig
from graphwise.runner.inputs import RequestStates, StepInputs, Uploader, build_step_inputs


class DraftModel:
    """The draft model, its KV cache and the k draft steps of a verify step."""

    def __init__(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        shares_target_weights: bool = False,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype  # its KV cache's too: no FP8 scales to carry for a draft
        self.block_size = block_size
        # The target drafting for itself: one set of weights, two KV caches (counted once).
        self.shares_target_weights = shares_target_weights
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.backend: AttentionBackend = TorchAttentionBackend(scratch_slot=0)
        self.use_triton_ops = False

    # ---- memory ---------------------------------------------------------------------------
    @property
    def weights_bytes(self) -> int:
        """Bytes of weights the draft adds to the target's (0 when it is the target)."""
        if self.shares_target_weights:
            return 0
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def kv_bytes_per_token(self) -> int:
        mc = self.model_config
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * elem

    def allocate_kv_cache(
        self, num_blocks: int, backend: AttentionBackend, use_triton_ops: bool
    ) -> None:
        """(k, v) per draft layer for the target's `num_blocks` blocks, plus the scratch block
        padding lanes write into; `backend` is the draft's own (a Triton backend keeps a
        workspace shaped by the model's heads)."""
        mc = self.model_config
        shape = (num_blocks + 1, self.block_size, mc.num_key_value_heads, mc.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(mc.num_hidden_layers)
        ]
        self.backend = backend
        self.use_triton_ops = use_triton_ops

    def release_kv_cache(self) -> None:
        self.kv_caches = []
        self.backend = TorchAttentionBackend(scratch_slot=0)

    # ---- one step -------------------------------------------------------------------------
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        ctx = ForwardContext(inputs.meta, self.backend, self.kv_caches)
        with ops.triton_ops(self.use_triton_ops):
            return self.model(inputs.input_ids, inputs.positions, ctx)

    def propose(
        self,
        step: SchedulerOutput,
        inputs: StepInputs,
        requests: RequestStates,
        upload: Uploader,
        last_tokens: torch.Tensor | None,
        params: SamplingTensors | None,
        generator: torch.Generator | None,
        vocab_limit: int | None = None,
    ) -> None:
        """Mirror the step's rows and draft the proposing rows' tokens into the target's
        `inputs` (input ids at the drafts' positions, `spec.draft_ids`, `spec.draft_probs`).
        `params` are the proposing rows' sampling parameters (None: all greedy)."""
        rows: list[ScheduledRow] = []
        proposing: list[ScheduledRow] = []
        for row in step.rows:
            if not row.num_new_tokens:
                continue  # a forked sample: computes nothing
            up = row.draft_catch_up
            start = row.num_computed_tokens - len(up)
            if row.propose:
                first = [*up, row.token_ids[0]]
                rows.append(ScheduledRow(row.request_id, start, len(first), first, sample=True))
                proposing.append(row)
            else:
                n = len(up) + row.num_new_tokens
                ids = [*up, *row.token_ids]
                rows.append(ScheduledRow(row.request_id, start, n, ids, row.pending_row))
        if not rows:
            return
        first_inputs = build_step_inputs(
            SchedulerOutput(rows=rows), requests, upload, self.block_size, last_tokens
        )
        hidden = self.forward(first_inputs)
        if not proposing:
            return
        spec = inputs.spec
        assert spec is not None and spec.proposed, "proposing rows without their SpecInputs"
        num_drafts = spec.num_drafts
        offsets = [0]
        for k in num_drafts[:-1]:
            offsets.append(offsets[-1] + k)
        total = offsets[-1] + num_drafts[-1]
        draft_ids = torch.zeros(total, dtype=torch.int64, device=self.device)
        draft_probs: torch.Tensor | None = None
        active = list(range(len(proposing)))  # indices of the rows drafting this round
        active_params = params
        tokens = None
        for i in range(max(num_drafts)):
            if i == 0:
                h = hidden[first_inputs.logits_indices]
            else:
                # Each row still drafting feeds its previous draft at position c + i.
                keep = [a for a, s in enumerate(active) if num_drafts[s] > i]
                decode = [
                    ScheduledRow(
                        proposing[active[a]].request_id,
                        proposing[active[a]].num_computed_tokens + i,
                        1,
                        [],
                        pending_row=a,
                        sample=True,
                    )
                    for a in keep
                ]
                step_inputs = build_step_inputs(
                    SchedulerOutput(rows=decode), requests, upload, self.block_size, tokens
                )
                if active_params is not None and len(keep) < len(active):
                    active_params = _subset(active_params, keep, upload)
                active = [active[a] for a in keep]
                h = self.forward(step_inputs)[step_inputs.logits_indices]
            logits = self.model.compute_logits(h)  # type: ignore[operator]
            if vocab_limit is not None:
                logits[:, vocab_limit:] = float("-inf")
            tokens, probs = draft_sample(logits, active_params, generator)
            (where,) = upload(torch.int64, [offsets[s] + i for s in active])
            draft_ids.index_copy_(0, where, tokens)
            if probs is not None:
                if draft_probs is None:
                    draft_probs = torch.zeros(
                        total, probs.shape[1], dtype=probs.dtype, device=self.device
                    )
                draft_probs.index_copy_(0, where, probs)
        # Draft j of a row sits right after the position whose logits verify it.
        inputs.input_ids.index_copy_(0, spec.logits_indices + 1, draft_ids)
        spec.draft_ids = draft_ids
        spec.draft_probs = draft_probs


def load_draft_model(
    config: EngineConfig,
    target_source: ModelSource,
    target: nn.Module,
    target_config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> DraftModel:
    """The draft model of `config.speculative_config`, built by the target's loader on its
    device in its dtype (the engine checked the pair: models/loader.py check_draft_model).
    The target's own checkpoint, uncut, is the target itself: its weights are shared."""
    spec = config.speculative
    assert spec is not None and spec.uses_draft_model
    source, draft_cfg = draft_source(config)
    same = (
        source.path is not None
        and target_source.path is not None
        and source.kind == target_source.kind
        and source.path.resolve() == target_source.path.resolve()
        and config.quantization is None
        and model_config_of(source, draft_cfg).num_hidden_layers == target_config.num_hidden_layers
    )
    if same:
        model, model_config = target, target_config
    else:
        model, model_config = build_model(source, draft_cfg, device, dtype)
    return DraftModel(
        model,
        model_config,
        device,
        dtype,
        config.block_size,
        shares_target_weights=same,
    )


def _subset(t: SamplingTensors, keep: list[int], upload: Uploader) -> SamplingTensors:
    """The sampling parameters of rows `keep` (indices into t's rows)."""
    (index,) = upload(torch.int64, keep)
    return SamplingTensors(
        temperature=t.temperature.index_select(0, index),
        top_k=t.top_k.index_select(0, index),
        top_p=t.top_p.index_select(0, index),
        all_greedy=t.all_greedy,
        any_top_k_top_p=t.any_top_k_top_p,
        generators=[t.generators[i] for i in keep],
        min_p=None if t.min_p is None else t.min_p.index_select(0, index),
    )
