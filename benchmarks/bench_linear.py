"""P11 of docs/benchmarks.md: the matrix products of a decoding step, float32 against bfloat16 (no model loaded).

    .venv/bin/python -m benchmarks.bench_linear --shapes 64x896x4864,64x4864x896,64x896x151936,2048x2048x2048

Each shape ROWSxINxOUT is ``torch.nn.functional.linear`` of random [rows x in] inputs by a random [out x in]
weight (the Qwen2.5 0.5B's gate/up, down and head at 64 rows, and a square product for scale), timed in each dtype
(median of ``--repeats`` after two warm-ups, :func:`benchmarks.bench_head.median_seconds`); 2·rows·in·out FLOPs.
Which dtype is faster depends on the CPU (docs/benchmarks.md P6, P11). Prints one JSON line per shape.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.bench_head import median_seconds


def main() -> None:
    from pkt.machine import describe, kernel_class

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="64x896x4864,64x4864x896,64x896x151936,128x896x4864,2048x2048x2048")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(json.dumps({"machine": describe(kernel_class()), "threads": torch.get_num_threads()}))
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        rows, k, n = (int(x) for x in shape.split("x"))
        x32, w32 = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
        rates = {}
        for dt in (torch.float32, torch.bfloat16):
            x, w = x32.to(dt), w32.to(dt)
            secs = median_seconds(lambda: torch.nn.functional.linear(x, w), args.repeats)
            rates[str(dt).removeprefix("torch.")] = round(2 * rows * k * n / secs / 1e9, 1)
        print(json.dumps({"shape": shape, "gflops": rates,
                          "bf16_over_fp32": round(rates["bfloat16"] / rates["float32"], 2)}), flush=True)


if __name__ == "__main__":
    main()
