"""On a GPU: prompt logprobs (pinned copies behind the step's event, Triton attention, async
scheduling) equal HF's on a tiny model, and a long prompt over a 152k vocabulary goes through in
slices with the same numbers chunked or not."""

from __future__ import annotations

import random
import time

import pytest
import torch

from graphwise import LLM, SamplingParams
from graphwise.runner import logprobs as runner_logprobs
from tests.conftest import hf_reference

pytestmark = pytest.mark.gpu


def test_tiny_model_equals_hf(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(runner_logprobs, "PROMPT_SLICE_ELEMENTS", 3 * 512)
    path = tiny_model_dir("qwen2")
    rng = random.Random(3)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (37, 5, 64)]
    llm = LLM(model=str(path), dtype="float32", max_num_batched_tokens=16, max_num_seqs=4)
    params = [
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=k)
        for k in (3, 0, 5)
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf = hf_reference(path)
    for out, prompt, p in zip(outs, prompts, params, strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].float(), -1)
        entries = out.prompt_logprobs
        assert entries[0] is None and len(entries) == len(prompt)
        for i, entry in enumerate(entries[1:]):
            token = prompt[i + 1]
            assert entry[token].logprob == pytest.approx(ref[i, token].item(), abs=1e-3)
            assert entry[token].rank == int((ref[i] > ref[i, token]).sum()) + 1
            if p.prompt_logprobs:
                top = ref[i].topk(p.prompt_logprobs).indices.tolist()
                assert list(entry)[: p.prompt_logprobs] == top


def test_long_prompt_large_vocab_chunked_or_not():
    rng = random.Random(5)
    prompt = [rng.randrange(150000) for _ in range(3000)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5)
    got = []
    for budget in (4096, 512):
        llm = LLM(
            preset="qwen2.5-7b",
            num_layers=2,
            max_model_len=4096,
            max_num_batched_tokens=budget,
            kv_cache_memory=1 << 30,
            enable_prefix_caching=False,  # the plain runs time a whole prefill each
        )
        plain = SamplingParams(temperature=0, max_tokens=1)
        llm.generate({"prompt_token_ids": prompt}, plain, use_tqdm=False)  # warm up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate({"prompt_token_ids": prompt}, plain, use_tqdm=False)
        t1 = time.perf_counter()
        (out,) = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
        t2 = time.perf_counter()
        print(f"budget {budget}: prefill {1e3 * (t1 - t0):.1f} ms, with prompt_logprobs=5 "
              f"{1e3 * (t2 - t1):.1f} ms")  # fmt: skip
        assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == len(prompt)
        got.append(out.prompt_logprobs)
        del llm
        torch.cuda.empty_cache()
    a, b = got
    for i in range(1, len(prompt)):
        t = prompt[i]
        assert a[i][t].logprob == pytest.approx(b[i][t].logprob, abs=0.1)  # bf16, chunked
