"""Worker processes never outlive the engine, and a failing rank is an error, not a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import hf_greedy
from tests.distributed.conftest import GREEDY, alive, generate, prompts, worker_pids

# Starts processes (servers, ranks): run by .ci/run, left out of the inner loop (-m "not slow").
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def _wait_gone(pids: list[int], within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


PARENT = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from graphwise import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(model={path!r}, block_size=8, **{options!r})
    engine = llm.llm_engine
    if hasattr(engine, "replicas"):
        pids = [r.proc.pid for r in engine.replicas]
    else:
        pids = engine.executor.worker_pids
    out = llm.generate({{"prompt_token_ids": [1, 2, 3]}}, SamplingParams(max_tokens=4), use_tqdm=False)
    print(json.dumps({{"pids": pids, "tokens": out[0].outputs[0].token_ids}}), flush=True)
    if {linger!r}:
        time.sleep(600)
"""


def _start_parent(path: Path, options: dict, linger: bool) -> tuple[subprocess.Popen, list[int]]:
    code = PARENT.format(root=str(ROOT), path=str(path), options=options, linger=linger)
    proc = subprocess.Popen(
        [PYTHON, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the parent exited early (code {proc.wait()})"
    info = json.loads(line)
    assert len(info["tokens"]) == 4
    return proc, info["pids"]


def test_shutdown_stops_workers_and_frees_the_process_group(tiny_model_dir, make_llm):
    llm = make_llm(tiny_model_dir("llama"), tensor_parallel_size=2, pipeline_parallel_size=2)
    pids = worker_pids(llm)
    assert len(pids) == 3 and all(alive(p) for p in pids)
    llm.shutdown()
    assert _wait_gone(pids, 5) == []
    with pytest.raises(RuntimeError, match="workers are gone"):
        generate(llm, prompts()[:1])
    llm.shutdown()  # idempotent
    again = make_llm(tiny_model_dir("llama"), tensor_parallel_size=2)  # the group was released
    assert len(generate(again, prompts()[:1])[0]) == GREEDY.max_tokens


def test_parent_that_exits_without_shutdown_leaves_no_workers(tiny_model_dir):
    proc, pids = _start_parent(tiny_model_dir("llama"), {"tensor_parallel_size": 2}, linger=False)
    assert proc.wait(timeout=60) == 0
    assert _wait_gone(pids, 10) == []


@pytest.mark.parametrize(
    "options", [{"tensor_parallel_size": 2}, {"data_parallel_size": 2}], ids=["tp2", "dp2"]
)
def test_killed_parent_leaves_no_workers(tiny_model_dir, options):
    proc, pids = _start_parent(tiny_model_dir("llama"), options, linger=True)
    try:
        assert all(alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert _wait_gone(pids, 10) == [], "workers outlived their SIGKILLed parent"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    "mode, message",
    [
        ("raise", "(?s)rank 1 raised:.*injected failure at the first step of rank 1"),
        ("exit", "rank 1 exited \\(exit code 3\\)"),
        ("hang", "(?s)rank 0: .*[Tt]imed out.*rank 1 is still running and did not answer"),
    ],
)
def test_failing_rank_is_an_error_on_the_caller(
    mode, message, tiny_model_dir, make_llm, monkeypatch
):
    monkeypatch.setenv("GRAPHWISE_TEST_FAIL_RANK", "1")
    monkeypatch.setenv("GRAPHWISE_TEST_FAIL_MODE", mode)
    monkeypatch.setenv("GRAPHWISE_DISTRIBUTED_TIMEOUT_S", "3")  # the hang: a collective timeout
    llm = make_llm(tiny_model_dir("llama"), tensor_parallel_size=2)
    pids = worker_pids(llm)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=message):
        generate(llm, prompts()[:2])
    assert time.monotonic() - start < 20
    assert _wait_gone(pids, 5) == []
    with pytest.raises(RuntimeError, match="workers are gone"):
        generate(llm, prompts()[:1])


def test_rank_that_fails_to_load_is_an_error_on_the_caller(tiny_model_dir, monkeypatch):
    from graphwise import LLM

    monkeypatch.setenv("GRAPHWISE_TEST_FAIL_RANK", "1")
    monkeypatch.setenv("GRAPHWISE_TEST_FAIL_MODE", "load")
    with pytest.raises(
        RuntimeError, match="(?s)rank 1 failed to start:.*injected failure while load"
    ):
        LLM(model=str(tiny_model_dir("llama")), tensor_parallel_size=2)
    with pytest.raises(
        RuntimeError, match="(?s)replica \\d failed to start:.*injected failure while"
    ):
        LLM(model=str(tiny_model_dir("llama")), data_parallel_size=2, tensor_parallel_size=2)


TORCHRUN_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from graphwise import LLM, SamplingParams

llm = LLM(model={path!r}, block_size=8, tensor_parallel_size=2)  # ranks > 0 serve, then exit
outs = llm.generate([{{"prompt_token_ids": p}} for p in {prompts!r}],
                    SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
print("TOKENS " + json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
llm.shutdown()
"""


def test_torchrun_environment_joins_the_group(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen2")
    ps = prompts()[:3]
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT.format(root=str(ROOT), path=str(path), prompts=ps))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("TOKENS ")]
    assert len(lines) == 1  # only rank 0 came back from LLM(...)
    assert json.loads(lines[0][len("TOKENS ") :]) == hf_greedy(path, ps, 8)


def test_cluster_close_releases_graphs_before_destroying_the_group(monkeypatch):
    """Captured graphs hold NCCL work; destroying the group while they live hangs on GPUs
    (pytorch#115388). Order: graphs released, then the group destroyed."""
    from graphwise.distributed import parallel_state
    from graphwise.executor import multiproc

    events: list[str] = []

    class FakeDriver:
        def release_graphs(self) -> None:
            events.append("release graphs")

    monkeypatch.setattr(parallel_state, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel_state, "destroy", lambda: events.append("destroy"))
    cluster = multiproc._Cluster(FakeDriver(), None)  # type: ignore[arg-type]
    cluster.close()
    assert events == ["release graphs", "destroy"]
    cluster.close()  # idempotent
    assert events == ["release graphs", "destroy"]
