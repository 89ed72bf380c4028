"""Issue 16's families beyond greedy parity: the Mistral window regression, per-layer attention
settings against HF's, config spellings, clear errors for what we do not implement, LongRoPE
tables, the presets' shapes against HF and the published parameter counts."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from graphwise import LLM, SamplingParams
from graphwise.layers.rotary import cos_sin_table
from graphwise.models.loader import PRESET_DIR
from graphwise.models.model_config import ModelConfig
from graphwise.models.registry import resolve_model_class
from tests.conftest import hf_greedy, hf_reference, loaded_model

NEW_ARCHS = ["qwen3", "qwen3-moe", "gemma2", "gemma3", "mistral", "mixtral", "phi3"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _prompts(seed: int = 5) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in (7, 30, 61)]


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of a tiny checkpoint with config.json entries changed."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ---- the bug the issue opened with ------------------------------------------------------------


def test_mistral_sliding_window_is_honoured(tiny_model_dir, tmp_path):
    """MistralForCausalLM used to accept `sliding_window` and attend to everything: past the
    window it decoded different tokens from HF's. The prompts here are longer than the 16-token
    window, and the window changes HF's own tokens, so ignoring it cannot pass."""
    path = tiny_model_dir("mistral")
    prompts = _prompts()
    windowed = hf_greedy(path, prompts, GREEDY.max_tokens)
    unwindowed = hf_greedy(_with_config(path, tmp_path / "full", sliding_window=None), prompts, 10)
    assert windowed != unwindowed  # the window matters for these prompts
    llm = LLM(model=str(path), block_size=8)
    layers = loaded_model(llm).model.layers
    assert [layer.self_attn.attn.sliding_window for layer in layers] == [16, 16]
    assert _tokens(llm, prompts) == windowed


# ---- per-layer attention settings against HF's own modules -----------------------------------


