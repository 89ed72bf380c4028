"""EngineConfig: every engine option in one place, with vLLM's names where vLLM has one."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

CudaGraphMode = Literal["auto", "on", "off"]
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def kv_cache_dtype_error(name: object) -> str:
    """What is wrong with a `kv_cache_dtype` this engine does not take (vLLM has more)."""
    why = ""
    if name == "fp8_e5m2":
        why = " (graphwise's FP8 KV cache is e4m3 only: use 'fp8' or 'fp8_e4m3')"
    elif name in ("bfloat16", "float16", "float32", "half"):
        why = " (with 'auto' the cache follows the model's dtype: set dtype instead)"
    return f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}{why}"


SPEC_METHODS = ("ngram", "draft_model")
# vLLM's other proposers: named, so that asking for one says it is not here yet.
_SPEC_METHODS_LATER = ("eagle", "eagle3", "medusa", "mlp_speculator", "mtp", "suffix")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's `speculative_config`): each step a proposer drafts up to
    `num_speculative_tokens` tokens per request and the target model verifies them in one
    forward (docs/architecture.md, "Speculative decoding").

    - `method="ngram"` (prompt lookup, engine/ngram.py): the drafts are what followed the most
      recent earlier occurrence of the request's last `prompt_lookup_max` ..
      `prompt_lookup_min` tokens in its prompt and output.
    - `method="draft_model"` (runner/draft_model.py): a smaller model with the target's
      vocabulary, at `model` (an HF directory or a .gguf file, loaded like the target), drafts
      them autoregressively. `num_layers` (graphwise's own field) keeps only its first N
      decoder layers (with its final norm and LM head): with the target's own checkpoint that
      is an early-exit self-draft (LayerSkip-style, untrained for it).
    As in vLLM, a config with a `model` and no `method` means "draft_model" ("ngram" when the
    model is "ngram" or "[ngram]")."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    model: str | None = None
    num_layers: int | None = None

    @classmethod
    def parse(cls, value: Any) -> SpeculativeConfig | None:
        """From a dict (or its JSON text, the CLI's form); None stays None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(value).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(
                f"speculative_config: unknown field(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(names))})"
            )
        fields = dict(value)
        if fields.get("method") is None:
            model = fields.get("model")
            if model is None:
                raise ValueError(
                    "speculative_config.method is required ('ngram' or 'draft_model'; "
                    "a config with a model and no method means 'draft_model')"
                )
            # vLLM's inference: "[ngram]" (its older spelling) is prompt lookup, any other
            # model a draft model.
            fields["method"] = "ngram" if model in ("ngram", "[ngram]") else "draft_model"
            if fields["method"] == "ngram":
                del fields["model"]
        if "num_speculative_tokens" not in fields:
            raise ValueError("speculative_config.num_speculative_tokens is required")
        lookup = sorted({"prompt_lookup_max", "prompt_lookup_min"} & set(fields))
        if fields["method"] != "ngram" and lookup:
            raise ValueError(
                f"speculative_config.{lookup[0]} applies to method 'ngram' only "
                f"(method is {fields['method']!r})"
            )
        # vLLM: prompt_lookup_min defaults to prompt_lookup_max when only that is given.
        if "prompt_lookup_max" in fields and "prompt_lookup_min" not in fields:
            fields["prompt_lookup_min"] = fields["prompt_lookup_max"]
        if "prompt_lookup_min" in fields and "prompt_lookup_max" not in fields:
            fields["prompt_lookup_max"] = fields["prompt_lookup_min"]
        return cls(**fields)

    def __post_init__(self) -> None:
        if self.method in _SPEC_METHODS_LATER:
            raise ValueError(
                f"speculative_config.method {self.method!r} is not supported yet "
                f"(methods: {', '.join(SPEC_METHODS)})"
            )
        if self.method not in SPEC_METHODS:
            raise ValueError(
                f"speculative_config.method must be one of {', '.join(SPEC_METHODS)}, "
                f"got {self.method!r}"
            )
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"speculative_config.{name} must be a positive integer, got {value!r}"
                )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must not "
                f"exceed prompt_lookup_max ({self.prompt_lookup_max})"
            )
        if self.method == "ngram":
            for name in ("model", "num_layers"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"speculative_config.{name} applies to method 'draft_model' only "
                        "(the n-gram proposer runs no model)"
                    )
            return
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(
                "speculative_config.model is required with method 'draft_model': the draft "
                f"model's HF directory or .gguf file, got {self.model!r}"
            )
        n = self.num_layers
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"speculative_config.num_layers must be a positive integer, got {n!r}")

    @property
    def uses_draft_model(self) -> bool:
        return self.method == "draft_model"


