"""The per-step structured-output mask fill (engine/mask_fill.py): rows filled in parallel are
bit for bit what each row's matcher fills alone, for many rows of many constraints at many
depths (terminated ones included); rows without a live matcher allow every token, and the
logits of unconstrained rows are left as they are.

Oracle: xgrammar's own `GrammarMatcher.fill_next_token_bitmask` into a fresh one-row mask, and
`apply_token_bitmask_inplace` for the application."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest
import torch

from graphwise import SamplingParams, StructuredOutputsParams
from graphwise.config import EngineConfig
from graphwise.engine.mask_fill import MIN_ROWS_PER_THREAD, MaskFiller, default_fill_threads
from graphwise.engine.structured import RequestGrammar, StructuredOutputs
from graphwise.runner.inputs import Uploader
from graphwise.runner.logits_processors import apply_grammar_bitmask
from tests.engine.test_structured_output import SCHEMA as RECORD

xgr = pytest.importorskip("xgrammar")

ARTICLE = {  # benchmarks/structured_bench.py's: long strings with length bounds
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer"},
        "summary": {"type": "string", "minLength": 60},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "year", "summary", "tags"],
}
NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "score": {"type": "number"},
        "owner": {
            "type": "object",
            "properties": {"email": {"type": "string"}, "admin": {"type": "boolean"}},
            "required": ["email"],
        },
        "items": {
            "type": "array",
            "items": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
        },
    },
    "required": ["id", "owner", "items"],
}
CONSTRAINTS = [
    StructuredOutputsParams(json=RECORD, disable_any_whitespace=True),
    StructuredOutputsParams(json=ARTICLE, disable_any_whitespace=True),
    StructuredOutputsParams(json=NESTED),  # any whitespace
    StructuredOutputsParams(json_object=True),
    StructuredOutputsParams(regex=r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"),
    StructuredOutputsParams(choice=["red", "green", "blue sky"]),
    StructuredOutputsParams(grammar='root ::= "(" d ("+" d){0,3} ")"\nd ::= [0-9]'),
]
DEPTHS = [0, 1, 2, 4, 7, 12, 20, 40]


def _allowed(mask: torch.Tensor, vocab: int) -> np.ndarray:
    bits = np.unpackbits(mask.numpy().reshape(-1).view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab])


def _reference(matcher, words: int) -> torch.Tensor:
    """What the matcher fills alone; every token where the filler must allow every token."""
    if matcher is None or matcher.is_terminated():
        return torch.full((words,), -1, dtype=torch.int32)
    one = torch.zeros((1, words), dtype=torch.int32)
    matcher.fill_next_token_bitmask(one, 0)
    return one[0] if one.any() else torch.full((words,), -1, dtype=torch.int32)


@pytest.fixture(scope="module")
def structured(tiny_chat_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_dir)
    # 64 ids past the tokenizer's, as a preset's padded vocabulary: never allowed.
    so = StructuredOutputs(tok, len(tok) + 64, frozenset({tok.eos_token_id}))
    yield so
    so.shutdown()


@pytest.fixture(scope="module")
def rows(structured):
    """Matchers of every constraint advanced by seeded random allowed tokens (some until they
    end), shuffled, with unconstrained (None) rows among them."""
    vocab = structured.vocab_size
    compiled = [structured.request_grammar(c).future.result() for c in CONSTRAINTS]
    rng = np.random.default_rng(0)
    out: list = []
    terminated = 0
    for grammar in compiled * 2:
        for depth in DEPTHS:
            m = xgr.GrammarMatcher(grammar, override_stop_tokens=structured.stop_ids)
            for _ in range(depth):
                if m.is_terminated():
                    break
                allowed = _allowed(_reference(m, structured.words), vocab)
                assert m.accept_token(int(rng.choice(allowed)))
            terminated += m.is_terminated()
            out.append(m)
    out += [None] * 9
    order = rng.permutation(len(out))
    out = [out[i] for i in order]
    assert terminated >= 3  # the short constraints end within these depths
    return out


@pytest.mark.parametrize("threads", [2, 3, 5, 8])
def test_parallel_fill_equals_serial_fill_bit_for_bit(structured, rows, threads):
    words = structured.words
    serial = MaskFiller(words, threads=1).fill(rows)
    filler = MaskFiller(words, threads=threads)
    try:
        live = sum(m is not None and not m.is_terminated() for m in rows)
        assert live >= 8 * MIN_ROWS_PER_THREAD
        assert filler.num_chunks(live) == threads  # the rows really are split over threads
        parallel = filler.fill(rows)
        again = filler.fill(rows[::-1])  # the pool is reused; other rows land in each chunk
    finally:
        filler.shutdown()
    assert parallel.dtype == torch.int32 and parallel.shape == (len(rows), words)
    assert torch.equal(parallel, serial)
    assert torch.equal(again, serial.flip(0))
    for i, m in enumerate(rows):
        assert torch.equal(serial[i], _reference(m, words)), i


def test_a_fill_does_not_wait_for_pool_threads_that_have_not_started(structured, rows):
    """With every pool thread busy elsewhere (as when the host's cores are all taken), the
    caller fills every chunk itself: the fill ends, with the serial fill's words."""
    import threading

    serial = MaskFiller(structured.words, threads=1).fill(rows)
    filler = MaskFiller(structured.words, threads=4)
    filler.fill(rows)  # starts the pool
    release = threading.Event()
    blockers = [filler._get_pool().submit(release.wait, 30) for _ in range(3)]
    try:
        result: list = []
        t = threading.Thread(target=lambda: result.append(filler.fill(rows)))
        t.start()
        t.join(timeout=20)
        assert not t.is_alive(), "the fill waited for a pool thread that never started"
        assert torch.equal(result[0], serial)
    finally:
        release.set()
        for b in blockers:
            b.result()
        filler.shutdown()


def test_a_fill_writes_every_word_of_its_rows(structured, rows, monkeypatch):
    """The filler's buffer is `torch.empty`: what it held before must not show through, in
    the rows xgrammar fills or the ones the filler sets to every token."""
    from graphwise.engine import mask_fill

    def poisoned(*shape, **kw):
        return torch.full(*shape, 0x5A5A5A5A, dtype=kw["dtype"])

    monkeypatch.setattr(mask_fill.torch, "empty", poisoned)
    for threads in (1, 3):
        filler = MaskFiller(structured.words, threads=threads)
        try:
            mask = filler.fill(rows)
        finally:
            filler.shutdown()
        for i, m in enumerate(rows):
            assert torch.equal(mask[i], _reference(m, structured.words)), (threads, i)


def test_filling_leaves_the_matchers_as_they_were(structured, rows):
    """A fill reads the matchers: filling twice gives the same words (no state advanced)."""
    filler = MaskFiller(structured.words, threads=4)
    try:
        first = filler.fill(rows)
        assert torch.equal(filler.fill(rows), first)
    finally:
        filler.shutdown()


def test_rows_without_a_live_matcher_allow_every_token(structured, rows):
    compiling: Future = Future()  # a grammar still compiling: its row is not constrained yet
    pending = RequestGrammar(compiling, ("json", "{}"), structured.stop_ids)
    grammars = [None, pending] + [
        None if m is None else _with_matcher(m, structured.stop_ids) for m in rows[:12]
    ]
    mask = structured.fill(grammars)
    assert torch.equal(mask[:2], torch.full((2, structured.words), -1, dtype=torch.int32))
    for i, m in enumerate(rows[:12]):
        assert torch.equal(mask[2 + i], _reference(m, structured.words))
    assert structured.num_fills >= 1 and len(structured.recent_fill_s) >= 1
    # ids past the tokenizer's are never allowed in a constrained row
    live = [2 + i for i, m in enumerate(rows[:12]) if m is not None and not m.is_terminated()]
    assert live
    tail = _allowed(mask[live[0]], structured.vocab_size)
    assert tail.max() < structured.vocab_size - 64


def _with_matcher(matcher, stop_ids) -> RequestGrammar:
    done: Future = Future()
    done.set_result(None)
    g = RequestGrammar(done, ("x", "y"), stop_ids)
    g.matcher = matcher
    return g


def test_masks_applied_leave_unconstrained_rows_alone(structured, rows):
    """The filled mask applied by the runner: constrained rows equal xgrammar's kernel on the
    same words; the other rows of the batch keep their logits exactly."""
    constrained = [m for m in rows if m is not None][:10]
    mask = MaskFiller(structured.words, threads=1).fill(constrained)
    n = 16
    where = [0, 2, 3, 5, 7, 8, 10, 11, 13, 15]  # sampled rows under a constraint
    torch.manual_seed(0)
    logits = torch.randn(n, structured.vocab_size)
    ours = logits.clone()
    apply_grammar_bitmask(ours, where, mask, Uploader(torch.device("cpu")))
    via_numpy = logits.clone()
    apply_grammar_bitmask(via_numpy, where, mask.numpy(), Uploader(torch.device("cpu")))
    ref = logits.clone()
    full = torch.full((n, structured.words), -1, dtype=torch.int32)
    full[where] = mask
    xgr.apply_token_bitmask_inplace(ref, full)
    assert torch.equal(ours, ref) and torch.equal(via_numpy, ref)
    others = [i for i in range(n) if i not in where]
    assert torch.equal(ours[others], logits[others])
    assert not torch.equal(ours[where], logits[where])  # the constraints did mask something


def test_fill_threads_setting():
    assert default_fill_threads(cpus=1) == 1
    assert default_fill_threads(cpus=2) == 1
    assert default_fill_threads(cpus=16) == 8
    assert default_fill_threads(cpus=128) == 8
    assert MaskFiller(8).threads == default_fill_threads()
    assert MaskFiller(8, threads=3).threads == 3
    with pytest.raises(ValueError, match="structured_outputs_fill_threads"):
        EngineConfig(structured_outputs_fill_threads=0)
    with pytest.raises(ValueError, match="positive integer"):
        MaskFiller(8, threads=0)


def test_fill_threads_flag():
    import argparse

    from graphwise.config import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--structured-outputs-fill-threads", "3"])
    assert engine_config_from_args(args).structured_outputs_fill_threads == 3
    assert engine_config_from_args(parser.parse_args([])).structured_outputs_fill_threads is None


@pytest.mark.slow
def test_engine_with_parallel_fill_gives_the_serial_engines_tokens(tiny_chat_dir):
    """End to end: 16 constrained rows sampled at temperature 1 give the same tokens whether
    the masks are filled by one thread or two (async scheduling: sampling deferred)."""
    from graphwise import LLM

    prompts = [f"Record {i}:" for i in range(16)]
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=48, structured_outputs=c)
        for i, c in enumerate(CONSTRAINTS * 3)
    ][:16]
    outs = {}
    for threads in (1, 2):
        llm = LLM(model=str(tiny_chat_dir), max_num_seqs=16, max_model_len=512,
                  structured_outputs_fill_threads=threads)  # fmt: skip
        try:
            assert llm.llm_engine.structured.filler.threads == threads
            got = llm.generate(prompts, params, use_tqdm=False)
            outs[threads] = [o.outputs[0].token_ids for o in got]
            filler = llm.llm_engine.structured.filler
            assert llm.llm_engine.structured.num_fills > 0
            assert (filler._pool is not None) == (threads > 1)  # some fills ran in parallel
        finally:
            llm.shutdown()
    assert outs[1] == outs[2]
    assert sum(len(t) for t in outs[1]) > 16 * 4  # real outputs, not empty ones
