"""Issue 17's result file: `bench latency` on the same preset with each weight format, one row
per (weights, batch size): {weights, batch_size, decode_median_ms, floor_ms, x_floor}, plus
each format's step against bf16's at the same batch size (the targets: FP8 <= 0.60x at batch
1, <= 0.65x at batch 64; INT4 <= 0.40x at batch 1) and its weight bytes against bf16's (INT4:
<= 0.30x).

    python3 benchmarks/quant_report.py OUT_DIR --output OUT_DIR/quant-h200.json

OUT_DIR holds `latency-quant-<weights>.json` files written by `scripts/gpu_run.sh quant`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TARGETS = {"fp8": {1: 0.60, 64: 0.65}, "gptq": {1: 0.40}, "awq": {1: 0.40}}
# INT4 formats: weights on the GPU <= 0.30x of bf16's bytes.
BYTES_TARGETS = {"gptq": 0.30, "awq": 0.30}


def build(out_dir: Path) -> dict[str, Any]:
    runs = {}
    for p in sorted(out_dir.glob("latency-quant-*.json")):
        runs[p.stem.removeprefix("latency-quant-")] = json.loads(p.read_text())
    rows: list[dict[str, Any]] = []
    median: dict[tuple[str, int], float] = {}
    for weights, r in runs.items():
        for row in r["rows"]:
            if row["mode"] != "graph":
                continue
            b = row["batch_size"]
            median[(weights, b)] = row["decode_median_ms"]
            rows.append(
                {
                    "weights": weights,
                    "batch_size": b,
                    "decode_median_ms": row["decode_median_ms"],
                    "floor_ms": row["floor_ms"],
                    "x_floor": row["x_floor"],
                    "weights_bytes": r["weights_bytes"],
                }
            )
    for row in rows:
        base = median.get(("bf16", row["batch_size"]))
        row["vs_bf16"] = row["decode_median_ms"] / base if base else None
        target = TARGETS.get(row["weights"], {}).get(row["batch_size"])
        row["target_vs_bf16"] = target
        row["meets_target"] = None if target is None or base is None else row["vs_bf16"] <= target
        bf16 = runs.get("bf16", {}).get("weights_bytes")
        row["weights_vs_bf16"] = row["weights_bytes"] / bf16 if bf16 else None
        row["target_weights_vs_bf16"] = BYTES_TARGETS.get(row["weights"])
    any_run = next(iter(runs.values()), {})
    return {
        "benchmark": "quantized weights, bench latency (issue 17)",
        "model": any_run.get("model"),
        "num_layers": any_run.get("num_layers"),
        "settings": any_run.get("settings"),
        "environment": any_run.get("environment"),
        "copy_bandwidth_bytes_per_s": any_run.get("copy_bandwidth_bytes_per_s"),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args()
    result = build(args.out_dir)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["rows"]:
        vs = f"{r['vs_bf16']:.2f}x bf16" if r["vs_bf16"] else ""
        print(
            f"{r['weights']:>6} bs{r['batch_size']:<4} {r['decode_median_ms']:8.3f} ms  floor "
            f"{r['floor_ms']:7.3f} ms  {r['x_floor']:5.2f}x floor  {vs}"
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
