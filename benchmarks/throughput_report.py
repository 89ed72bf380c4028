"""Issue 9's result file: decode at batch 64/128/256 (async scheduling on vs off), the offline
workload with its step-time breakdown, the MoE layer and the GEMM roofline, in one JSON and
one Markdown table; plus a plot of the offline run's step times against their floor.

    python3 benchmarks/throughput_report.py DIR [--output benchmarks/results/throughput-h100.json]
        [--plot docs/figures/offline-steps-h100.png]

DIR holds what `scripts/gpu_run.sh throughput roofline moe` wrote (throughput-decode-h100.json,
throughput-decode-long-h100.json, throughput-offline-h100.json, gemm-roofline-h100.json,
moe-h100.json); missing parts are left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _load(d: Path, name: str) -> dict[str, Any] | None:
    p = d / name
    return json.loads(p.read_text()) if p.is_file() else None


def decode_section(r: dict[str, Any]) -> dict[str, Any]:
    s = r["settings"]
    rows = {}
    for row in r["rows"]:
        rows.setdefault(row["batch_size"], {})[row["mode"]] = row
    out = []
    for b, modes in sorted(rows.items()):
        on, off = modes.get("graph"), modes.get("graph-sync")
        out.append(
            {
                "batch_size": b,
                "floor_ms": (on or off)["floor_ms"],
                "async_on_ms": on["decode_median_ms"] if on else None,
                "async_on_x_floor": on["x_floor"] if on else None,
                "async_off_ms": off["decode_median_ms"] if off else None,
                "async_off_x_floor": off["x_floor"] if off else None,
            }
        )
    return {
        "input_len": s["input_len"],
        "output_len": s["output_len"],
        "mean_context": s["input_len"] + s["output_len"] / 2,
        "git_commit": r["environment"].get("git_commit"),
        "rows": out,
    }


def offline_section(r: dict[str, Any]) -> dict[str, Any]:
    runs = []
    for run in r["runs"]:
        runs.append({k: v for k, v in run.items() if k != "step_records"})
    return {
        "workload": {
            "num_prompts": r["num_prompts"],
            "input_len_range": r["input_len_range"],
            "output_len_range": r["output_len_range"],
            "seed": r["seed"],
        },
        "engine_args": r["engine_args"],
        "git_commit": r["git_commit"],
        "runs": runs,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = []
    for key, title in (("decode", "context 128-384"), ("decode_long", "context 896-1152")):
        sec = report.get(key)
        if not sec:
            continue
        lines += [
            f"Decode step with CUDA graphs, {title} (mean {sec['mean_context']:.0f}), "
            f"commit {sec['git_commit']}:",
            "",
            "| batch | floor | async on | × floor | async off | × floor |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in sec["rows"]:
            lines.append(
                f"| {row['batch_size']} | {row['floor_ms']:.2f} ms | {row['async_on_ms']:.2f} ms | "
                f"{row['async_on_x_floor']:.2f} | {row['async_off_ms']:.2f} ms | "
                f"{row['async_off_x_floor']:.2f} |"
            )
        lines.append("")
    off = report.get("offline")
    if off:
        lines += [
            f"Offline, {off['workload']['num_prompts']} prompts, commit {off['git_commit']}:",
            "",
            "| async scheduling | output tok/s | elapsed | prefill/mixed steps | decode steps | "
            "decode × floor | decode host / wait per step |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for run in off["runs"]:
            b = run["step_breakdown"]
            p, d = b["prefill_steps"], b["decode_steps"]
            lines.append(
                f"| {'on' if run['async_scheduling'] else 'off'} | "
                f"{run['output_tokens_per_second']:.0f} | {run['elapsed_time']:.2f} s | "
                f"{p['time_s']:.2f} s | {d['time_s']:.2f} s | {d.get('x_floor', 0):.2f} | "
                f"{d['host_ms_mean']:.2f} / {d['wait_ms_mean']:.2f} ms |"
            )
        lines.append("")
    roof = report.get("gemm_roofline")
    if roof:
        lines += [
            f"Decode GEMMs (cuBLAS) per step; copy {roof['copy_bandwidth_bytes_per_s'] / 1e12:.2f} "
            f"TB/s, bf16 matmul peak {roof['matmul_peak_flop_per_s'] / 1e12:.0f} TFLOP/s:",
            "",
            "| batch | GEMMs | byte floor | flop floor | roofline floor | × roofline |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in roof["rows"]:
            if row["gemm"] == "step":
                lines.append(
                    f"| {row['batch']} | {row['gemm_ms']:.2f} ms | {row['byte_floor_ms']:.2f} ms | "
                    f"{row['flop_floor_ms']:.2f} ms | {row['roofline_ms']:.2f} ms | "
                    f"{row['gemm_ms'] / row['roofline_ms']:.2f} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot_offline(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bw, w, kv = r["copy_bandwidth_bytes_per_s"], r["weights_bytes"], r["kv_bytes_per_token"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    times = sorted(
        x["total_s"] * 1e3
        for run in r["runs"]
        for x in run.get("step_records", [])
        if x["seqs"] and not x["prefill_tokens"]
    )
    top = times[int(0.995 * (len(times) - 1))] * 1.3 if times else None
    outliers = sum(1 for t in times if top is not None and t > top)
    for run, color in zip(r["runs"], ("tab:blue", "tab:orange"), strict=False):
        recs = [x for x in run.get("step_records", []) if x["seqs"] and not x["prefill_tokens"]]
        if not recs:
            continue
        label = f"async scheduling {'on' if run['async_scheduling'] else 'off'}"
        ax.scatter(
            [x["seqs"] for x in recs],
            [x["total_s"] * 1e3 for x in recs],
            s=4,
            alpha=0.5,
            color=color,
            label=label,
        )
    recs = [
        x for x in r["runs"][0].get("step_records", []) if x["seqs"] and not x["prefill_tokens"]
    ]
    if recs and bw:
        recs.sort(key=lambda x: x["seqs"])
        ax.plot(
            [x["seqs"] for x in recs],
            [(w + x["context_tokens"] * kv) / bw * 1e3 for x in recs],
            color="black",
            lw=1,
            label="floor (weights + KV read) / copy bandwidth",
        )
    ax.set_xlabel("sequences in the decode step")
    ax.set_ylabel("step time (ms)")
    ax.set_ylim(0, top)
    title = "bench offline, qwen2.5-7b on H100: every decode step"
    if outliers:
        title += f" ({outliers} above the plot)"
    ax.set_title(title)
    ax.legend(loc="upper left", markerscale=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--output", type=Path, default=Path("benchmarks/results/throughput-h100.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/figures/offline-steps-h100.png"))
    args = ap.parse_args()
    d = args.dir
    report: dict[str, Any] = {"benchmark": "throughput", "issue": 9}
    if (r := _load(d, "throughput-decode-h100.json")) is not None:
        report["decode"] = decode_section(r)
        report["environment"] = r["environment"]
        report["copy_bandwidth_bytes_per_s"] = r["copy_bandwidth_bytes_per_s"]
    if (r := _load(d, "throughput-decode-long-h100.json")) is not None:
        report["decode_long"] = decode_section(r)
    if (r := _load(d, "throughput-offline-h100.json")) is not None:
        report["offline"] = offline_section(r)
        if any(run.get("step_records") for run in r["runs"]):
            plot_offline(r, args.plot)
            report["offline"]["plot"] = str(args.plot)
    if (r := _load(d, "gemm-roofline-h100.json")) is not None:
        report["gemm_roofline"] = r
    if (r := _load(d, "moe-h100.json")) is not None:
        report["moe"] = r
    report["markdown"] = markdown(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(report["markdown"])
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
