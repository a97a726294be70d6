"""function-transfer's solves for one student layer at the real pair's shapes: primal (statistics) vs token space.

Qwen2.5-Coder-1.5B → 0.5B widths (teacher d_model 1,536, d_ff 8,960; student 896, 4,864; their configs' head
counts), on synthetic float32 activations of ``--tokens`` calibration tokens (731: 4 GSM8K extract examples) and a
random rank-16 teacher delta per projection, so no model is loaded. Per variant, in its own child process:

* ``primal``: what function-transfer did before the token space (and still does for many tokens): the float64
  statistics (X_sᵀX_s, X_sᵀE, Y_tᵀY_s, Y_tᵀY_t, means) summed from the activations
  (:func:`pkt.transfer.function_transfer.accumulate`, timed as "statistics"), then every Gram factorised in its
  width, d_ff = 8,960 for the FFN map (:func:`~pkt.transfer.function_transfer.solve_statistics`, "solve");
* ``auto``: the token space as ``solve="auto"`` runs it (:func:`~pkt.transfer.function_transfer.solve_tokens`), each
  Gram in the smaller of its primal and dual forms;
* ``dual``: the token space with every Gram dual.

Reported: seconds, the peak memory the variant adds to its float32 inputs (VmHWM minus the RSS once the inputs
exist; for ``primal``, VmHWM reset again once the statistics are summed and the float64 copies of the
activations they were summed from freed, since a real run holds those for one sequence at a time: its figure is
the statistics plus the solves' work), and the max relative difference of each variant's ΔW_s from the primal's
(the forms are mathematically identical). The statistics are what one pass sums over its sequences, here in one
product per matrix (the same flops). Run: ``python -m benchmarks.bench_function_transfer [--tokens 731] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = ("primal", "auto", "dual")
TEACHER = dict(num_layers=28, hidden_size=1536, intermediate_size=8960, num_heads=12, num_kv_heads=2, head_dim=128,
               vocab_size=151936, tied_embeddings=True)
STUDENT = dict(num_layers=24, hidden_size=896, intermediate_size=4864, num_heads=14, num_kv_heads=2, head_dim=64,
               vocab_size=151936, tied_embeddings=True)
RANK = 16  # the study's LoRA rank: the teacher delta's


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def synthetic_layer(n: int, seed: int):
    """({(layer, kind): (input, output)} of teacher and student layer 0, float32, inputs shared within a group
    as the models' are; the teacher's rank-16 deltas; the two specs)."""
    import torch

    from pkt.transfer.function_transfer import GROUP_REP, INPUT_GROUP
    from pkt.models.arch import LINEAR_KINDS, ConfigDims

    g = torch.Generator().manual_seed(seed)
    specs = {"t": ConfigDims(**TEACHER), "s": ConfigDims(**STUDENT)}
    got = {}
    for side, spec in specs.items():
        inputs = {grp: torch.randn(n, spec.weight_shape(rep)[1], generator=g) for grp, rep in GROUP_REP.items()}
        got[side] = {(0, k): (inputs[INPUT_GROUP[k]], torch.randn(n, spec.weight_shape(k)[0], generator=g))
                     for k in LINEAR_KINDS}
    tv = {}
    for k in LINEAR_KINDS:
        o, i = specs["t"].weight_shape(k)
        tv[(0, k)] = torch.randn(o, RANK, generator=g) @ torch.randn(RANK, i, generator=g) / (RANK * i) ** 0.5
    return got, tv, specs


def child(a) -> dict:
    import torch

    from pkt.transfer import function_transfer as ft
    from pkt.models.arch import LINEAR_KINDS

    torch.set_num_threads(a.threads)
    got, tv, specs = synthetic_layer(a.tokens, a.seed)
    cfg, keys, pairing = ft.TransferConfig(), [(0, k) for k in LINEAR_KINDS], [0]
    out = {"variant": a.variant, "tokens": a.tokens, "threads": torch.get_num_threads()}
    if a.variant != "primal":
        acts = {}
        for side, l, k, io in ft.token_entries(pairing, keys):
            acts[(side, l, k, io)] = got[side][(l, k)][0 if io == "in" else 1]
        out["input_mib"] = sum(x.numel() * x.element_size() for x in acts.values()) / 2**20
        del got
    deltas, rows = {}, []
    rss0, out["hwm_reset"] = _status_kib("VmRSS"), _reset_hwm()
    t0 = time.perf_counter()
    if a.variant == "primal":
        dw = {key: d.double() for key, d in tv.items()}
        f64 = {side: {key: (x.double(), y.double()) for key, (x, y) in sides.items()} for side, sides in got.items()}
        stats = ({}, {}, {})
        ft.accumulate(stats, f64["t"], f64["s"], dw, pairing, keys, ridge_map=True)
        del f64
        out["statistics_mib"] = sum(v.numel() * 8 for d in stats for m in d.values()
                                    for v in (m.values() if isinstance(m, dict) else [m])
                                    if isinstance(v, torch.Tensor) and v.dim() == 2) / 2**20
        out["statistics_s"] = time.perf_counter() - t0
        _reset_hwm()  # the float64 copies of the activations are gone: from here, the statistics and the solves
        t1 = time.perf_counter()
        ft.solve_statistics(*stats, keys, pairing, cfg, deltas, rows)
        out["solve_s"] = time.perf_counter() - t1
    else:
        out["statistics_s"] = 0.0
        ft.solve_tokens(acts, tv, keys, pairing, cfg, True if a.variant == "dual" else None, deltas, rows)
        out["solve_s"] = time.perf_counter() - t0
    out["total_s"] = out["statistics_s"] + out["solve_s"]
    out["added_peak_mib"] = (_status_kib("VmHWM") - rss0) / 1024
    out["forms"] = {f"{r['kind']}": f"{r['forms']['map']}/{r['forms']['solve']}" for r in rows}
    torch.save({f"{l}.{k}": d for (l, k), d in deltas.items()}, a.save)
    return out


def run_variant(variant: str, a, save: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_function_transfer", "--child", "--variant", variant,
           "--tokens", str(a.tokens), "--threads", str(a.threads), "--seed", str(a.seed), "--save", save]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if p.returncode != 0:
        raise SystemExit(f"variant {variant} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, default="auto")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, run in this order")
    ap.add_argument("--tokens", type=int, default=731)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=STUDENT["num_layers"], help="for the whole-transfer estimate")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return
    import torch

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in a.variants.split(","):
            r = run_variant(v, a, os.path.join(tmp, f"{v}.pt"))
            results.append(r)
        ref = torch.load(os.path.join(tmp, "primal.pt")) if "primal" in a.variants.split(",") else None
        for r in results:
            if ref is not None:
                d = torch.load(os.path.join(tmp, f"{r['variant']}.pt"))
                r["max_rel_diff_vs_primal"] = max(
                    float((d[k].double() - ref[k].double()).norm() / ref[k].double().norm()) for k in ref)
    print(f"one student layer, {a.tokens} tokens, {results[0]['threads']} threads (Qwen2.5-Coder-1.5B → 0.5B widths)")
    print(f"{'variant':8} {'stats s':>8} {'solve s':>8} {'total s':>8} {'×' + str(a.layers) + ' layers':>11} "
          f"{'added peak MiB':>15} {'rel diff':>9}")
    for r in results:
        diff = r.get("max_rel_diff_vs_primal")
        print(f"{r['variant']:8} {r['statistics_s']:8.2f} {r['solve_s']:8.2f} {r['total_s']:8.2f} "
              f"{r['total_s'] * a.layers / 60:9.1f} m {r['added_peak_mib']:15.0f} "
              f"{'' if diff is None else f'{diff:9.1e}'}")
    for r in results:
        print(f"{r['variant']}: forms (map/solve) {r['forms']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
