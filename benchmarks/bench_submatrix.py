"""P1: sub-matrix search — pkt's summed-area argmax vs the reference's Python loop and vs one sum() pass.

For each Llama-2 13B→7B shape, on the same random fp32 sensitivity map, in one process, interleaved per
repeat (pkt, sum, reference-table, reference-loop, pkt, ...):

* ``pkt``: :func:`pkt.locate.structure.max_sum_submatrix` (the whole search).
* ``sum``: one ``s.sum()`` over the same fp32 matrix — reads every element once, the memory-bound limit
  of any algorithm that must look at the whole map.
* ``margin`` (a proposal, *not* pkt's code): :func:`margin_window_sums`, the same window sums from one
  read of the matrix plus prefix sums of its margins only (shows what the ≤ 3× sum target needs).
* ``reference``: :func:`benchmarks.reference_seeking.max_sens_submatrix`. Its summed-area table is timed
  in full; its Python loop is timed over a *measured subset* of top-left rows (every column offset of
  each row, ``--loop-iters`` iterations or more, starting mid-matrix) and **extrapolated linearly** to
  all (X−x+1)(Y−y+1) corners: loop time × all corners / timed corners. The loop's cost per iteration does
  not depend on the data or the position (one table read per term, one compare), so the linear
  extrapolation is exact up to timing noise.

Reports medians over ``--repeats`` and writes JSON (``--out``). Run: ``python -m benchmarks.bench_submatrix``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import time

import torch

from benchmarks.reference_seeking import max_sens_submatrix, summed_area_table
from pkt.locate.structure import max_sum_submatrix, window_sums

# (name, teacher X×Y, student x×y): Llama-2 13B → 7B (docs/methods.md §4.3); count = matrices per layer.
SHAPES = {
    "attn": ((5120, 5120), (4096, 4096), 4),  # q, k, v, o
    "gate_up": ((13824, 5120), (11008, 4096), 2),  # gate, up
    "down": ((5120, 13824), (4096, 11008), 1),
}
N_LAYERS = 32  # student layers: one selected teacher layer each


def _pp(block: torch.Tensor) -> torch.Tensor:
    """Zero-padded float64 prefix-sum table of a small block: P[i, j] = Σ block[:i, :j]."""
    p = torch.zeros(block.shape[0] + 1, block.shape[1] + 1, dtype=torch.float64)
    p[1:, 1:] = block
    return p.cumsum_(0).cumsum_(1)


def _p1(v: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(v.numel() + 1, dtype=torch.float64)
    out[1:] = v
    return out.cumsum_(0)


def margin_window_sums(s: torch.Tensor, x: int, y: int) -> torch.Tensor:
    """PROPOSAL, not pkt's code: every x×y window sum from one read of ``s`` plus prefix sums of its margins.

    With a = X−x ≤ x and b = Y−y ≤ y (always so when the student is at least half the teacher), every
    window covers the central block rows [a, x) × cols [b, y); it differs from the others only in how
    much of the four margin strips and four a×b corners it takes. So the central block is only *summed*
    (per edge row/column, in float64), and the 2-D prefix tables are built over the 4·a·b corner elements
    only, instead of a float64 copy of the whole matrix with two cumsum passes. Same [(a+1), (b+1)] result
    as :func:`pkt.locate.structure.window_sums` (up to float64 summation order).
    """
    X, Y = s.shape
    a, b = X - x, Y - y
    if a > x or b > y:
        return window_sums(s, x, y)
    f64 = torch.float64
    c0 = s[a:x, b:y].sum(dtype=f64)
    left = _p1(s[a:x, :b].sum(0, dtype=f64).flip(0)).flip(0)  # Σ central rows × cols [j, b)
    right = _p1(s[a:x, y:].sum(0, dtype=f64))  # Σ central rows × cols [y, y+j)
    top = _p1(s[:a, b:y].sum(1, dtype=f64).flip(0)).flip(0)  # Σ rows [i, a) × central cols
    bottom = _p1(s[x:, b:y].sum(1, dtype=f64))  # Σ rows [x, x+i) × central cols
    tl = _pp(s[:a, :b].flip(0, 1)).flip(0, 1)  # Σ rows [i, a) × cols [j, b)
    tr = _pp(s[:a, y:].flip(0)).flip(0)  # Σ rows [i, a) × cols [y, y+j)
    bl = _pp(s[x:, :b].flip(1)).flip(1)  # Σ rows [x, x+i) × cols [j, b)
    br = _pp(s[x:, y:])  # Σ rows [x, x+i) × cols [y, y+j)
    w = tl + tr + bl + br
    w += (top + bottom)[:, None]
    w += (left + right + c0)[None, :]
    return w


def margin_max_sum_submatrix(s: torch.Tensor, x: int, y: int) -> tuple[int, int]:
    """PROPOSAL: the row-major first argmax of :func:`margin_window_sums` (same tie-break as pkt)."""
    w = margin_window_sums(s, x, y)
    return divmod(int(torch.argmax(w.view(-1)).item()), w.shape[1])


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_shape(name: str, repeats: int, loop_iters: int, seed: int = 0) -> dict:
    (X, Y), (x, y), count = SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    # A sensitivity-like map: non-negative, heavy-tailed, fp32 (the reference's dtype).
    s = torch.randn(X, Y, generator=g).abs_().pow_(2)
    n_rows, n_cols = X - x + 1, Y - y + 1
    k = min(n_rows, max(1, math.ceil(loop_iters / n_cols)))
    r_start = (n_rows - k) // 2
    rows = range(r_start, r_start + k)
    t_pkt, t_sum, t_sat, t_loop, t_margin, t_cumsum = [], [], [], [], [], []
    corner = loop_corner = None
    for _ in range(repeats):
        dt, corner = _timed(lambda: max_sum_submatrix(s, x, y))
        t_pkt.append(dt)
        # one sum pass is ~10-100 ms: take the median of 5 back-to-back passes per repeat
        t_sum.append(statistics.median(_timed(lambda: s.sum().item())[0] for _ in range(5)))
        t_cumsum.append(_timed(lambda: torch.cumsum(s, 1))[0])  # one scan pass (yardstick for the why)
        dt, margin_corner = _timed(lambda: margin_max_sum_submatrix(s, x, y))
        t_margin.append(dt)
        dt, sat = _timed(lambda: summed_area_table(s))
        t_sat.append(dt)
        dt, loop_corner = _timed(functools.partial(max_sens_submatrix, s, x, y, rows=rows, sat=sat))
        t_loop.append(dt)
        del sat
    # Parity on the timed subset: pkt's float64 window sums, argmax restricted to the same rows.
    w = window_sums(s, x, y)[rows.start: rows.stop]
    flat = int(torch.argmax(w.reshape(-1)).item())
    pkt_subset_corner = (rows.start + flat // n_cols, flat % n_cols)
    med = {k_: statistics.median(v) for k_, v in
           {"pkt": t_pkt, "sum": t_sum, "sat": t_sat, "loop_subset": t_loop, "margin": t_margin,
                           "cumsum_fp32": t_cumsum}.items()}
    timed_iters = k * n_cols
    all_iters = n_rows * n_cols
    per_iter = med["loop_subset"] / timed_iters
    ref_full = med["sat"] + per_iter * all_iters
    return {
        "shape": f"{X}x{Y}->{x}x{y}", "matrices_per_layer": count,
        "corners": all_iters, "timed_corners": timed_iters, "timed_rows": [rows.start, rows.stop],
        "median_s": med, "samples_s": {"pkt": t_pkt, "sum": t_sum, "sat": t_sat, "loop_subset": t_loop},
        "ref_us_per_iter": per_iter * 1e6, "ref_full_extrapolated_s": ref_full,
        "speedup_vs_reference": ref_full / med["pkt"], "pkt_over_sum": med["pkt"] / med["sum"],
        "pkt_corner": list(corner), "margin_corner": list(margin_corner),
        "margin_over_sum": med["margin"] / med["sum"], "margin_speedup_vs_reference": ref_full / med["margin"],
        "subset_parity": {"reference": list(loop_corner), "pkt_float64": list(pkt_subset_corner),
                          "agree": tuple(loop_corner) == pkt_subset_corner},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="attn,gate_up,down")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-iters", type=int, default=100_000, help="reference-loop corners timed per repeat")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    a = ap.parse_args(argv)
    res = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()},
           "repeats": a.repeats, "shapes": {}}
    for name in a.shapes.split(","):
        r = bench_shape(name, a.repeats, a.loop_iters)
        res["shapes"][name] = r
        m = r["median_s"]
        print(f"{name:8s} {r['shape']:24s} pkt {m['pkt']:.3f}s  sum {m['sum'] * 1e3:.1f}ms  "
              f"ref {r['ref_full_extrapolated_s']:.0f}s (table {m['sat']:.2f}s + loop {r['ref_us_per_iter']:.2f}us"
              f" x {r['corners']:,}; timed {r['timed_corners']:,})  "
              f"-> {r['speedup_vs_reference']:.0f}x faster, {r['pkt_over_sum']:.1f}x one sum; "
              f"subset parity {r['subset_parity']['agree']}; proposal {m['margin']:.3f}s = "
              f"{r['margin_over_sum']:.1f}x one sum, {r['margin_speedup_vs_reference']:.0f}x ref, "
              f"same corner {r['margin_corner'] == r['pkt_corner']}", flush=True)
    if set(SHAPES) <= set(res["shapes"]):
        per_layer_pkt = sum(res["shapes"][n]["median_s"]["pkt"] * SHAPES[n][2] for n in SHAPES)
        per_layer_ref = sum(res["shapes"][n]["ref_full_extrapolated_s"] * SHAPES[n][2] for n in SHAPES)
        res["model_13b_to_7b"] = {"layers": N_LAYERS, "pkt_s": per_layer_pkt * N_LAYERS,
                                  "reference_s": per_layer_ref * N_LAYERS,
                                  "speedup": per_layer_ref / per_layer_pkt}
        t = res["model_13b_to_7b"]
        print(f"13B->7B, {N_LAYERS} layers x (4 attn + 2 gate/up + 1 down): pkt {t['pkt_s'] / 60:.1f} min, "
              f"reference {t['reference_s'] / 3600:.2f} h (extrapolated), {t['speedup']:.0f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
