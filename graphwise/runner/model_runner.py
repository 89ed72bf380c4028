"""ModelRunner: turns a scheduled batch into tensors, runs the model (eagerly or by replaying a
captured CUDA graph) and samples the next tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from graphwise.config import EngineConfig
from graphwise.engine.scheduler import ScheduledBatch
from graphwise.engine.sequence import Sequence
from graphwise.layers import ops
from graphwise.layers.attention import AttentionBackend, AttentionMetadata, ForwardContext
from graphwise.layers.attention.torch_backend import TorchAttentionBackend
from graphwise.layers.sampler import SamplingTensors, sample
from graphwise.models.model_config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the hidden states that are sampled
    sample_seqs: list[Sequence]


class StepHandle:
    """A launched step's sampled tokens: on the host (pinned) once `event` has passed."""

    def __init__(
        self,
        sample_seqs: list[Sequence],
        tokens: torch.Tensor | None,
        event: torch.cuda.Event | None = None,
    ) -> None:
        self.sample_seqs = sample_seqs
        self._tokens = tokens
        self._event = event

    def result(self) -> list[int]:
        """The sampled token of each sequence in `sample_seqs`; the step's one host sync."""
        if self._tokens is None:
            return []
        if self._event is not None:
            self._event.synchronize()
        return self._tokens.tolist()


def select_attention_backend(
    cfg: EngineConfig, device: torch.device, scratch_slot: int
) -> AttentionBackend:
    name = cfg.attention_backend
    if name == "auto":
        from graphwise.kernels import triton_available

        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("attention_backend='triton' needs a CUDA device")
        from graphwise.layers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(scratch_slot)
    return TorchAttentionBackend(scratch_slot)


