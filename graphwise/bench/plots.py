"""The sweep's figures: output throughput and mean TTFT against request rate.

One line per setup. Setups of the same model and parallel config share a colour; the CUDA graph
mode sets the line style and marker (on: solid, circles; off: dashed, squares; auto: dotted,
triangles), so graph on vs off reads at a glance. An `inf` rate is drawn at twice the largest
finite rate and labelled "inf".
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GRAPH_STYLE = {
    "on": {"linestyle": "-", "marker": "o"},
    "off": {"linestyle": "--", "marker": "s"},
    "auto": {"linestyle": ":", "marker": "^"},
}

FIGURES = (
    ("output_throughput", "output throughput (tok/s)", "throughput_vs_qps.png"),
    ("mean_ttft_ms", "mean TTFT (ms)", "ttft_vs_qps.png"),
)


def _x_positions(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, float], bool]:
    """Rate label -> x; and whether a log axis suits (rates spanning 8x or more)."""
    finite = sorted({float(r["qps"]) for r in rows if r["qps"] != "inf"})
    top = finite[-1] if finite else 1.0
    xs = {f"{v:g}": v for v in finite}
    if any(r["qps"] == "inf" for r in rows):
        xs["inf"] = top * 2 if finite else 1.0
    log = len(finite) > 1 and finite[0] > 0 and finite[-1] / finite[0] >= 8
    return xs, log


def plot_sweep(rows: Sequence[dict[str, Any]], output_dir: Path, title: str) -> list[Path]:
    """Write the two PNGs; rows without a value at some rate leave a gap there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    xs, log = _x_positions(rows)
    setups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        setups.setdefault(row["setup"], []).append(row)
    groups = list(dict.fromkeys((r["model"], r["parallel"]) for r in rows))
    colours = plt.get_cmap("tab10")
    paths = []
    for key, ylabel, filename in FIGURES:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        top = 0.0
        for name, setup_rows in setups.items():
            first = setup_rows[0]
            points = sorted(
                (xs[r["qps"]], r[key])
                for r in setup_rows
                if r[key] is not None and math.isfinite(r[key]) and r["qps"] in xs
            )
            if not points:
                continue
            top = max(top, max(p[1] for p in points))
            style = GRAPH_STYLE.get(first["cuda_graph"], GRAPH_STYLE["auto"])
            colour = colours(groups.index((first["model"], first["parallel"])) % 10)
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                color=colour,
                label=f"{name} (graph {first['cuda_graph']})",
                **style,
            )
        if log:
            ax.set_xscale("log", base=2)
        ax.set_xticks(list(xs.values()))
        ax.set_xticklabels(list(xs.keys()))
        ax.minorticks_off()
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.set_title(textwrap.fill(f"{title}: {ylabel} vs request rate", 70), fontsize="medium")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)  # headroom for the top markers
        fig.tight_layout()
        path = output_dir / filename
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
