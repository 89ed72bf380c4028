"""One bad request fails alone: refused at admission when its ids do not fit the model, and if
something still breaks a step, only the requests that caused it fail; the others finish with the
tokens they would have had, and the engine serves on."""

from __future__ import annotations

import pytest

from graphwise import LLM, SamplingParams
from graphwise.engine.validation import InvalidRequest

LONG = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4], [9, 8, 7], [5, 5, 5, 5, 5, 6]]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=str(tiny_model_dir("llama")), max_num_seqs=8, block_size=8)


def _run(engine, rids):
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[r] for r in rids]


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(stop_token_ids=[512]), "stop_token_ids"),
        (SamplingParams(stop_token_ids=[-1], min_tokens=2), "stop_token_ids"),
        (SamplingParams(stop_token_ids=[2**40]), "stop_token_ids"),
    ],
)
def test_out_of_vocabulary_ids_are_refused_at_admission(llm, params, field):
    with pytest.raises(
        InvalidRequest, match=r"stop_token_ids contains .* not a token id in \[0, 512\)"
    ) as e:
        llm.llm_engine.add_request(None, params, prompt_token_ids=[1, 2])
    assert e.value.param == field
    with pytest.raises(ValueError, match="prompt_token_ids contains 512"):
        llm.generate({"prompt_token_ids": [1, 512]}, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_request_that_breaks_the_step_fails_alone(llm, caplog):
    engine = llm.llm_engine
    clean = [
        o.outputs[0].token_ids
        for o in _run(engine, [engine.add_request(None, LONG, p) for p in PROMPTS])
    ]

    rids = [engine.add_request(None, LONG, p) for p in PROMPTS]
    for _ in range(3):
        engine.step()  # the long requests are decoding
    # What admission refuses, slipped in behind its back: an id past the vocabulary that the
    # step would use (banned while below min_tokens).
    bad_params = SamplingParams(temperature=0, max_tokens=8, min_tokens=4, stop_token_ids=[7])
    bad = engine.add_request(None, bad_params, prompt_token_ids=[3, 3, 3])
    bad_params.stop_token_ids.append(600)
    with caplog.at_level("ERROR", logger="graphwise.engine.engine"):
        outs = _run(engine, [*rids, bad])
    *long, failed = outs
    assert [o.outputs[0].token_ids for o in long] == clean  # as if nothing had happened
    assert all(o.outputs[0].finish_reason == "length" for o in long)
    assert failed.outputs[0].finish_reason == "error" and "600" in failed.error
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 1 and "token id 600" in errors[0]
    assert engine.block_manager.num_used_blocks == 0
    # ...and it serves on.
    again = _run(engine, [engine.add_request(None, LONG, p) for p in PROMPTS])
    assert [o.outputs[0].token_ids for o in again] == clean


def test_a_failure_no_request_explains_fails_that_step_only(tiny_model_dir, monkeypatch):
    llm = LLM(model=str(tiny_model_dir("llama")), max_num_seqs=2, block_size=8)
    engine = llm.llm_engine
    runner = engine.executor.driver
    rids = [engine.add_request(None, LONG, p) for p in PROMPTS]  # the third waits for a slot
    engine.step()
    engine.step()
    real = runner._execute
    calls = {"n": 0}

    def broken_once(step):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the device said no")
        return real(step)

    monkeypatch.setattr(runner, "_execute", broken_once)
    first, second, waiting = _run(engine, rids)
    for out in (first, second):
        assert out.outputs[0].finish_reason == "error" and "the device said no" in out.error
    assert waiting.outputs[0].finish_reason == "length"  # not in that step: unharmed
    assert len(waiting.outputs[0].token_ids) == LONG.max_tokens
    assert engine.block_manager.num_used_blocks == 0
