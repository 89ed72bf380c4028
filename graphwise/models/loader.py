"""Find, build and fill a model: HF safetensors dirs, GGUF files, presets with dummy weights."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from graphwise.config import EngineConfig
from graphwise.distributed import parallel_state
from graphwise.layers import quantization
from graphwise.layers.linear import Linear, create_quantized_weights, process_after_loading
from graphwise.layers.quantization.gguf import GgufConfig
from graphwise.models.default import DEFAULT_MODEL_NAME, default_model_path
from graphwise.models.gguf_loader import (
    gguf_config,
    gguf_has_tokenizer,
    gguf_tensor_types,
    gguf_weights,
)
from graphwise.models.model_config import ModelConfig
from graphwise.models.registry import resolve_model_class

logger = logging.getLogger(__name__)
PRESET_DIR = Path(__file__).parent / "presets"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


@dataclass
class ModelSource:
    kind: str  # "hf" | "gguf" | "preset"
    path: Path | None
    name: str  # what /v1/models reports
    config: dict[str, Any]


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def resolve_source(cfg: EngineConfig) -> ModelSource:
    if cfg.preset is not None:
        path = PRESET_DIR / f"{cfg.preset}.json"
        if not path.is_file():
            raise ValueError(
                f"preset {cfg.preset!r} is unknown; presets: {', '.join(list_presets())}"
            )
        return ModelSource("preset", None, cfg.preset, json.loads(path.read_text()))
    if cfg.model is None:
        path = default_model_path()
        return ModelSource("gguf", path, DEFAULT_MODEL_NAME, gguf_config(path))
    path = Path(cfg.model).expanduser()
    if not path.exists():
        raise ValueError(f"model path {cfg.model!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {cfg.model!r} is not a .gguf file")
        return ModelSource("gguf", path, path.stem, gguf_config(path))
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model directory {cfg.model!r} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
    archs = config.get("architectures") or [None]
    resolve_model_class(str(archs[0]))  # unknown architecture: fail before anything else
    return ModelSource("hf", path, path.name, config)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {path} has no *.safetensors files")
    return files


def _safetensors_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in tqdm(files, desc="Loading safetensors shards", unit="file", leave=False):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _dummy_init(model: nn.Module, seed: int) -> None:
    """Random weights of the right shape (vLLM's load_format="dummy"): small values, unit norms.
    Drawn on the model's device, so a 7B model fills in a second on a GPU."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    # A tensor/pipeline-parallel shard seeds each tensor by its name, so that tensors replicated
    # on several ranks (router, norms, replicated KV heads) get the same values everywhere.
    sharded = parallel_state.current() != parallel_state.SINGLE
    quantized: set[str] = set()  # parameters a quantization method draws itself
    for name, module in model.named_modules():
        if isinstance(module, Linear) and not module.quant_method.plain:
            if sharded:
                gen.manual_seed(seed + zlib.crc32(name.encode()))
            module.quant_method.init_dummy(module, gen)
            quantized.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
    for name, p in model.named_parameters():
        if name in quantized:
            continue
        if name.endswith("norm.weight") or "layernorm" in name:
            # Unit scale: weight 1, or 0 for Gemma's norms, which scale by (1 + weight).
            owner = model.get_submodule(name.rpartition(".")[0])
            p.data.fill_(0.0 if getattr(owner, "gemma", False) else 1.0)
        else:
            if sharded:
                gen.manual_seed(seed + zlib.crc32(name.encode()))
            p.data.uniform_(-0.02, 0.02, generator=gen)


def draft_engine_config(cfg: EngineConfig) -> EngineConfig:
    """The options the draft model of `speculative_config` (method "draft_model") is built
    with: its own path and layer cut; the target's dtype, device, load format and seed. Its KV
    cache is in the model's dtype (no FP8 scales to carry) and its weights as its checkpoint
    has them."""
    spec = cfg.speculative
    assert spec is not None and spec.uses_draft_model
    return dataclasses.replace(
        cfg,
        model=spec.model,
        preset=None,
        tokenizer=None,
        quantization=None,
        kv_cache_dtype="auto",
        num_layers=spec.num_layers,
        speculative_config=None,
    )


def draft_source(cfg: EngineConfig) -> tuple[ModelSource, EngineConfig]:
    """Where the draft model of `cfg.speculative_config` comes from, and its build options;
    a wrong path is an error naming speculative_config.model."""
    draft_cfg = draft_engine_config(cfg)
    try:
        return resolve_source(draft_cfg), draft_cfg
    except ValueError as exc:
        raise ValueError(f"speculative_config.model: {exc}") from exc


def check_draft_model(draft: ModelConfig, target: ModelConfig, source: ModelSource) -> None:
    """A draft proposes token ids the target verifies: both must mean the same ids."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(
            f"speculative_config.model {source.name!r} has a vocabulary of {draft.vocab_size} "
            f"tokens, the target model {target.vocab_size}: a draft model must share the "
            "target's tokenizer and vocabulary"
        )
    have = source.config.get("num_hidden_layers")
    if isinstance(have, int) and draft.num_hidden_layers > have:
        raise ValueError(
            f"speculative_config.num_layers ({draft.num_hidden_layers}) exceeds the draft "
            f"model's {have} layers"
        )


def model_config_of(source: ModelSource, cfg: EngineConfig) -> ModelConfig:
    """The model's config as the engine runs it (`num_layers` cuts a large model down)."""
    config_dict = dict(source.config)
    if cfg.num_layers is not None:
        config_dict["num_hidden_layers"] = cfg.num_layers
    return ModelConfig.from_dict(config_dict)


def _first_layers(
    weights: Iterator[tuple[str, torch.Tensor]], num_layers: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint's tensors without those of decoder layers past the first `num_layers`
    (a model cut by `num_layers`: the early-exit draft, or a large model cut to fit)."""
    for name, tensor in weights:
        m = _LAYER_INDEX.match(name)
        if m is None or int(m.group(1)) < num_layers:
            yield name, tensor


def keep_gguf_packed(asked: bool) -> bool:
    """Whether a GGUF file's linear weights stay packed (the Triton kernels on CUDA; on CPU each
    layer is dequantized once with the torch reference): when `quantization="gguf"` asks for
    it. Without it they are dequantized at load, as before, until an H200 run has checked the
    packed kernels end to end (their speed per format: kernels/README.md).
    GRAPHWISE_GGUF_PACKED=1 forces packed weights, =0 dequantized ones."""
    forced = os.environ.get("GRAPHWISE_GGUF_PACKED", "")
    if forced in ("0", "1"):
        return forced == "1"
    return asked


def _resolve_quantization(
    source: ModelSource, cfg: EngineConfig, config_dict: dict[str, Any], device: torch.device
) -> quantization.QuantizationConfig | None:
    if source.kind == "gguf" and cfg.quantization in (None, "gguf"):
        if cfg.load_format == "dummy" or not keep_gguf_packed(cfg.quantization == "gguf"):
            return None  # dequantized at load
        assert source.path is not None
        return GgufConfig(gguf_tensor_types(source.path, config_dict))
    if cfg.quantization == "gguf":
        raise ValueError("quantization='gguf' needs a .gguf model file (--model FILE.gguf)")
    return quantization.resolve(cfg.quantization, config_dict.get("quantization_config"))


def build_model(
    source: ModelSource, cfg: EngineConfig, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, ModelConfig]:
    model_config = model_config_of(source, cfg)
    config_dict = model_config.raw
    cls = resolve_model_class(model_config.architecture)
    quant = _resolve_quantization(source, cfg, config_dict, device)
    if (
        quant is not None
        and quant.requires_checkpoint
        and source.kind != "preset"
        and cfg.load_format != "dummy"
    ):
        raise ValueError(
            f"quantization={quant.name!r} cannot quantize full-precision weights at load: "
            f"use a {quant.name} checkpoint (its config.json names it), or load_format='dummy'"
        )
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), quantization.building(quant):
            model = cls(model_config)  # type: ignore[call-arg]
            if quant is not None:
                create_quantized_weights(model, quant, model.checkpoint_names, dtype)  # type: ignore[operator]
    finally:
        torch.set_default_dtype(old_dtype)
    model.eval()

    start = time.perf_counter()
    load_format = cfg.load_format
    if source.kind == "preset" and load_format not in ("auto", "dummy"):
        raise ValueError(f"preset {source.name!r} has no weights: use load_format='dummy'")
    if source.kind == "preset" or load_format == "dummy":
        _dummy_init(model, cfg.seed)
    else:
        assert source.path is not None
        if source.kind == "gguf":
            packed = quant.packed if isinstance(quant, GgufConfig) else ()
            weights = gguf_weights(source.path, config_dict, packed)
        else:
            weights = _safetensors_weights(_safetensors_files(source.path))
        if cfg.num_layers is not None:
            weights = _first_layers(weights, model_config.num_hidden_layers)
        loaded = model.load_weights(  # type: ignore[operator]
            w for w in tqdm(weights, desc=f"Loading {source.name}", unit="tensor")
        )
        missing = model.expected_weights() - loaded  # type: ignore[operator]
        if missing:
            raise ValueError(
                f"checkpoint {source.path} lacks {len(missing)} tensor(s), e.g. {sorted(missing)[:3]}"
            )
    process_after_loading(model)
    logger.info(
        "Loaded %s (%s, %d layers, %.2f GiB of weights) as %s%s on %s in %.1f s",
        source.name,
        model_config.architecture,
        model_config.num_hidden_layers,
        sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
        str(dtype).removeprefix("torch."),
        f" with {quant.describe()} weights" if quant is not None else "",
        device,
        time.perf_counter() - start,
    )
    return model, model_config


def load_tokenizer(source: ModelSource, cfg: EngineConfig) -> Any | None:
    """The HF tokenizer (with its chat template), from local files only; None for presets."""
    from transformers import AutoTokenizer

    if cfg.tokenizer is not None:
        path = Path(cfg.tokenizer)
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if source.kind == "preset":
        return None
    assert source.path is not None
    if source.kind == "gguf":
        if not gguf_has_tokenizer(source.path):
            logger.warning("%s has no tokenizer: only prompt_token_ids are accepted", source.path)
            return None
        return AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    if not any((source.path / f).is_file() for f in _TOKENIZER_FILES):
        logger.warning("%s has no tokenizer files: only prompt_token_ids are accepted", source.path)
        return None
    return AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
