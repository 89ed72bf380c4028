"""kernels/sampling.py against the torch paths it replaces: the penalties bit for bit
(runner/logits_processors.py penalize_reference), and the sampled logprobs' rank and top-k
(runner/logprobs.py sampled_logprobs). On the CPU through Triton's interpreter (small
vocabularies), on a GPU at Qwen2.5-7B's vocabulary too."""

from __future__ import annotations

import pytest
import torch

from graphwise.runner import logprobs as lp_mod
from graphwise.runner.logits_processors import penalize_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _packed_counts(history: list[list[int]], prompt_lens: list[int], vocab: int) -> torch.Tensor:
    """TokenHistory.counts' layout, built plainly: bit 0 = seen, bits 1.. = generated count."""
    counts = torch.zeros((len(history), vocab + 1), dtype=torch.int32)
    for r, (tokens, p) in enumerate(zip(history, prompt_lens, strict=True)):
        for pos, t in enumerate(tokens):
            counts[r, t] |= 1
            if pos >= p:
                counts[r, t] += 2
    return counts


def _penalty_case(num_rows: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((num_rows, vocab), generator=g) * 4
    logits[0, :7] = float("-inf")  # masked tokens stay masked
    logits[-1, 3] = 0.0  # zero: neither branch of the repetition rule moves it
    rows = torch.randperm(num_rows, generator=g)[: max(1, num_rows - 1)]
    history, prompt_lens = [], []
    for _ in range(rows.shape[0]):
        n = int(torch.randint(1, 60, (1,), generator=g))
        # few distinct ids, so tokens repeat in the prompt and in the output
        history.append(torch.randint(0, 40, (n,), generator=g).tolist() + [0, 3, 5])
        prompt_lens.append(int(torch.randint(0, n, (1,), generator=g)))
    counts = _packed_counts(history, prompt_lens, vocab)
    r = rows.shape[0]
    rep = 1.0 + torch.rand(r, generator=g)
    pres = torch.rand(r, generator=g) * 2 - 0.5
    freq = torch.rand(r, generator=g) * 2 - 0.5
    return logits, rows, counts, rep, pres, freq


@pytest.mark.parametrize("num_rows,vocab", [(1, 97), (5, 3000), (9, 4097)])
def test_penalties_kernel_equals_torch(kern, num_rows, vocab):
    from graphwise.kernels.sampling import apply_penalties_

    logits, rows, counts, rep, pres, freq = _penalty_case(num_rows, vocab, seed=vocab)
    want = logits.clone()
    penalize_reference(want, rows, counts, rep, pres, freq)
    assert not torch.equal(want, logits)  # the case does penalize
    got = logits.to(DEVICE)
    tensors = [t.to(DEVICE) for t in (rows, counts, rep, pres, freq)]
    apply_penalties_(got, *tensors)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


def test_packed_counts_match_token_history(kern):
    """TokenHistory.counts packs what _packed_counts spells out."""
    from graphwise.runner.inputs import Uploader
    from graphwise.runner.logits_processors import TokenHistory

    history = TokenHistory(torch.device("cpu"), first_slots=2)
    history.set_max_len(16)
    tokens = {"a": [4, 4, 2, 9, 4, 2], "b": [1, 2, 3]}
    for rid, ts in tokens.items():
        slot = history._slot(rid)
        assert history.buffer is not None
        history.buffer[slot, : len(ts)] = torch.tensor(ts, dtype=torch.int32)
    got = history.counts(["a", "b"], [6, 2], [3, 0], 10, Uploader(torch.device("cpu")))
    want = _packed_counts([tokens["a"], tokens["b"][:2]], [3, 0], 10)
    assert torch.equal(got[:, :10], want[:, :10])  # column 10 takes the padding


def _logprob_case(num_rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((num_rows, vocab), generator=g) * 3
    logits[0, : vocab // 2] = float("-inf")  # a half-masked row
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("num_rows,vocab,k", [(1, 50, 5), (4, 5000, 5), (3, 9000, 20), (2, 8, 8)])
def test_rank_and_topk_equals_torch(kern, num_rows, vocab, k):
    from graphwise.kernels.sampling import MAX_KERNEL_TOPK, rank_and_topk

    assert lp_mod.MAX_KERNEL_TOPK == MAX_KERNEL_TOPK
    lp = _logprob_case(num_rows, vocab, seed=vocab + k)
    tokens = torch.randint(0, vocab, (num_rows,))
    tokens[0] = 0  # a -inf token: every finite logprob ranks above it
    token_lp = lp.gather(1, tokens[:, None])
    want_rank = (lp > token_lp).sum(dim=-1, keepdim=True) + 1
    want_lp, want_ids = lp.topk(k, dim=-1)
    rank, top_lp, top_ids = rank_and_topk(lp.to(DEVICE), token_lp.to(DEVICE), k)
    assert rank.dtype == top_ids.dtype == torch.int64
    assert torch.equal(rank.cpu(), want_rank)
    assert torch.equal(top_lp.cpu(), want_lp)
    finite = torch.isfinite(want_lp)  # distinct random values: the ids agree too
    assert torch.equal(top_ids.cpu()[finite], want_ids[finite])


def test_sampled_logprobs_triton_path_equals_torch_path(kern):
    """The runner's entry point, each row's own k, with and without the kernel."""
    from graphwise.runner.inputs import Uploader

    lp = _logprob_case(3, 3000, seed=1).to(DEVICE)
    tokens = torch.tensor([5, 17, 2999], device=DEVICE)
    wanted = [(0, 2), (1, 0), (2, 5)]
    up = Uploader(torch.device(DEVICE))
    _, v_ref, i_ref = lp_mod.sampled_logprobs(lp, tokens, wanted, up)
    _, v_tri, i_tri = lp_mod.sampled_logprobs(lp, tokens, wanted, up, use_triton=True)
    assert torch.equal(v_tri, v_ref) and torch.equal(i_tri, i_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_at_qwen_vocab_on_gpu(kern):
    from graphwise.kernels.sampling import apply_penalties_, rank_and_topk

    vocab = 152064
    logits, rows, counts, rep, pres, freq = _penalty_case(64, vocab, seed=3)
    logits, rows, counts, rep, pres, freq = (
        t.cuda() for t in (logits, rows, counts, rep, pres, freq)
    )
    want = logits.clone()
    penalize_reference(want, rows, counts, rep, pres, freq)
    apply_penalties_(logits, rows, counts, rep, pres, freq)
    assert torch.equal(logits, want)
    lp = torch.log_softmax(logits, dim=-1)
    tokens = torch.randint(0, vocab, (64, 1), device="cuda")
    token_lp = lp.gather(1, tokens)
    rank, top_lp, _ = rank_and_topk(lp, token_lp, 5)
    assert torch.equal(rank, (lp > token_lp).sum(dim=-1, keepdim=True) + 1)
    assert torch.equal(top_lp, lp.topk(5, dim=-1).values)


def test_engine_with_sampling_kernels_equals_torch_path(kern, tiny_model_dir, monkeypatch):
    """A whole run with penalties and logprobs through the kernels (interpreted on the CPU):
    the same tokens, logprobs and ranks as the torch path."""
    from graphwise import LLM, SamplingParams
    from graphwise.kernels import sampling
    from graphwise.runner.model_runner import ModelRunner

    prompts = [{"prompt_token_ids": p} for p in ([5, 9, 13, 2, 77, 5, 9], [100, 3, 3, 41])]
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3,
                       presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=1.3),
        SamplingParams(temperature=0.8, seed=5, max_tokens=6, ignore_eos=True, logprobs=0,
                       repetition_penalty=0.8, frequency_penalty=-0.4),
    ]  # fmt: skip

    def run() -> list:
        llm = LLM(model=str(tiny_model_dir("llama")))
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]

    want = run()
    allocate = ModelRunner.allocate_kv_cache

    def with_kernels(self, num_blocks):
        allocate(self, num_blocks)
        self.triton_sampling = True

    calls: list[str] = []

    def counted(fn):
        def call(*args):
            calls.append(fn.__name__)
            return fn(*args)

        return call

    monkeypatch.setattr(ModelRunner, "allocate_kv_cache", with_kernels)
    for name in ("apply_penalties_", "rank_and_topk"):
        monkeypatch.setattr(sampling, name, counted(getattr(sampling, name)))
    assert run() == want
    assert {"apply_penalties_", "rank_and_topk"} <= set(calls)  # the kernels did run
