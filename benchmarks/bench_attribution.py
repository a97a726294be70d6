"""P2: attribution of one example on the real teacher — pkt vs the reference algorithm and vs one forward.

One process, one example (the task's ``extract`` split, ``--example``), the teacher in fp32, interleaved
per repeat:

* ``forward``: one plain forward pass, ``model(input_ids, use_cache=False)`` (all positions' logits).
* ``pkt``: :func:`pkt.locate.attribution.attribute` as LaTen's pipeline calls it (``configs/laten.yaml``):
  layer scores + the certified top neurons per layer for pairing, ``top=(n_attn, n_ffn)`` =
  (int(0.1·896), int(0.1·4864)) = (89, 486) for the 0.5B student, ``vocab_top=1024``, ``chunk=256``.
  ``norm="laten"`` (the reference's final-norm scale; the cost does not depend on the norm).
* ``reference``: :func:`benchmarks.reference_laten.reference_attribute` on a **subset** — ``--ref-layers``
  layers and the first ``--ref-neurons`` FFN and attention neurons of each — **extrapolated linearly**:
  ``forward + (tolist + rebuild) per layer × L + per-FFN-neuron time × L·d_ffn + per-attention-neuron time
  × L·q_dim + sorts``. The sorts are timed at full size on synthetic Python lists (the per-layer FFN sort
  and the quadratic attention re-sort, Σ_l (l+1)·q_dim entries). The extrapolation counts **one** call;
  the reference makes 3 per model per example (docs/methods.md §7.1 item 5).

Same scores, asserted: pkt's exact scorer (:func:`pkt.locate.attribution.score_block`, full softmax, on
the activations from :func:`pkt.locate.attribution.capture`) on exactly the subset's neurons equals the
reference's (to its 4-decimal rounding), and pkt's layer scores equal the reference's.

Run (real model: export PKT_HOME and PKT_DATA_DIR; hold the real-model lock)::

    flock /tmp/pkt-real.lock python -m benchmarks.bench_attribution --out p2.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch


def _sort_costs(L: int, f: int, q: int, seed: int = 0) -> dict:
    """Full-size Python sorts of the reference: FFN per layer (f entries), attention re-sorted whole per layer."""
    rng = random.Random(seed)
    t = time.perf_counter()
    for _ in range(L):
        lst = [[f"0_{i}", rng.random(), None] for i in range(f)]
        lst.sort(key=lambda e: e[1], reverse=True)
    ffn = time.perf_counter() - t
    t = time.perf_counter()
    attn: list = []
    for layer in range(L):
        attn.extend([f"{layer}_{i}", rng.random(), None] for i in range(q))
        attn.sort(key=lambda e: e[1], reverse=True)
    att = time.perf_counter() - t
    t = time.perf_counter()
    for e in attn:
        int(e[0].split("_")[0]), int(e[0].split("_")[1])
    parse = (time.perf_counter() - t) * (1 + L * f / max(1, len(attn)))
    return {"ffn_sort": ffn, "attn_resort": att, "parse": parse, "attn_entries_sorted": sum((l + 1) * q for l in range(L))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--example", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top-attn", type=int, default=89)
    ap.add_argument("--top-ffn", type=int, default=486)
    ap.add_argument("--vocab-top", type=int, default=1024)
    ap.add_argument("--ref-layers", default="0,27")
    ap.add_argument("--ref-neurons", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.reference_laten import reference_attribute
    from pkt.data.tasks import load_split
    from pkt.locate.attribution import Readout, attribute, attribution_inputs, capture, score_block
    from pkt.models.arch import ArchSpec
    from pkt.models.load import load_model, load_tokenizer

    tok = load_tokenizer(a.model)
    ex = load_split(a.task, "extract")[a.example]
    ids, target = attribution_inputs(ex, tok, max_length=a.max_length)
    model = load_model(a.model, dtype="float32")
    spec = ArchSpec.from_model(model)
    L, f, q = spec.num_layers, spec.intermediate_size, spec.q_dim
    layers = [int(x) for x in a.ref_layers.split(",")]
    print(f"{a.model}: L={L} d={spec.hidden_size} f={f} q_dim={q} V={spec.vocab_size}; {a.task} extract "
          f"#{a.example}: T={ids.shape[1]} target={target}", flush=True)

    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # warm-up
    t_fwd, t_pkt, t_ref, refs, fasts = [], [], [], [], []
    for r in range(a.repeats):
        with torch.no_grad():
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            t_fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        fast = attribute(model, ids, target, norm="laten", vocab_top=a.vocab_top, chunk=256,
                         top=(a.top_attn, a.top_ffn), spec=spec)
        t_pkt.append(time.perf_counter() - t)
        fasts.append(fast)
        t = time.perf_counter()
        ref = reference_attribute(model, ids, target, layers=layers, max_neurons=a.ref_neurons)
        t_ref.append(time.perf_counter() - t)
        refs.append(ref)
        print(f"repeat {r}: forward {t_fwd[-1]:.2f}s  pkt {t_pkt[-1]:.2f}s  reference subset {t_ref[-1]:.1f}s "
              f"({ref['n']['ffn']}+{ref['n']['attn']} neurons on layers {layers})", flush=True)

    # --- parity: pkt's exact scorer on the same neurons, and pkt's layer scores
    acts = capture(model, ids, spec)
    ro = Readout(model, spec, acts.final, "laten")
    max_err = 0.0
    for layer in layers:
        k = a.ref_neurons
        w_o = spec.linear(model, layer, "o").weight.detach().float()
        w_down = spec.linear(model, layer, "down").weight.detach().float()
        attn_subs = (w_o[:, :k] * acts.attn_heads[layer][:k]).T.contiguous()
        ffn_subs = (w_down[:, :k] * acts.coeff[layer][:k]).T.contiguous()
        s_attn = score_block(ro, acts.layer_in[layer], attn_subs, target)[0]
        s_ffn = score_block(ro, acts.mid[layer], ffn_subs, target)[0]
        r_attn = torch.tensor([refs[0]["attn"][(layer, i)] for i in range(k)])
        r_ffn = torch.tensor([refs[0]["ffn"][(layer, i)] for i in range(k)])
        torch.testing.assert_close(s_attn, r_attn, rtol=0, atol=1e-4)
        torch.testing.assert_close(s_ffn, r_ffn, rtol=0, atol=1e-4)
        max_err = max(max_err, float((s_attn - r_attn).abs().max()), float((s_ffn - r_ffn).abs().max()))
        for kind in ("attn", "ffn"):
            got = float(getattr(fasts[0], f"{kind}_layers")[layer])
            assert abs(got - refs[0][f"{kind}_layers"][layer]) <= 1e-4 * max(1.0, abs(got)), (kind, layer)
    print(f"parity: pkt exact scores == reference on {2 * a.ref_neurons * len(layers)} neurons "
          f"(max |diff| {max_err:.1e}, reference rounds to 1e-4); layer scores equal", flush=True)

    # --- extrapolate the reference to the whole model
    sec = {k: statistics.median(r["seconds"][k] for r in refs) for k in refs[0]["seconds"]}
    n = refs[0]["n"]
    sorts = _sort_costs(L, f, q)
    per_ffn = sec["ffn_loop"] / n["ffn"]
    per_attn = sec["attn_loop"] / n["attn"]
    per_layer_lists = (sec["tolist"] + sec["rebuild"]) / n["layers"]
    parts = {"forward": sec["forward"], "tolist_rebuild": per_layer_lists * L, "ffn_neurons": per_ffn * L * f,
             "attn_neurons": per_attn * L * q, "sorts": sorts["ffn_sort"] + sorts["attn_resort"] + sorts["parse"]}
    ref_full = sum(parts.values())
    med_fwd, med_pkt = statistics.median(t_fwd), statistics.median(t_pkt)
    res = {
        "model": a.model, "tokens": int(ids.shape[1]), "target": target, "repeats": a.repeats,
        "median_s": {"forward": med_fwd, "pkt": med_pkt, "reference_subset": statistics.median(t_ref)},
        "samples_s": {"forward": t_fwd, "pkt": t_pkt, "reference_subset": t_ref},
        "pkt_evaluated_neurons": list(fasts[0].evaluated), "pkt_seconds": fasts[0].seconds,
        "reference_subset": {"layers": layers, "neurons_per_layer": a.ref_neurons, "median_stage_s": sec,
                             "us_per_ffn_neuron": per_ffn * 1e6, "us_per_attn_neuron": per_attn * 1e6},
        "reference_extrapolated_s": ref_full, "reference_parts_s": parts, "sorts": sorts,
        "reference_logit_copies_bytes": L * (f + q) * spec.vocab_size * 2,
        "reference_list_floats": L * int(ids.shape[1]) * (6 * spec.hidden_size + f),
        "speedup_vs_reference": ref_full / med_pkt, "pkt_over_forward": med_pkt / med_fwd,
        "parity_max_abs_diff": max_err,
    }
    print(f"forward {med_fwd:.2f}s  pkt {med_pkt:.2f}s ({res['pkt_over_forward']:.2f}x forward)  reference "
          f"{ref_full / 60:.1f} min extrapolated ({res['speedup_vs_reference']:.0f}x pkt): "
          + ", ".join(f"{k} {v:.0f}s" for k, v in parts.items()), flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