class BlockTableRows:
    """Builds the step's [B, max blocks] int32 block table, zero-padded.

    Each sequence's row is kept as an array between steps and extended when its list grows:
    converting every table from Python ints each step costs milliseconds at large batch and long
    context. A block table only grows by appends or is replaced by a new list (admission,
    release), so a cached row is valid while it was made from the same list object (held here,
    so its id cannot be reused by another list)."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[list[int], np.ndarray]] = {}

    def build(self, seqs: list[Sequence]) -> np.ndarray:
        width = max(len(s.block_table) for s in seqs)
        out = np.zeros((len(seqs), width), dtype=np.int32)
        rows: dict[str, tuple[list[int], np.ndarray]] = {}
        for i, seq in enumerate(seqs):
            table = seq.block_table
            entry = self._rows.get(seq.request_id)
            if entry is None or entry[0] is not table or entry[1].size > len(table):
                row = np.asarray(table, dtype=np.int32)
            elif entry[1].size < len(table):
                row = np.concatenate([entry[1], np.asarray(table[entry[1].size :], np.int32)])
            else:
                row = entry[1]
            rows[seq.request_id] = (table, row)
            out[i, : row.size] = row
        self._rows = rows  # sequences that left the batch drop out
        return out


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model: nn.Module,
        model_config: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.config = config
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.backend: AttentionBackend = TorchAttentionBackend(scratch_slot=0)
        self.graph_runner = None  # set by the engine when CUDA graphs are on
        self.vocab_limit: int | None = None  # set when the tokenizer knows fewer ids than the model
        self.default_generator = torch.Generator(device=device).manual_seed(config.seed)
        self.steps_graph = 0
        self.steps_eager = 0
        self._pin = device.type == "cuda"
        self._block_tables = BlockTableRows()
        # The last launched step's sampled tokens, on the device: the next step's inputs for
        # sequences whose newest token the host does not know yet (async scheduling).
        self._last_tokens: torch.Tensor | None = None

    # ---- KV cache ---------------------------------------------------------------------
    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV bytes of one token on this device (the parallel runner counts its shard only)."""
        return self.model_config.kv_bytes_per_token(dtype)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One (k, v) pair per layer, plus one scratch block that padding lanes write into."""
        mc = self.model_config
        shape = (num_blocks + 1, self.block_size, mc.num_key_value_heads, mc.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(mc.num_hidden_layers)
        ]
        self.num_blocks = num_blocks
        self.backend = select_attention_backend(
            self.config, self.device, scratch_slot=num_blocks * self.block_size
        )
        ops.enable_triton(self.backend.name == "triton")
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB), attention backend: %s",
            num_blocks,
            self.block_size,
            2 * sum(k.numel() * k.element_size() for k, _ in self.kv_caches) / 2**20,
            self.backend.name,
        )

    # ---- inputs -----------------------------------------------------------------------
    def _upload(
        self, dtype: torch.dtype, *parts: list[int] | list[float] | np.ndarray
    ) -> list[torch.Tensor]:
        """Copy several lists / arrays to the device in one transfer (pinned and asynchronous on
        CUDA: each separate small copy costs tens of microseconds of host time)."""
        with torch.inference_mode():  # also when called outside a step (tests, profiling)
            return self._upload_inner(dtype, parts)

    def _upload_inner(
        self, dtype: torch.dtype, parts: tuple[list[int] | list[float] | np.ndarray, ...]
    ) -> list[torch.Tensor]:
        # Each part starts on a 16-byte boundary of the flat buffer. Triton specializes kernels
        # on pointer alignment: views at offsets that depend on the batch size would compile a
        # new variant (a ~1 s stall) whenever a batch shifts an alignment for the first time.
        align = max(1, 16 // torch.empty(0, dtype=dtype).element_size())
        if all(isinstance(x, list) for x in parts):  # small lists: cheapest straight to torch
            sizes = [len(x) for x in parts]
            values: list[int | float] = []
            for x in parts:
                values.extend(x)
                values.extend([0] * (-len(x) % align))
            flat = torch.tensor(values, dtype=dtype)
        else:
            np_dtype = np.int64 if dtype == torch.int64 else np.int32
            arrays = [np.asarray(x, dtype=np_dtype).ravel() for x in parts]
            sizes = [a.size for a in arrays]
            padded = np.zeros(sum(n + (-n % align) for n in sizes), dtype=np_dtype)
            at = 0
            for a in arrays:
                padded[at : at + a.size] = a
                at += a.size + (-a.size % align)
            flat = torch.from_numpy(padded)
        if self._pin:
            # A pinned copy from torch's caching host allocator: it recycles a buffer only after
            # the copy that read it has run, so the host never waits here for the GPU (a pageable
            # copy, or reusing one buffer, would wait for the step that is still running).
            dev = flat.pin_memory().to(self.device, non_blocking=True)
        else:
            dev = flat.to(self.device)
        out, at = [], 0
        for n in sizes:
            out.append(dev[at : at + n])
            at += n + (-n % align)
        return out

    @torch.inference_mode()  # also when called outside a step (tests, profiling)
    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        q_lens: list[int] = []
        seq_lens: list[int] = []
        cu = [0]
        logits_indices: list[int] = []
        sample_seqs: list[Sequence] = []
        fill_dst: list[int] = []  # rows of input_ids that take a token still on the device
        fill_src: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            c = seq.num_computed_tokens
            known = len(seq.token_ids)
            if c + n <= known:
                ids.extend(seq.token_ids[c : c + n])
            else:  # the last token is being sampled by the step launched before this one
                if c + n != known + 1 or seq.num_placeholders != 1:
                    raise RuntimeError(f"{seq!r}: only its newest token may be pending")
                ids.extend(seq.token_ids[c:known])
                fill_dst.append(len(ids))
                fill_src.append(seq.pending_row)
                ids.append(0)
            positions.extend(range(c, c + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(c, c + n))
            q_lens.append(n)
            seq_lens.append(c + n)
            cu.append(cu[-1] + n)
            if c + n == seq.num_tokens:  # all known tokens computed: sample the next one
                logits_indices.append(len(ids) - 1)
                sample_seqs.append(seq)
        tables = self._block_tables.build(batch.seqs)
        width = tables.shape[1]
        ids_t, pos_t, slots_t, logits_t, dst_t, src_t = self._upload(
            torch.int64, ids, positions, slots, logits_indices, fill_dst, fill_src
        )
        if fill_dst:
            if self._last_tokens is None:
                raise RuntimeError("a pending token but no step was launched before")
            ids_t.index_copy_(0, dst_t, self._last_tokens.index_select(0, src_t))
        seq_lens_t, tables_t, cu_t = self._upload(torch.int32, seq_lens, tables, cu)
        meta = AttentionMetadata(
            slot_mapping=slots_t,
            seq_lens=seq_lens_t,
            block_tables=tables_t.view(len(batch.seqs), width),
            cu_seqlens_q=cu_t,
            is_decode=all(n == 1 for n in q_lens),
            max_q_len=max(q_lens),
            max_seq_len=max(seq_lens),
            q_lens_cpu=q_lens,
            seq_lens_cpu=seq_lens,
        )
        return StepInputs(
            input_ids=ids_t,
            positions=pos_t,
            meta=meta,
            logits_indices=logits_t,
            sample_seqs=sample_seqs,
        )

    def sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors | None:
        """Per-row sampling parameters on the device; None when every row is greedy."""
        if all(s.sampling_params.temperature == 0 for s in seqs):
            return None
        vocab = self.model_config.vocab_size
        temps: list[float] = []
        top_ks: list[int] = []
        top_ps: list[float] = []
        gens: list[torch.Generator | None] = []
        for seq in seqs:
            p = seq.sampling_params
            temps.append(float(p.temperature))
            top_ks.append(vocab if p.top_k < 0 else min(p.top_k, vocab))
            top_ps.append(float(p.top_p))
            if p.seed is not None and p.temperature > 0 and seq.generator is None:
                seq.generator = torch.Generator(device=self.device).manual_seed(p.seed)
            gens.append(seq.generator)
        (top_k,) = self._upload(torch.int64, top_ks)
        temperature, top_p = self._upload(torch.float32, temps, top_ps)
        return SamplingTensors(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            all_greedy=False,
            any_top_k_top_p=any(k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps),
            generators=gens,
        )

    # ---- execution --------------------------------------------------------------------
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [T, H] for the step's tokens."""
        if self.graph_runner is not None and self.graph_runner.can_replay(inputs):
            self.steps_graph += 1
            return self.graph_runner.replay(inputs)
        self.steps_eager += 1
        ctx = ForwardContext(inputs.meta, self.backend, self.kv_caches)
        return self.model(inputs.input_ids, inputs.positions, ctx)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> StepHandle:
        """Enqueue one step (inputs, forward, sampling) without waiting for the device; the
        handle's `result()` waits for the sampled tokens."""
        inputs = self.prepare(batch)
        hidden = self.forward(inputs)
        if not inputs.sample_seqs:
            return StepHandle([], None)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])  # type: ignore[operator]
        if self.vocab_limit is not None:  # ids past the tokenizer's vocabulary cannot be decoded
            logits[:, self.vocab_limit :] = float("-inf")
        self._mask_min_tokens(logits, inputs.sample_seqs)
        params = self.sampling_tensors(inputs.sample_seqs)
        tokens = (
            logits.argmax(dim=-1)
            if params is None
            else sample(logits, params, self.default_generator)
        )
        self._last_tokens = tokens
        if not self._pin:
            return StepHandle(inputs.sample_seqs, tokens)
        # Copy to pinned memory behind the step and mark it: result() waits for this step only.
        # The caching host allocator does not hand the buffer out again before the copy ran.
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return StepHandle(inputs.sample_seqs, host, event)

    def execute(self, batch: ScheduledBatch) -> list[int]:
        """Run one step; returns the sampled token of each sequence that samples, in order."""
        return self.launch(batch).result()

    def _mask_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        for row, seq in enumerate(seqs):
            p = seq.sampling_params
            if seq.num_output_tokens < p.min_tokens:
                banned = sorted(set(p.stop_token_ids or []) | set(seq.eos_token_ids))
                rows.extend([row] * len(banned))
                cols.extend(banned)
        if rows:  # one upload (indexing with a Python list would copy synchronously)
            rows_t, cols_t = self._upload(torch.int64, rows, cols)
            logits.index_put_((rows_t, cols_t), logits.new_full((len(rows),), float("-inf")))

    @torch.inference_mode()
    def prompt_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits at every new position of a batch (tests compare them with HF)."""
        inputs = self.prepare(batch)
        ctx = ForwardContext(inputs.meta, self.backend, self.kv_caches)
        hidden = self.model(inputs.input_ids, inputs.positions, ctx)
        return self.model.compute_logits(hidden)  # type: ignore[operator]
