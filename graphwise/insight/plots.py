"""explain's figure: decode step time against batch size, eager vs graph, with the two things the
eager step waits on (CPU enqueue and GPU busy) and what the step-time model predicts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _series(rows: list[Mapping[str, Any]], get: Any) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        try:
            y = get(r)
        except (KeyError, TypeError):
            y = None
        if y is not None:
            xs.append(r["batch_size"])
            ys.append(float(y))
    return xs, ys


def plot_explain(report: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report["rows"], key=lambda r: r["batch_size"])
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    lines = [
        ("eager step (measured)", lambda r: r["eager"]["step_ms"], dict(color="C3", marker="o")),
        ("graph step (measured)", lambda r: r["graph"]["step_ms"], dict(color="C0", marker="s")),
        (
            "eager: CPU enqueue",
            lambda r: r["eager"]["cpu_enqueue_ms"] if report["device"] == "cuda" else None,
            dict(color="C1", linestyle="--", marker="^"),
        ),
        (
            "eager: GPU busy",
            lambda r: r["eager"]["gpu_busy_ms"],
            dict(color="C2", linestyle="--", marker="v"),
        ),
        (
            "model: eager",
            lambda r: r["model"]["eager_ms"],
            dict(color="C3", linestyle="none", marker="o", markerfacecolor="none", markersize=10),
        ),
        (
            "model: graph",
            lambda r: r["model"]["graph_ms"],
            dict(color="C0", linestyle="none", marker="s", markerfacecolor="none", markersize=10),
        ),
        (
            "byte floor",
            lambda r: r["floor_ms"],
            dict(color="grey", linestyle=":", linewidth=1),
        ),
    ]
    for label, get, style in lines:
        xs, ys = _series(rows, get)
        if xs:
            ax.plot(xs, ys, label=label, **style)
    batch = [r["batch_size"] for r in rows]
    if batch and batch[-1] / max(1, batch[0]) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(batch)
    ax.set_xticklabels([str(b) for b in batch])
    ax.set_xlabel("batch size (sequences decoding)")
    ax.set_ylabel("ms per decode step")
    ax.set_ylim(bottom=0)
    device = report.get("environment", {}).get("device_name") or report["device"]
    title = f"{report['model']} on {device}"
    emulated = report["settings"].get("emulate_bandwidth_bytes_per_s")
    if emulated:
        title += f" (emulating {emulated / 1e12:.2f} TB/s)"
    if not report.get("graphs_available"):
        title += " - no CUDA graphs here"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
