"""Matplotlib figures for the analyses (Agg backend; small PNGs)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from pkt.analyse.similarity import MEASURE_LABELS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=90, bbox_inches="tight")
    os.replace(tmp, path)
    _plt().close(fig)
    return str(path)


def _mean(vals):
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def plot_params(results: dict[str, list[dict]], path, title: str = "") -> str:
    """Cosine similarity across student layers: rows = modules, columns = (BA vs original, BA vs remaining),
    one line per init. ``results`` maps an init name to ``lora_similarity`` records."""
    plt = _plt()
    modules = sorted({r["module"] for recs in results.values() for r in recs}, key=lambda m: ("up" not in m, m))
    cols = [("cos_BA_original", "LoRA (BA) vs Original W"), ("cos_BA_remaining", "LoRA (BA) vs Remaining W")]
    fig, axes = plt.subplots(len(modules), 2, figsize=(10, 2.8 * len(modules)), squeeze=False)
    for i, mod in enumerate(modules):
        for j, (key, label) in enumerate(cols):
            ax = axes[i][j]
            for k, (init, recs) in enumerate(results.items()):
                rs = sorted((r for r in recs if r["module"] == mod), key=lambda r: r["layer"])
                if not rs:  # an init that does not target this module (PiSSA here covers up/down/v/o)
                    continue
                ys = [r[key] for r in rs]
                # one colour per init in every panel, also where an earlier init has no line
                ax.plot([r["layer"] for r in rs], ys, marker="o", ms=3, color=f"C{k}",
                        label=f"{init} (mean {_mean(ys):.3f})")
            ax.axhline(0.0, color="grey", lw=0.6)
            ax.set_title(f"{mod}: {label}", fontsize=10)
            ax.set_xlabel("student layer")
            ax.set_ylabel("cosine")
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    # leave the suptitle its own strip above the first row's panel titles
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.8 * len(modules))) if title else None)
    return _save(fig, path)


def plot_delta(records: list[dict], path, title: str = "") -> str:
    """LaTen-style: cos(delta, W_located) across layers, one line per module."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for mod in sorted({r["module"] for r in records}):
        rs = sorted((r for r in records if r["module"] == mod), key=lambda r: r["layer"] or 0)
        ys = [r["cos_delta_located"] for r in rs]
        ax.plot([r["layer"] for r in rs], ys, marker="o", ms=3, label=f"{mod} (mean {_mean(ys):.3f})")
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("student layer")
    ax.set_ylabel("cos(delta, W located)")
    ax.legend(fontsize=8)
    ax.set_title(title or "injected delta vs student weights", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_heatmaps(result: dict, measure: str, path, kinds=None, names=("teacher", "student")) -> str:
    """Teacher-layer × student-layer heat-maps of one measure, one panel per module kind, each titled with
    mean and std over all cells; the proportional-depth path (white) and best teacher layer (red dots)
    are overlaid."""
    from pkt.analyse.representations import KIND_LABELS

    plt = _plt()
    kinds = [k for k in (kinds or result["modules"]) if k in result["modules"]]
    ncol = 2 if len(kinds) > 1 else 1
    nrow = math.ceil(len(kinds) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 4.4 * nrow), squeeze=False)
    vmin = -1.0 if measure in ("rsa", "dcka") else 0.0
    for ax, kind in zip([a for row in axes for a in row], kinds):
        entry = result["modules"][kind][measure]
        mat, summ = entry["matrix"], entry["summary"]
        im = ax.imshow(mat, origin="lower", aspect="auto", cmap="viridis", vmin=min(vmin, 0.0), vmax=1.0)
        d = summ["diagonal"]
        ns = len(mat)
        ax.plot(d["proportional_teacher"], range(ns), color="white", lw=1, ls="--")
        ax.plot(d["best_teacher"], range(ns), "o", color="red", ms=2.5)
        a = summ["all"]
        ax.set_title(f"{KIND_LABELS.get(kind, kind)}: mean {a['mean']:.3f}, std {a['std']:.3f}", fontsize=10)
        ax.set_xlabel(f"{names[0]} layer")
        ax.set_ylabel(f"{names[1]} layer")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    for ax in [a for row in axes for a in row][len(kinds):]:
        ax.axis("off")
    fig.suptitle(f"{MEASURE_LABELS.get(measure, measure)} on {result.get('n_tokens', '?')} tokens "
                 "(white: proportional depth, red: best teacher layer)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_behaviour(result: dict, path, title: str = "") -> str:
    """Histogram of per-token KL(teacher‖student) (log x) and per-example mean KL."""
    plt = _plt()
    s = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    # the per-token KL itself, or its histogram (what an analysis record keeps: see plot_inputs)
    hist = result.get("kl_hist")
    kl = result.get("per_token", {}).get("kl")
    if not hist and kl:
        hist = kl_histogram(kl)
    if hist:
        edges = hist["edges"]
        axes[0].hist(edges[:-1], bins=edges, weights=hist["counts"], color="tab:blue")
        axes[0].set_xscale("log")
    axes[0].axvline(s["kl_mean"], color="red", lw=1, label=f"mean {s['kl_mean']:.3f}")
    axes[0].axvline(s["kl_median"], color="black", lw=1, ls="--", label=f"median {s['kl_median']:.3f}")
    axes[0].set_xlabel("KL(teacher||student) per response token (nats)")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{s['n_tokens']} tokens, top-1 agreement {s['top1_agreement']:.3f}", fontsize=10)
    axes[1].bar(range(len(s["per_example_kl_mean"])), s["per_example_kl_mean"], color="tab:orange")
    axes[1].set_xlabel("example")
    axes[1].set_ylabel("mean KL (nats)")
    axes[1].set_title("per example", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


# ---- the figures of a study's analysis stage, from its JSON plot inputs ---------------------------
# The analysis stage stores what its figures show (``plot_inputs``) so that ``pkt report`` can redraw them from
# a committed record alone, with no model loaded. Floats are kept to 5 significant digits and the per-token KL
# as a histogram: the record stays small (tens of kB), and nothing a figure shows is lost at that precision.

def _round(x, digits: int = 5):
    if isinstance(x, float):
        return x if not math.isfinite(x) else float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    return x


def kl_histogram(kl: list[float], bins: int = 40) -> dict:
    """The histogram :func:`plot_behaviour` draws: ``bins`` log-spaced bins over the per-token KL (floored at 1e-6)."""
    import numpy as np

    pos = [max(v, 1e-6) for v in kl]
    lo, hi = math.log10(min(pos)), math.log10(max(pos)) + 1e-9
    edges = [10 ** (lo + (hi - lo) * i / bins) for i in range(bins + 1)]
    return {"edges": edges, "counts": np.histogram(pos, bins=edges)[0].tolist()}


def plot_inputs(params: dict[str, list[dict]] | None, delta: list[dict] | None, representations: dict | None,
                behaviour: dict | None) -> dict:
    """The JSON-ready inputs of :func:`analysis_figures`: per-layer LoRA-init and LaTen-delta cosines, the
    representation matrices with their diagonals, the behaviour summary and KL histogram."""
    out: dict = {}
    if params:
        keep = ("module", "layer", "cos_BA_original", "cos_BA_remaining")
        out["params"] = {init: [{k: r.get(k) for k in keep} for r in recs] for init, recs in params.items()}
    if delta:
        out["laten_delta"] = [{k: r.get(k) for k in ("module", "layer", "cos_delta_located")} for r in delta]
    if representations:
        mods = representations["modules"]
        out["representations"] = {
            "n_tokens": representations.get("n_tokens"),
            "measures": list(next(iter(mods.values()))) if mods else [],
            "modules": {k: {m: {"matrix": e["matrix"],
                                "summary": {"all": {s: e["summary"]["all"][s] for s in ("mean", "std")},
                                            "diagonal": {d: e["summary"]["diagonal"][d]
                                                         for d in ("proportional_teacher", "best_teacher")}}}
                            for m, e in per.items()} for k, per in mods.items()}}
    if behaviour:
        s = behaviour["summary"]
        out["behaviour"] = {"summary": {k: s[k] for k in ("n_tokens", "kl_mean", "kl_median", "top1_agreement",
                                                          "per_example_kl_mean")}}
    out = _round(out)
    kl = (behaviour or {}).get("per_token", {}).get("kl")
    if kl:  # not rounded: the bin edges of a near-constant KL would collapse
        out["behaviour"]["kl_hist"] = kl_histogram(kl)
    return out


def analysis_figures(inputs: dict, out_dir) -> list[str]:
    """Every figure of the analysis stage drawn from :func:`plot_inputs` into ``out_dir``, in a fixed order;
    the file names (the analysis stage and ``pkt report`` draw the same ones)."""
    out_dir = Path(out_dir)
    names = []
    if inputs.get("params"):
        names.append(plot_params(inputs["params"], out_dir / "params.png", title="LoRA init vs student weights"))
    if inputs.get("laten_delta"):
        names.append(plot_delta(inputs["laten_delta"], out_dir / "laten_delta.png",
                                title="LaTen delta vs located weights"))
    rep = inputs.get("representations")
    if rep:
        for m in rep["measures"]:
            names.append(plot_heatmaps(rep, m, out_dir / f"representations_{m}.png"))
    if inputs.get("behaviour"):
        names.append(plot_behaviour(inputs["behaviour"], out_dir / "behaviour.png",
                                    title="teacher vs student, per token"))
    return [Path(n).name for n in names]


def compact_png(path) -> None:
    """Rewrite a PNG with a 256-colour palette (a third of the bytes for these plots, no visible change): the
    figures of a report are committed with its records."""
    from PIL import Image

    path = Path(path)
    with Image.open(path) as im:
        if im.mode == "P":  # already compact: quantising again would only lose colours
            return
        q = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    q.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
