"""P3: peak host memory of sensitivity — pkt's hook accumulation vs the reference's ``.grad`` dicts.

Every variant runs in its own child process (``--variant``), one after the other, each under the global
real-model lock (``flock /tmp/pkt-real.lock``) so that heavy variants never overlap with each other or with
other users of the real models. A child reports its own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``)
and its RSS after each stage, so numbers of different variants cannot contaminate each other.

Variants (``VARIANTS``):
* ``baseline``  — ``import torch, transformers, pkt`` only: the fixed interpreter + library overhead.
* ``load``      — baseline + the teacher's weights (``pkt.models.load.load_model``).
* ``pkt``       — load + :func:`pkt.locate.sensitivity.compute_sensitivity` (post-accumulate-grad hooks,
  fp32 accumulators, 2-D weights).
* ``pkt-extract`` — the same, restricted to the weights the extraction can draw from, as ``pkt extract``
  and ``pkt run`` call it (``param_filter`` = :func:`pkt.postpkt.target_weight_names` of the default
  targets q, k, v, o, gate, up, down: no embedding or lm_head accumulators or gradients).
* ``reference`` — load + :func:`benchmarks.reference_seeking.reference_sensitivity` (full ``.grad``,
  per-sample ``|w·g|`` dict, running dict; all parameters).

Loading bf16 weights from the fp32 cache briefly holds both copies, so a child also resets the kernel's
peak mark after loading (``/proc/self/clear_refs``) and reports ``compute_peak_kib``: the peak of the
sensitivity phase alone (weights resident + everything the algorithm adds).

Ratios are peak RSS / teacher weight bytes (Σ numel·itemsize of the loaded parameters); the fixed
overhead is reported separately, and also subtracted in ``ratio_minus_overhead``. Samples: the first
``--samples`` examples of the task's ``extract`` split, tokenised with pkt's chat template
(response-only labels), truncated to ``--max-length`` tokens. The reference needs ≥ 2 samples to reach
its steady-state peak (its running dict aliases the first sample's tensors).

Run (real models: export PKT_HOME and PKT_DATA_DIR first)::

    python -m benchmarks.bench_sensitivity --runs pkt:float32,pkt:bfloat16,reference:bfloat16 --out p3.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

LOCK = "/tmp/pkt-real.lock"
VARIANTS = ("baseline", "load", "pkt", "pkt-extract", "reference")


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux ≥ 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(a) -> dict:
    marks = {"start": _rss_kib()}
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import pkt  # noqa: F401
    from pkt.locate.sensitivity import compute_sensitivity, tokenize_samples

    torch.set_num_threads(a.threads)
    marks["imported"] = _rss_kib()
    out = {"variant": a.variant, "dtype": a.dtype, "model": a.model}
    if a.variant != "baseline":
        from pkt.data.tasks import load_split
        from pkt.models.load import load_model, load_tokenizer

        tok = load_tokenizer(a.model)
        samples = tokenize_samples(load_split(a.task, "extract")[: a.samples], tok, max_length=a.max_length)
        out["tokens"] = [len(s["input_ids"]) for s in samples]
        model = load_model(a.model, dtype=a.dtype)
        out["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        out["n_params"] = sum(p.numel() for p in model.parameters())
        marks["loaded"] = _rss_kib()
        out["load_peak_kib"] = _hwm_kib()
        out["hwm_reset"] = _reset_hwm()  # from here VmHWM is the peak of the compute phase alone
        t1 = time.perf_counter()
        if a.variant == "pkt":
            sens = compute_sensitivity(model, samples, progress=False)
        elif a.variant == "pkt-extract":
            from pkt.align.lora_init import DEFAULT_KINDS
            from pkt.postpkt import target_weight_names

            wanted = target_weight_names(model, DEFAULT_KINDS)
            sens = compute_sensitivity(model, samples, progress=False, param_filter=lambda n, p: n in wanted)
        elif a.variant == "reference":
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            from benchmarks.reference_seeking import reference_sensitivity

            sens = reference_sensitivity(model, samples)
        if a.variant in ("pkt", "pkt-extract", "reference"):
            out["compute_s"] = time.perf_counter() - t1
            out["result_bytes"] = sum(t.numel() * t.element_size() for t in sens.values())
            marks["computed"] = _rss_kib()
            out["compute_peak_kib"] = _hwm_kib()
    out["wall_s"] = time.perf_counter() - t0
    out["rss_kib"] = marks
    out["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def run_variant(variant: str, dtype: str, a) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_sensitivity", "--child", "--variant", variant, "--dtype", dtype,
           "--model", a.model, "--task", a.task, "--samples", str(a.samples), "--max-length", str(a.max_length),
           "--threads", str(a.threads)]
    if variant != "baseline" and not a.no_lock:
        cmd = ["flock", LOCK] + cmd
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if p.returncode != 0:
        raise SystemExit(f"variant {variant}/{dtype} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, default="pkt")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="baseline:float32,load:float32,pkt:float32,load:bfloat16,pkt:bfloat16,"
                                      "reference:bfloat16",
                    help="comma-separated variant:dtype children, run one at a time in this order")
    ap.add_argument("--no-lock", action="store_true", help="do not wrap children in flock (tiny models only)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return None
    results = []
    base = None
    for spec in a.runs.split(","):
        variant, dtype = spec.split(":")
        r = run_variant(variant, dtype, a)
        if variant == "baseline":
            base = r["peak_rss_kib"] * 1024
        if "weight_bytes" in r:
            peak = r["peak_rss_kib"] * 1024
            r["ratio"] = peak / r["weight_bytes"]
            if "compute_peak_kib" in r:
                r["compute_ratio"] = r["compute_peak_kib"] * 1024 / r["weight_bytes"]
            if base is not None:
                r["overhead_bytes"] = base
                r["ratio_minus_overhead"] = (peak - base) / r["weight_bytes"]
        results.append(r)
        gib = r["peak_rss_kib"] / 2**20
        extra = (f"  weights {r['weight_bytes'] / 2**30:.2f} GiB  peak/weights {r['ratio']:.2f}"
                 + (f" ({r['ratio_minus_overhead']:.2f} without the {base / 2**30:.2f} GiB overhead)" if base else "")
                 if "weight_bytes" in r else "")
        if "compute_ratio" in r:
            extra += f"  compute-phase peak {r['compute_peak_kib'] / 2**20:.2f} GiB = {r['compute_ratio']:.2f}x weights"
        print(f"{variant:9s} {dtype:8s} peak RSS {gib:6.2f} GiB{extra}  "
              f"compute {r.get('compute_s', 0):.0f}s  wall {r['wall_s']:.0f}s", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "task": a.task, "samples": a.samples, "max_length": a.max_length,
                       "runs": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
