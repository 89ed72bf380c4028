"""Where a run's time goes, step by step: what the host did in each `engine.step()` call and how
long it waited for the GPU, next to the decode floor (the bytes a step must read over the
copy bandwidth).

Attach a `StepLog` as `engine.step_log`; each step() call appends one record. With async
scheduling a call launches step N+1 and waits for step N, so its duration is the pipeline's
period: `wait` is then the GPU time the host could not hide behind, and schedule + launch +
process is host work that ran while the GPU was busy.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from graphwise.core.tracing import StepRecord

__all__ = ["StepLog", "StepRecord", "format_summary"]


@dataclass
class StepLog:
    records: list[StepRecord] = field(default_factory=list)

    def add(self, record: StepRecord) -> None:
        self.records.append(record)

    def summary(
        self,
        weights_bytes: int,
        kv_bytes_per_token: int,
        bandwidth_bytes_per_s: float | None,
        batch_bins: tuple[int, ...] = (1, 32, 128, 257),
    ) -> dict[str, Any]:
        """Totals, decode steps against their floor, and decode steps binned by batch size."""
        recs = self.records
        total = sum(r.total_s for r in recs)
        prefill = [r for r in recs if r.prefill_tokens]
        decode = [r for r in recs if r.seqs and not r.prefill_tokens]

        def floor_s(r: StepRecord) -> float | None:
            if not bandwidth_bytes_per_s:
                return None
            return (weights_bytes + r.context_tokens * kv_bytes_per_token) / bandwidth_bytes_per_s

        def block(rs: list[StepRecord]) -> dict[str, Any]:
            if not rs:
                return {"steps": 0}
            t = sum(r.total_s for r in rs)
            floors = [floor_s(r) for r in rs]
            out: dict[str, Any] = {
                "steps": len(rs),
                "time_s": t,
                "share_of_elapsed": t / total if total else None,
                "mean_batch": statistics.fmean(r.seqs for r in rs),
                "step_ms_median": statistics.median(r.total_s for r in rs) * 1e3,
                "host_ms_mean": statistics.fmean(
                    r.schedule_s + r.launch_s + r.process_s for r in rs
                )
                * 1e3,
                "schedule_ms_mean": statistics.fmean(r.schedule_s for r in rs) * 1e3,
                "launch_ms_mean": statistics.fmean(r.launch_s for r in rs) * 1e3,
                "process_ms_mean": statistics.fmean(r.process_s for r in rs) * 1e3,
                "wait_ms_mean": statistics.fmean(r.wait_s for r in rs) * 1e3,
            }
            if all(f is not None for f in floors):
                floor_total = sum(f for f in floors if f is not None)
                out["floor_s"] = floor_total
                out["x_floor"] = t / floor_total if floor_total else None
            return out

        bins = []
        for lo, hi in zip(batch_bins, batch_bins[1:], strict=False):
            rs = [r for r in decode if lo <= r.seqs < hi]
            if rs:
                bins.append({"batch_from": lo, "batch_to": hi - 1, **block(rs)})
        rest = [r for r in decode if r.seqs >= batch_bins[-1]]
        if rest:
            bins.append({"batch_from": batch_bins[-1], "batch_to": None, **block(rest)})
        return {
            "steps": len(recs),
            "elapsed_in_steps_s": total,
            "prefill_steps": block(prefill),  # steps with any prompt tokens (mixed included)
            "decode_steps": block(decode),
            "decode_by_batch": bins,
            "other_steps": len(recs) - len(prefill) - len(decode),  # drain-only calls
        }

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records]


def format_summary(s: dict[str, Any]) -> str:
    def line(name: str, b: dict[str, Any]) -> str:
        if not b.get("steps"):
            return f"{name:<16} -"
        xf = f"{b['x_floor']:.2f}x floor" if b.get("x_floor") else "floor n/a"
        return (
            f"{name:<16} {b['steps']:>6} steps {b['time_s']:>8.2f} s "
            f"({100 * (b['share_of_elapsed'] or 0):4.1f}%)  batch {b['mean_batch']:6.1f}  "
            f"step {b['step_ms_median']:7.2f} ms  host {b['host_ms_mean']:6.2f} ms  "
            f"wait {b['wait_ms_mean']:6.2f} ms  {xf}"
        )

    lines = [line("prefill/mixed", s["prefill_steps"]), line("decode", s["decode_steps"])]
    for b in s["decode_by_batch"]:
        hi = b["batch_to"] if b["batch_to"] is not None else "+"
        lines.append(line(f"  batch {b['batch_from']}-{hi}", b))
    return "\n".join(lines)
