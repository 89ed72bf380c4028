"""On a GPU: structured-output masks filled straight into pinned memory (engine/mask_fill.py)
reach the device in one asynchronous copy and mask the logits exactly as the CPU path does;
an engine on CUDA fills pinned masks, and its constrained outputs equal the CPU-filled ones'
under async scheduling (each mask's copy is ordered before its sampling)."""

from __future__ import annotations

import json

import pytest
import torch

from graphwise import LLM, SamplingParams, StructuredOutputsParams
from graphwise.engine.mask_fill import MaskFiller
from graphwise.runner.inputs import Uploader
from graphwise.runner.logits_processors import apply_grammar_bitmask

pytestmark = pytest.mark.gpu
xgr = pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
    "required": ["name", "n"],
}


def test_pinned_mask_applied_on_the_gpu_equals_the_cpu_path(tiny_chat_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_dir)
    vocab = len(tok)
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok)).compile_json_schema(
        json.dumps(SCHEMA)
    )
    matchers = []
    for text in ['{"name": "a', '{"name": "ab", "n": 1', "", '{"name"']:
        m = xgr.GrammarMatcher(compiled)
        assert m.accept_string(text)
        matchers.append(m)
    words = (vocab + 31) // 32
    filler = MaskFiller(words, threads=2, pin_memory=True)
    mask = filler.fill(matchers * 4)
    filler.shutdown()
    assert mask.is_pinned()
    torch.manual_seed(0)
    logits = torch.randn(20, vocab)
    rows = [i for i in range(20) if i % 5 != 4]  # 16 constrained, 4 not
    cpu = logits.clone()
    apply_grammar_bitmask(cpu, rows, mask.clone(), Uploader(torch.device("cpu")))
    gpu = logits.cuda()
    apply_grammar_bitmask(gpu, rows, mask, Uploader(torch.device("cuda")))
    assert torch.equal(gpu.cpu(), cpu)


def test_cuda_engine_fills_pinned_masks_with_the_same_outputs(tiny_chat_dir):
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=40, structured_outputs=so)
        for i in range(8)
    ]
    prompts = [f"Item {i}:" for i in range(8)]
    outs = []
    for fill_threads in (1, 4):
        llm = LLM(model=str(tiny_chat_dir), dtype="float32", max_num_seqs=8,
                  structured_outputs_fill_threads=fill_threads)  # fmt: skip
        try:
            got = llm.generate(prompts, params, use_tqdm=False)
            assert llm.llm_engine.structured.filler.pin_memory
            outs.append([o.outputs[0].token_ids for o in got])
            for o in got:
                if o.outputs[0].finish_reason == "stop":  # the grammar ended it: valid JSON
                    json.loads(o.outputs[0].text)
        finally:
            llm.shutdown()
    assert outs[0] == outs[1]
