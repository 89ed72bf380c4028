"""The data-parallel front's bookkeeping, driven by scripted replica messages (no processes)."""

import multiprocessing

from graphwise.config import EngineConfig
from graphwise.engine.client import EngineStats
from graphwise.engine.data_parallel import (
    DataParallelEngine,
    DPRequest,
    _Replica,
    _Replicas,
    replica_config_of,
)


class _GoneProcess:
    exitcode = 1

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return False


def _front(n_replicas: int) -> tuple[DataParallelEngine, list]:
    front = DataParallelEngine.__new__(DataParallelEngine)
    front._pool = _Replicas()
    front.replicas = front._pool.replicas
    front.requests = {}
    children = []
    for i in range(n_replicas):
        parent, child = multiprocessing.Pipe()
        front.replicas.append(_Replica(i, _GoneProcess(), parent))
        children.append(child)
    return front, children


def _route(front: DataParallelEngine, rid: str, replica: int) -> None:
    front.requests[rid] = DPRequest(rid, replica, [1, 2, 3])
    front.replicas[replica].unfinished += 1


def test_every_request_fails_when_the_last_replica_dies_before_its_rejections_arrive():
    """Both replicas lose their workers on a step that held only their first request; the
    requests that reached them afterwards must still be answered, not dropped with the pool."""
    front, children = _front(2)
    for rid, replica in (("a", 0), ("b", 0), ("c", 1), ("d", 1)):
        _route(front, rid, replica)
    children[0].send(("step_failed", "RuntimeError: boom", ["a"], EngineStats(), False))
    children[1].send(("step_failed", "RuntimeError: boom", ["c"], EngineStats(), False))
    outs = []
    while len(outs) < 4 and not front._pool.closed:
        outs.extend(front.step())
    assert sorted(o.request_id for o in outs) == ["a", "b", "c", "d"]
    assert all(o.finished and o.outputs[0].finish_reason == "error" for o in outs)
    errors = {o.request_id: o.error for o in outs}
    assert "boom" in errors["a"] and "boom" in errors["c"]
    assert "workers are gone" in errors["b"] and "workers are gone" in errors["d"]
    assert not front.alive and not front.requests


def test_one_dead_replica_leaves_the_other_serving():
    front, children = _front(2)
    for rid, replica in (("a", 0), ("b", 0), ("c", 1)):
        _route(front, rid, replica)
    children[0].send(("step_failed", "RuntimeError: boom", ["a"], EngineStats(), False))
    outs = front.step()
    assert [o.request_id for o in outs] == ["a"]
    assert front.alive and set(front.requests) == {"b", "c"}
    children[0].send(("rejected", "b", "the tensor/pipeline-parallel workers are gone"))
    assert [o.request_id for o in front.step()] == ["b"]
    assert front.alive and set(front.requests) == {"c"}


def test_replicas_share_the_hosts_fill_threads(monkeypatch):
    monkeypatch.setattr("graphwise.engine.mask_fill.available_cpus", lambda: 16)
    one = replica_config_of(EngineConfig(data_parallel_size=2, device="cpu"))
    assert one.data_parallel_size == 1 and one.structured_outputs_fill_threads == 4
    assert (
        replica_config_of(EngineConfig(data_parallel_size=4)).structured_outputs_fill_threads == 2
    )
    asked = EngineConfig(data_parallel_size=2, structured_outputs_fill_threads=3)
    assert replica_config_of(asked).structured_outputs_fill_threads == 3
