"""Wall-clock budgets measured, not asserted: the timings the test suite once checked on a shared machine.

A test that fails when another job holds the cores tests the machine, not pkt, so these live here and
their numbers go to docs/benchmarks.md. Each item is timed ``--repeats`` times (median reported) beside
the budget it used to be held to:

* ``submatrix-quarter``: :func:`pkt.locate.structure.max_sum_submatrix` on a 3456×1280 map for a
  2752×1024 block (1/4 of the Llama-2 13B→7B FFN shape per axis); budget 5 s.
* ``submatrix-full``: the same at the full 13824×5120 → 11008×4096 shape; budget 60 s.
* ``cached-load:<model>`` (``--models``): the second ``pkt.models.load.load_model`` of a prepared
  embedded model, i.e. with the page cache warm and the modeling code imported; budget 5 s.

Attribution cost against one forward pass (once asserted ≤ 3×) is P2 in docs/benchmarks.md
(``benchmarks/bench_attribution.py``).

Run from the repository root (real models: export PKT_HOME, hold the heavy-job lock)::

    flock /tmp/pkt-heavy.lock python -m benchmarks.bench_wallclock --models --out wallclock.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import torch

SUBMATRIX = {
    "submatrix-quarter": ((3456, 1280), (2752, 1024), 5.0),
    "submatrix-full": ((13824, 5120), (11008, 4096), 60.0),
}
LOAD_BUDGET = 5.0


def _median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_submatrix(repeats: int) -> list[dict]:
    from pkt.locate.structure import max_sum_submatrix

    rows = []
    for name, ((X, Y), (x, y), budget) in SUBMATRIX.items():
        s = torch.rand(X, Y, generator=torch.Generator().manual_seed(0))
        med, times = _median_seconds(functools.partial(max_sum_submatrix, s, x, y), repeats)
        rows.append({"item": name, "shape": f"{X}x{Y} -> {x}x{y}", "median_s": med, "times_s": times,
                     "budget_s": budget, "within_budget": med <= budget})
        del s
    return rows


def bench_cached_load(repeats: int) -> list[dict]:
    from pkt.models.load import load_model
    from pkt.models.registry import DEFAULT_STUDENT, DEFAULT_TEACHER

    rows = []
    for name in (DEFAULT_STUDENT, DEFAULT_TEACHER):
        load_model(name)  # warms the page cache and imports the model code

        def once():
            m = load_model(name)
            del m

        med, times = _median_seconds(once, repeats)
        rows.append({"item": f"cached-load:{name}", "shape": "fp32", "median_s": med, "times_s": times,
                     "budget_s": LOAD_BUDGET, "within_budget": med <= LOAD_BUDGET})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", action="store_true", help="also time cached loads of the embedded real pair")
    ap.add_argument("--no-submatrix", action="store_true", help="skip the sub-matrix searches")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the rows as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [] if a.no_submatrix else bench_submatrix(a.repeats)
    if a.models:
        rows += bench_cached_load(a.repeats)
    print(f"{'item':45s} {'shape':28s} {'median s':>9s} {'budget s':>9s}  within")
    for r in rows:
        print(f"{r['item']:45s} {r['shape']:28s} {r['median_s']:9.2f} {r['budget_s']:9.1f}  {r['within_budget']}")
    if a.out:
        meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "threads": a.threads, "torch": torch.__version__, "load_avg": os.getloadavg()}
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
