"""Merge the `kv-fp8` step of scripts/gpu_run.sh into one JSON (issue 17, FP8 KV cache).

Inputs in OUT: latency-kv-{auto,fp8}.json (`bench latency`, bs 64, 4096 + 64 tokens, graphs)
and explain-kv-{auto,fp8}/explain.json (`explain`, bs 64, context 4096). Output rows:
{kv_cache_dtype, batch_size, context_len, decode_median_ms, floor_ms, x_floor, step_ms,
attention_ms, attention_share}. Attention is the GPU time of the KV store and the decode
attention kernels in the profiled graph step (explain's top_kernels); its share is of the
GPU-busy time. The issue's target: the share falls by >= 40% with fp8 (share_fp8 <= 0.6 x
share_bf16).

    python benchmarks/kv_fp8_report.py OUT --output OUT/kv-fp8-h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ATTENTION_KERNELS = ("_decode_split_kernel", "_decode_reduce_kernel", "_store_kv_kernel")


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _attention(mode: dict[str, Any]) -> tuple[float | None, float | None]:
    kernels = mode.get("top_kernels") or []
    if not kernels:
        return None, None
    ms = sum(k["ms"] for k in kernels if any(a in k["kernel"] for a in ATTENTION_KERNELS))
    busy = mode.get("gpu_busy_ms") or sum(k["ms"] for k in kernels)
    return ms, (ms / busy if busy else None)


def report(out: Path) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for kv in ("auto", "fp8"):
        lat = _load(out / f"latency-kv-{kv}.json")
        exp = _load(out / f"explain-kv-{kv}" / "explain.json")
        row: dict[str, Any] = {"kv_cache_dtype": kv}
        if lat:
            graph = [r for r in lat["rows"] if r["mode"] == "graph"] or lat["rows"]
            r = graph[0]
            row.update(
                batch_size=r["batch_size"],
                input_len=lat["settings"]["input_len"],
                output_len=lat["settings"]["output_len"],
                decode_median_ms=r["decode_median_ms"],
                floor_ms=r["floor_ms"],
                x_floor=r["x_floor"],
                kv_bytes_per_token=lat.get("kv_bytes_per_token"),
            )
        if exp:
            e = exp["rows"][0]
            mode = e.get("graph") or e["eager"]
            attn_ms, share = _attention(mode)
            row.update(
                context_len=e["context_len"],
                step_ms=mode["step_ms"],
                explain_floor_ms=e["floor_ms"],
                gpu_busy_ms=mode.get("gpu_busy_ms"),
                attention_ms=attn_ms,
                attention_share=share,
                top_kernels=mode.get("top_kernels"),
            )
        rows.append(row)
    result: dict[str, Any] = {"benchmark": "kv-fp8", "model": "qwen2.5-7b", "rows": rows}
    auto, fp8 = rows
    if auto.get("attention_share") and fp8.get("attention_share") is not None:
        drop = 1.0 - fp8["attention_share"] / auto["attention_share"]
        result["attention_share_drop"] = drop
        result["attention_ms_drop"] = 1.0 - fp8["attention_ms"] / auto["attention_ms"]
        result["target_share_drop"] = 0.40
        result["target_met"] = drop >= 0.40
    if auto.get("decode_median_ms") and fp8.get("decode_median_ms"):
        result["decode_speedup"] = auto["decode_median_ms"] / fp8["decode_median_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    result = report(args.out)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        keys = ("kv_cache_dtype", "decode_median_ms", "floor_ms", "x_floor", "step_ms")
        extra = ("attention_ms", "attention_share")
        print({k: row.get(k) for k in (*keys, *extra)})
    print({k: v for k, v in result.items() if k not in ("rows", "benchmark", "model")})


if __name__ == "__main__":
    main()