@dataclass
class EngineConfig:
    model: str | None = None  # HF dir, .gguf file, or None for the embedded default
    preset: str | None = None  # a shipped config (e.g. "qwen2.5-7b"); implies dummy weights
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    load_format: str = "auto"  # "auto" | "dummy"
    # Weight format (vLLM's names): None reads the checkpoint's quantization_config (if any);
    # "fp8" on a full-precision checkpoint quantizes it at load. See layers/quantization.
    quantization: str | None = None
    # The KV cache's element type (vLLM's names): "auto" is the model's dtype; "fp8" (=
    # "fp8_e4m3") stores e4m3 with per-layer k/v scales from the checkpoint (else 1.0).
    kv_cache_dtype: str = "auto"
    num_layers: int | None = None  # cut a large model to fit one GPU (performance work)
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes for the KV pool; overrides the utilization rule
    num_gpu_blocks_override: int | None = None
    cuda_graph: CudaGraphMode = "auto"
    enforce_eager: bool = False
    cuda_graph_max_bs: int | None = None  # largest captured batch (see cuda_graph_max_rows)
    cuda_graph_min_speedup: float = 1.05
    cuda_graph_max_context: int | None = None  # longer contexts decode eagerly
    attention_backend: str = "auto"  # "auto" | "torch" | "triton"
    # Overlap the host's scheduling and output processing with the GPU's step (vLLM's
    # async_scheduling, SGLang's overlap schedule); off runs one step at a time.
    async_scheduling: bool = True
    max_logprobs: int = 20  # the most logprobs (and prompt logprobs) a request may ask for
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Batches in flight at once under pipeline parallelism (micro-batches, each with its own
    # sequences) so that the stages overlap: None is pipeline_parallel_size with async
    # scheduling, 1 without; 1 runs one batch at a time (the stages take turns). See
    # docs/parallel.md and engine/microbatch.py. (graphwise's option: vLLM sizes its batch
    # queue by pipeline_parallel_size and has no flag for it.)
    pipeline_micro_batches: int | None = None
    data_parallel_size: int = 1
    # Speculative decoding, vLLM's shape: {"method": "ngram", "num_speculative_tokens": k,
    # "prompt_lookup_max": n, "prompt_lookup_min": m} or {"method": "draft_model", "model":
    # PATH, "num_speculative_tokens": k} (a dict, its JSON text or a SpeculativeConfig); None
    # (the default) runs plain decoding and pays nothing for it.
    speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None
    # Threads that fill a step's structured-output token masks on the host (the engine's own
    # thread among them); None: half the CPUs this process may use, at most 8
    # (engine/mask_fill.py). 1 fills every row in the engine's thread.
    structured_outputs_fill_threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str, allow_none: bool = True) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in (
            "max_num_seqs",
            "block_size",
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "data_parallel_size",
        ):
            positive(name, allow_none=False)
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")
        for name in (
            "max_model_len",
            "max_num_batched_tokens",
            "pipeline_micro_batches",
            "num_layers",
            "num_gpu_blocks_override",
            "cuda_graph_max_bs",
            "cuda_graph_max_context",
            "structured_outputs_fill_threads",
        ):
            positive(name)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive bytes, got {self.kv_cache_memory}")
        if self.cuda_graph not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graph must be 'auto', 'on' or 'off', got {self.cuda_graph!r}")
        if self.load_format not in ("auto", "dummy", "safetensors", "gguf"):
            raise ValueError(
                f"load_format must be 'auto', 'dummy', 'safetensors' or 'gguf', got {self.load_format!r}"
            )
        if self.dtype not in ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"):
            raise ValueError(
                f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}"
            )
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(
                f"attention_backend must be 'auto', 'torch' or 'triton', got {self.attention_backend!r}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(kv_cache_dtype_error(self.kv_cache_dtype))
        if self.quantization is not None and not isinstance(self.quantization, str):
            raise ValueError(f"quantization must be a format name, got {self.quantization!r}")
        if self.cuda_graph_min_speedup <= 0:
            raise ValueError("cuda_graph_min_speedup must be positive")
        if self.pipeline_micro_batches is not None and self.pipeline_micro_batches > 1:
            if self.pipeline_parallel_size == 1:
                raise ValueError(
                    "pipeline_micro_batches > 1 needs pipeline_parallel_size > 1 (micro-batches "
                    "overlap pipeline stages)"
                )
            if not self.async_scheduling:
                raise ValueError(
                    "pipeline_micro_batches > 1 needs async_scheduling (a batch is launched "
                    "before the ones ahead of it resolve)"
                )
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.speculative_config is not None:
            parallel = {
                "tensor_parallel_size": self.tensor_parallel_size,
                "pipeline_parallel_size": self.pipeline_parallel_size,
                "data_parallel_size": self.data_parallel_size,
            }
            for name, size in parallel.items():
                if size > 1:
                    raise ValueError(
                        f"speculative_config is not supported with {name} > 1 yet "
                        "(single-GPU engines only)"
                    )

    @property
    def speculative(self) -> SpeculativeConfig | None:
        """The parsed speculative config (validate() turns a dict or JSON into one)."""
        spec = self.speculative_config
        assert spec is None or isinstance(spec, SpeculativeConfig)
        return spec

    @property
    def num_pipeline_batches(self) -> int:
        """Batches in flight at once: 1 without pipeline parallelism or async scheduling,
        else pipeline_micro_batches (default: one per stage)."""
        if self.pipeline_parallel_size == 1 or not self.async_scheduling:
            return 1
        return self.pipeline_micro_batches or self.pipeline_parallel_size

    @property
    def cuda_graph_max_rows(self) -> int:
        """The largest decode-graph bucket, in attention rows (one per new token). A verify step
        runs its k + 1 tokens per row as decode rows (runner/inputs.py as_decode_rows), so with
        speculation the buckets reach max_num_seqs x (k + 1), capped at 512 rows by default (as
        many graphs again as plain decoding's 256 seqs need; bigger steps decode eagerly);
        `cuda_graph_max_bs` caps them instead when set."""
        spec = self.speculative
        rows = self.max_num_seqs * (1 + (spec.num_speculative_tokens if spec else 0))
        default = self.max_num_seqs if spec is None else max(self.max_num_seqs, 512)
        return min(self.cuda_graph_max_bs or default, rows)

    @property
    def use_cuda_graph(self) -> CudaGraphMode:
        """The graph mode after `enforce_eager` (vLLM's flag wins over cuda_graph)."""
        return "off" if self.enforce_eager else self.cuda_graph

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)