def _hf_model(path: Path):

    return hf_reference(path)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_layer_attention_settings_match_hf(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    hf = _hf_model(path)
    llm = LLM(model=str(path), block_size=8)
    ours = loaded_model(llm).model.layers
    for hf_layer, layer in zip(hf.model.layers, ours, strict=True):
        hf_attn, attn = hf_layer.self_attn, layer.self_attn.attn
        # Mistral-style attention reads the window from the config in forward, for every layer.
        want = getattr(hf_attn, "sliding_window", hf.config.sliding_window)
        assert attn.sliding_window == want
        assert attn.scale == pytest.approx(hf_attn.scaling)
        assert attn.softcap == getattr(hf_attn, "attn_logit_softcapping", None)
    windows = {layer.self_attn.attn.sliding_window for layer in ours}
    if arch in ("gemma2", "gemma3", "qwen3"):  # several layer types in one model
        assert len(windows) == 2 and None in windows


def test_gemma3_local_and_global_rope_tables(tiny_model_dir):
    """Sliding layers use the local base, global ones the scaled global base; layers of one
    kind share one table."""
    llm = LLM(model=str(tiny_model_dir("gemma3")), block_size=8)
    layers = loaded_model(llm).model.layers  # sliding, sliding, full, sliding
    rot = [layer.self_attn.rotary for layer in layers]
    assert rot[0] is rot[1] is rot[3] and rot[2] is not rot[0]
    local = cos_sin_table(32, 512, 10000.0, None)
    full = cos_sin_table(32, 512, 1e6, {"rope_type": "linear", "factor": 2.0})
    assert torch.equal(rot[0].cos_sin_cache, local)
    assert torch.equal(rot[2].cos_sin_cache, full)


def test_qwen2_use_sliding_window_is_honoured(tmp_path):
    """Qwen2 configs carry a window that is off unless `use_sliding_window`; when it is on, the
    layers from max_window_layers slide (it used to be ignored as Mistral's was)."""
    import transformers as tf

    from tests.conftest import TINY_COMMON

    torch.manual_seed(4)
    cfg = tf.Qwen2Config(
        **TINY_COMMON, use_sliding_window=True, sliding_window=12, max_window_layers=1
    )
    path = tmp_path / "qwen2_swa"
    tf.Qwen2ForCausalLM(cfg).eval().save_pretrained(path)
    llm = LLM(model=str(path), block_size=8)
    layers = loaded_model(llm).model.layers
    assert [layer.self_attn.attn.sliding_window for layer in layers] == [None, 12]
    assert _tokens(llm, _prompts()) == hf_greedy(path, _prompts(), GREEDY.max_tokens)


def test_dummy_weights_give_unit_norm_scales(tiny_model_dir):
    """Dummy weights: norms scale by 1, i.e. weight 1 for Llama-style norms and 0 for Gemma's
    (1 + w) ones, q/k norms included."""
    for arch, want in (("gemma3", 0.0), ("qwen3", 1.0)):
        llm = LLM(model=str(tiny_model_dir(arch)), block_size=8, load_format="dummy")
        model = loaded_model(llm)
        norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
        assert len(norms) > 4 and all(bool((p == want).all()) for p in norms)


# ---- config spellings ------------------------------------------------------------------------


def test_gemma3_transformers4_config_matches_hf():
    """The config.json Google published (rope_local_base_freq, sliding_window_pattern,
    rope_scaling for the global layers) gives HF's layer types and RoPE per layer."""
    from transformers import Gemma3TextConfig

    d = {
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 13,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 512,
        "query_pre_attn_scalar": 32,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window": 512,
        "sliding_window_pattern": 6,
    }
    ours = ModelConfig.from_dict(d)
    hf = Gemma3TextConfig(**{k: v for k, v in d.items() if k != "architectures"})
    assert ours.layer_types == hf.layer_types
    assert ours.tie_word_embeddings is hf.tie_word_embeddings is True
    for i, kind in enumerate(hf.layer_types):
        theta, scaling = ours.layer_rope(i)
        params = hf.rope_parameters[kind]
        assert theta == params["rope_theta"]
        assert (scaling or {}).get("factor") == params.get("factor")
        assert ours.layer_sliding_window(i) == (512 if kind == "sliding_attention" else None)


def test_phi3_longrope_tables_match_hf():
    """Positions below the original context use HF's short factors, positions past it HF's long
    ones, both times HF's attention factor (see layers/rotary.py for the one difference)."""
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    half = 8
    scaling = {
        "type": "longrope",
        "short_factor": [1.0 + 0.05 * i for i in range(half)],
        "long_factor": [1.5 + 0.4 * i for i in range(half)],
    }
    d = {
        "architectures": ["Phi3ForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "vocab_size": 512,
        "max_position_embeddings": 256,
        "original_max_position_embeddings": 64,
        "rope_scaling": scaling,
    }
    mc = ModelConfig.from_dict(d)
    table = cos_sin_table(16, 256, mc.rope_theta, mc.rope_scaling)
    hf_cfg = Phi3Config(**{k: v for k, v in d.items() if k != "architectures"})
    init = ROPE_INIT_FUNCTIONS["longrope"]
    for positions, seq_len in ((torch.arange(0, 64), None), (torch.arange(64, 256), 65)):
        inv_freq, attention = init(hf_cfg, None, seq_len=seq_len)
        assert attention > 1.0
        freqs = positions[:, None].float() * inv_freq[None, :]
        want = torch.cat([freqs.cos() * attention, freqs.sin() * attention], dim=-1)
        torch.testing.assert_close(table[positions], want, rtol=1e-6, atol=1e-6)


# ---- what we refuse, by name ---------------------------------------------------------------------

_BASE = {
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 512,
}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_act": "gelu_new"}, "hidden activation 'gelu_new' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        (
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.75}},
            "partial_rotary_factor=0.75",
        ),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        (
            {
                "use_sliding_window": True,
                "sliding_window": 8,
                "layer_types": ["chunked_attention", "full_attention"],
            },
            "layer type.*chunked_attention",
        ),
        (
            {"architectures": ["Phi3ForCausalLM"], "rope_scaling": {"type": "longrope"}},
            "longrope scaling lacks short_factor, long_factor",
        ),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_unsupported_config_features_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**_BASE, **changes})


def test_gemma_keys_are_read_only_where_hf_uses_them():
    """HF applies Gemma's scale and soft-caps only in Gemma models, and Gemma 3's attention
    takes no soft-cap at all: stray entries elsewhere change nothing, here as there."""
    stray = {
        "query_pre_attn_scalar": 7,
        "attn_logit_softcapping": 3.0,
        "final_logit_softcapping": 4.0,
    }
    qwen = ModelConfig.from_dict({**_BASE, **stray})
    assert (qwen.attention_scale, qwen.attn_logit_softcapping) == (16**-0.5, None)
    assert qwen.final_logit_softcapping is None
    gemma3 = ModelConfig.from_dict({**_BASE, **stray, "architectures": ["Gemma3ForCausalLM"]})
    assert (gemma3.attention_scale, gemma3.attn_logit_softcapping) == (7**-0.5, None)
    assert gemma3.final_logit_softcapping == 4.0


@pytest.mark.parametrize(
    "arch, message",
    [
        ("Gemma3ForConditionalGeneration", "multimodal Gemma 3"),
        ("Phi3SmallForCausalLM", "Phi-3-small"),
        ("FalconForCausalLM", "'FalconForCausalLM' is not supported; supported: Gemma2"),
    ],
)
def test_unsupported_architectures_are_named(arch, message):
    with pytest.raises(ValueError, match=message):
        resolve_model_class(arch)


