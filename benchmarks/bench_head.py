"""P11 of docs/benchmarks.md: the vocabulary projection of a decoding step, in one product or in row slices.

    .venv/bin/python -m benchmarks.bench_head --rows 1,8,32,64,128 --slices 1024,2048,4096,8192

A decoding step ends with hidden [rows x 896] @ lm_head [151,936 x 896]^T (the Qwen2.5 0.5B's shapes; random
weights of those shapes, so no model is loaded). Timed: ``torch.nn.functional.linear`` of the whole head (what
the model's forward does) against :func:`pkt.evaluate.logits.sliced_head` over slices of the head, median of
``--repeats`` after two warm-ups, alternating the variants; every sliced result is compared with the whole
product bit for bit (``equal``). Prints one JSON line per row count.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def median_seconds(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    from pkt.evaluate.logits import sliced_head
    from pkt.machine import describe, kernel_class

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,32,64,128")
    ap.add_argument("--slices", default="1024,2048,4096,8192")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(json.dumps({"machine": describe(kernel_class()), "threads": torch.get_num_threads()}))
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    with torch.no_grad():
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, args.hidden)
            whole = torch.nn.functional.linear(x, head.weight)
            res = {"rows": rows, "whole_s": round(median_seconds(lambda: torch.nn.functional.linear(x, head.weight),
                                                                 args.repeats), 4)}
            for s in map(int, args.slices.split(",")):
                t = median_seconds(lambda: sliced_head(x, head, rows=s), args.repeats)
                res[f"slice{s}"] = {"s": round(t, 4), "speedup": round(res["whole_s"] / t, 2),
                                    "equal": bool(torch.equal(sliced_head(x, head, rows=s), whole))}
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