@dataclass(frozen=True)
class RunnerLimits:
    """The limits the engine derives from the config and the model, which the runner sizes its
    start-up with (activation profile, KV pool, graph buckets)."""

    max_model_len: int
    max_num_batched_tokens: int


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """CLI flags for EngineConfig, spelled as vLLM spells them."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF model dir or .gguf file (default: embedded)")
    g.add_argument("--preset", default=None, help="shipped model config, dummy weights")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default="auto")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--load-format", default="auto")
    g.add_argument(
        "--quantization",
        "-q",
        default=None,
        help="weight format: fp8 (online, or an fp8 checkpoint), compressed-tensors; "
        "default: the checkpoint's quantization_config",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="KV cache element type: auto (the model's dtype) or fp8 / fp8_e4m3 (e4m3, per-layer "
        "scales from the checkpoint or 1.0; needs compute capability >= 8.9 on a GPU)",
    )
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--kv-cache-memory", type=int, default=None)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None)
    g.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto")
    g.add_argument("--enforce-eager", action="store_true")
    g.add_argument("--cuda-graph-max-bs", type=int, default=None)
    g.add_argument("--cuda-graph-min-speedup", type=float, default=1.05)
    g.add_argument("--cuda-graph-max-context", type=int, default=None)
    g.add_argument("--attention-backend", default="auto")
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prepare step N+1 while step N runs (--no-async-scheduling: one step at a time)",
    )
    g.add_argument(
        "--disable-overlap-schedule",  # SGLang's spelling
        dest="async_scheduling",
        action="store_false",
        help=argparse.SUPPRESS,
    )
    g.add_argument("--max-logprobs", type=int, default=20)
    g.add_argument(
        "--speculative-config",
        default=None,
        help='speculative decoding as JSON (vLLM\'s flag), e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' or '
        '\'{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}\' '
        '("num_layers": N keeps the draft\'s first N layers)',
    )
    g.add_argument(
        "--structured-outputs-fill-threads",
        type=int,
        default=None,
        help="threads filling structured-output token masks each step (default: half the "
        "CPUs, at most 8; 1: the engine's thread alone)",
    )
    g.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    g.add_argument("--pipeline-parallel-size", "--pp", type=int, default=1)
    g.add_argument(
        "--pipeline-micro-batches",
        type=int,
        default=None,
        help="batches in flight under pipeline parallelism, so stages overlap (default: one "
        "per stage with async scheduling; 1: one batch at a time)",
    )
    g.add_argument("--data-parallel-size", "--dp", type=int, default=1)


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    names = {f.name for f in dataclasses.fields(EngineConfig)} - {"extra"}
    kwargs = {n: getattr(args, n) for n in names if hasattr(args, n)}
    kwargs.update(overrides)
    return EngineConfig(**kwargs)