def test_moe_with_another_activation_is_refused(tiny_model_dir, tmp_path):
    path = _with_config(tiny_model_dir("mixtral"), tmp_path / "m", hidden_act="gelu_pytorch_tanh")
    with pytest.raises(ValueError, match="MoE experts with activation 'gelu_pytorch_tanh'"):
        LLM(model=str(path), block_size=8)


# ---- presets ---------------------------------------------------------------------------------


def _hf_memory_layout(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Our tensors' shapes under the names HF transformers 5 uses in memory: checkpoint names
    (hf_state_dict), except that its MoE layers hold the experts stacked as ours do
    (`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`) and call the
    router `mlp.gate` (the per-expert checkpoint names only exist on disk)."""
    from graphwise.layers.moe import SparseMoE

    out = {
        k.replace(".block_sparse_moe.gate.", ".mlp.gate."): tuple(v.shape)
        for k, v in model.hf_state_dict().items()
        if ".experts." not in k
    }
    for name, module in model.named_modules():
        if isinstance(module, SparseMoE):
            out[f"{name}.experts.gate_up_proj"] = tuple(module.w_gate_up.shape)
            out[f"{name}.experts.down_proj"] = tuple(module.w_down.shape)
    return out


# Totals published on the models' pages (Qwen3-8B 8.2B, Qwen3-30B-A3B 30.5B, Gemma 2 9B,
# Mistral 7B, Mixtral 46.7B), to the parameter.
PRESET_PARAMS = {
    "qwen3-8b": 8_190_735_360,
    "qwen3-30b-a3b": 30_532_122_624,
    "gemma-2-9b": 9_241_705_984,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
}


@pytest.mark.parametrize("preset", sorted(PRESET_PARAMS))
def test_presets_build_with_hf_shapes_and_published_sizes(preset):
    """On the meta device (no memory): our model has the published parameter count, and its
    HF-named tensors are exactly HF's for the same config, name for name and shape for shape."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((PRESET_DIR / f"{preset}.json").read_text())
    assert raw["_source"].startswith("https://huggingface.co/")
    mc = ModelConfig.from_dict(raw)
    with torch.device("meta"):
        ours = resolve_model_class(mc.architecture)(mc)
    assert sum(p.numel() for p in ours.parameters()) == PRESET_PARAMS[preset]
    hf_config = AutoConfig.for_model(
        raw["model_type"],
        **{k: v for k, v in raw.items() if k not in ("architectures", "model_type")},
    )
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config)
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items() if "rotary" not in k}
    if mc.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    assert _hf_memory_layout(ours) == want
    if preset == "mistral-7b":
        assert mc.layer_types == ["sliding_attention"] * 32 and mc.sliding_window == 4096
    if preset == "gemma-2-9b":
        assert mc.layer_types[:2] == ["sliding_attention", "full_attention"]
        assert (mc.attn_logit_softcapping, mc.final_logit_softcapping) == (50.0, 30.0)


def test_decode_floor_counts_experts_read_and_windows():
    """The decode floor: a dense model reads all weights plus every token's KV; a MoE at batch 1
    reads only the k experts it routes to per layer, and nearly all of them at a large batch;
    a sliding-window layer reads at most its window of KV."""
    dtype = torch.bfloat16
    mix = ModelConfig.from_dict(json.loads((PRESET_DIR / "mixtral-8x7b.json").read_text()))
    per_expert = 3 * mix.hidden_size * mix.intermediate_size * 2
    assert mix.expert_bytes(dtype) == per_expert
    weights = 10**11
    kv = mix.kv_bytes_per_token(dtype)
    at1 = mix.decode_step_bytes(weights, dtype, 1, 100)
    # top-2 of 8: six experts per layer are not read.
    assert at1 == pytest.approx(weights - 6 * mix.num_hidden_layers * per_expert + 100 * kv)
    at256 = mix.decode_step_bytes(weights, dtype, 256, 100)
    assert at256 == pytest.approx(weights + 256 * 100 * kv, rel=1e-6)

    dense = ModelConfig.from_dict(json.loads((PRESET_DIR / "qwen2.5-7b.json").read_text()))
    kv = dense.kv_bytes_per_token(dtype)
    assert dense.decode_step_bytes(weights, dtype, 8, 300) == weights + 8 * 300 * kv

    gemma = ModelConfig.from_dict(json.loads((PRESET_DIR / "gemma-2-9b.json").read_text()))
    window = gemma.sliding_window
    assert window is not None
    sliding = sum(gemma.is_sliding(i) for i in range(gemma.num_hidden_layers))
    assert 0 < sliding < gemma.num_hidden_layers
    per_layer = gemma.kv_bytes_per_token(dtype) // gemma.num_hidden_layers
    ctx = 2 * window
    expected = weights + per_layer * (sliding * window + (gemma.num_hidden_layers - sliding) * ctx)
    assert gemma.decode_step_bytes(weights, dtype, 1, ctx) == expected
