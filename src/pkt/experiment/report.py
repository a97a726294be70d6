"""Write the study's results: results.{json,csv,md}, a bar plot, and a self-contained HTML page.

Input records are one per (method, task, seed): the task's headline metric with its per-example scores
(0/1 correctness, or pass@1 estimates) and the answer loss. Output rows aggregate over seeds: mean ± std,
the difference to the vanilla student with a 95% paired-bootstrap interval, and the answer loss.
The HTML page embeds every figure as base64 so it opens anywhere, offline, as a single file.

``pkt run`` and ``pkt report`` both come here through :func:`pkt.experiment.records.rebuild`, with the records
and analysis read back from the stage records, so results.md is a function of the records alone: no timestamps,
no paths, rows in the study's order, fixed float formats and a seeded bootstrap. The analysis figures are
redrawn from the analysis stage's plot inputs into ``OUT/figures/``; every figure is palette-compressed, since
a report is committed with its records.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import shutil
from pathlib import Path

from pkt.experiment.stats import mean_std, paired_bootstrap
from pkt.io import write_json, write_text

BASELINE = "student"
FIGURES = "figures"  # the analysis figures of a report, under its output directory
# The student evaluated in float32 (pkt.experiment.runner.STUDENT_FP32): a model that had to be evaluated in
# float32 (its change would not survive the study's eval dtype) is compared with it, so that its Δ is the
# method's and not the dtype's; its own row's Δ vs the student is the dtype's effect alone.
BASELINE_FP32 = "student-fp32"


def aggregate(records: list[dict]) -> list[dict]:
    rows = []
    methods = list(dict.fromkeys(r["method"] for r in records))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    for task in tasks:
        base = {r["seed"]: r for r in records if r["task"] == task and r["method"] == BASELINE}
        base32 = {r["seed"]: r for r in records if r["task"] == task and r["method"] == BASELINE_FP32}
        for method in methods:
            recs = sorted((r for r in records if r["task"] == task and r["method"] == method), key=lambda r: r["seed"])
            if not recs:
                continue
            score_m, score_s = mean_std([r["score"] for r in recs])
            losses = [r["answer_loss"] for r in recs if r.get("answer_loss") is not None]
            row = {
                "method": method, "task": task, "metric": recs[0]["metric"], "seeds": [r["seed"] for r in recs],
                "n_examples": recs[0].get("n", len(recs[0].get("per_example", []))),
                "mean": score_m, "std": score_s,
                "answer_loss_mean": mean_std(losses)[0] if losses else None,
                "answer_loss_std": mean_std(losses)[1] if losses else None,
                "delta": None, "delta_low": None, "delta_high": None,
                "dtype": _dtype_cell(recs),
            }
            ref = base
            if (method != BASELINE_FP32 and base32 and all(r.get("dtype") == "float32" for r in recs)
                    and all(r["seed"] in base32 for r in recs)):
                ref = base32
                row["delta_vs"] = BASELINE_FP32
            if method != BASELINE and ref and all(r["seed"] in ref for r in recs):
                d, lo, hi = paired_bootstrap([r["per_example"] for r in recs],
                                             [ref[r["seed"]]["per_example"] for r in recs])
                row.update(delta=d, delta_low=lo, delta_high=hi)
                row.setdefault("delta_vs", BASELINE)
            rows.append(row)
    return rows


def _dtype_cell(recs: list[dict]) -> str | None:
    """The evaluation dtype(s) of a row; a float32 fallback says how little of the change survived."""
    used = sorted({r["dtype"] for r in recs if r.get("dtype")})
    if not used:
        return None
    falls = [r["precision"] for r in recs if (r.get("precision") or {}).get("fallback")]
    if falls:
        frac = min(p["fraction"] for p in falls)
        return f"{'/'.join(used)} ({frac:.1%} of the change survives {falls[0]['requested']})"
    return "/".join(used)


def _fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def _delta_cell(r: dict) -> str:
    if r["delta"] is None:
        return "–"
    cell = f"{r['delta']:+.3f} [{r['delta_low']:+.3f}, {r['delta_high']:+.3f}]"
    return cell + (f" (vs {BASELINE_FP32})" if r.get("delta_vs") == BASELINE_FP32 else "")


def injection_table(records: list[dict]) -> str:
    """LaTen's chosen point and injected delta per seed: ‖Δ‖/‖W‖ over the located weights, ‖Δ‖ over bf16's
    resolution (half an ulp of each weight), and the share of located weights whose bf16 value changes."""
    recs = [r for r in records if r.get("injection")]
    if not recs:
        return ""
    lines = ["| method | task | seed | choice | step | rate | ‖Δ‖/‖W‖ (located) | ‖Δ‖ / bf16 resolution | "
             "bf16 entries changed |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in recs:
        i = r["injection"]

        def g(k, fmt):
            return "–" if i.get(k) is None else format(i[k], fmt)

        lines.append(f"| {r['method']} | {r['task']} | {r['seed']} | {i.get('choice') or '–'} | {g('step', 'd')} | "
                     f"{g('rate', 'g')} | {g('delta_rel_norm', '.3g')} | {g('delta_bf16_ratio', '.3g')} | "
                     f"{g('delta_bf16_changed', '.1%')} |")
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | task | metric | n | score (mean ± std) | Δ vs student [95% CI] | answer loss | eval dtype |",
             "|---|---|---|---:|---|---|---|---|"]
    for r in rows:
        delta = _delta_cell(r)
        loss = "–" if r["answer_loss_mean"] is None else f"{r['answer_loss_mean']:.3f} ± {r['answer_loss_std']:.3f}"
        lines.append(f"| {r['method']} | {r['task']} | {r['metric']} | {r['n_examples']} | "
                     f"{_fmt(r['mean'])} ± {_fmt(r['std'])} | {delta} | {loss} | {r.get('dtype') or '–'} |")
    return "\n".join(lines) + "\n"


def plot_scores(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = [r for r in rows if r["task"] == task]
        ax.bar([r["method"] for r in sub], [r["mean"] for r in sub], yerr=[r["std"] for r in sub], capsize=3,
               color=["#888" if r["method"] in ("student", "teacher") else "#3b7dd8" for r in sub])
        ax.set_title(f"{task} ({sub[0]['metric']})")
        ax.tick_params(axis="x", rotation=40)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return path


def write_report(out: Path, records: list[dict], manifest: dict, figures: list[Path] = (), *,
                 analysis: dict | None = None, curves: dict | None = None) -> dict:
    """Results and report of ``records`` into ``out``. ``figures``: PNGs included as they are (copied into
    ``out/figures``); ``analysis``: the analysis stage's result, whose ``plots`` are drawn; ``curves``: the
    training loss per arm (label -> [(step, loss)]) for loss_curves.png."""
    from pkt.analyse import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    write_json(out / "results.json", {"rows": rows, "records": records})
    buf = io.StringIO()
    cols = ["method", "task", "metric", "n_examples", "mean", "std", "delta", "delta_low", "delta_high",
            "answer_loss_mean", "answer_loss_std", "dtype"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(out / "results.csv", buf.getvalue())
    table = markdown_table(rows)
    inj = injection_table(records)
    inj = f"\n## Injected delta (LaTen)\n\n{inj}" if inj else ""
    write_text(out / "results.md", f"# Results: {manifest.get('name', 'pkt run')}\n\n{table}{inj}")
    figs = [plot_scores(rows, out / "scores.png")]
    if analysis and analysis.get("plots"):
        figs += [out / FIGURES / n for n in plots.analysis_figures(analysis["plots"], out / FIGURES)]
    for f in map(Path, figures):
        dst = out / FIGURES / f.name
        if f.is_file() and f.resolve() != dst.resolve():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
        figs.append(dst)
    if curves:
        from pkt.tracking import plot_loss_curves

        figs.append(plot_loss_curves(curves, out / "loss_curves.png"))
    figs = [Path(f) for f in figs if f is not None and Path(f).is_file()]
    for f in figs:
        plots.compact_png(f)
    write_text(out / "report.html", render_html(manifest, rows, figs))
    return {"rows": rows, "files": ["results.json", "results.csv", "results.md", "report.html",
                                    *(f.relative_to(out).as_posix() for f in figs)]}


def render_html(manifest: dict, rows: list[dict], figures: list[Path]) -> str:
    head = ["method", "task", "metric", "n", "score", "Δ vs student [95% CI]", "answer loss", "eval dtype"]
    body = []
    for r in rows:
        delta = _delta_cell(r)
        loss = "–" if r["answer_loss_mean"] is None else f"{r['answer_loss_mean']:.3f} ± {r['answer_loss_std']:.3f}"
        cells = [r["method"], r["task"], r["metric"], r["n_examples"], f"{r['mean']:.3f} ± {r['std']:.3f}", delta, loss,
                 r.get("dtype") or "–"]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    imgs = []
    for f in figures:
        f = Path(f)
        if f.is_file():
            data = base64.b64encode(f.read_bytes()).decode()
            imgs.append(f'<figure><img alt="{html.escape(f.stem)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(f.stem)}</figcaption></figure>")
    stages = "".join(
        f"<tr><td>{html.escape(s['stage'])}</td><td>{s['seconds']:.1f}</td><td>{'cached' if s['cached'] else 'run'}</td></tr>"
        for s in manifest.get("stages", [])
    )
    cfg = html.escape(manifest.get("config_yaml", ""))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pkt report: {html.escape(str(manifest.get('name', '')))}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
th{{background:#f0f0f0}}img{{max-width:100%}}figure{{margin:1em 0}}pre{{background:#f7f7f7;padding:1em;overflow:auto}}</style>
</head><body>
<h1 id="title">pkt report: {html.escape(str(manifest.get('name', '')))}</h1>
<p>teacher <b>{html.escape(str(manifest.get('teacher', '')))}</b> → student <b>{html.escape(str(manifest.get('student', '')))}</b>;
seeds {html.escape(str(manifest.get('seeds', '')))}; pkt {html.escape(str(manifest.get('versions', {}).get('pkt', '')))};
finished {html.escape(str(manifest.get('finished', '')))}</p>
<h2>Results</h2>
<table id="results"><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{''.join(body)}</table>
<p>Scores are means ± std over seeds; Δ is the paired difference to the vanilla student with a 95% bootstrap
interval over seeds and examples; answer loss is the mean teacher-forced NLL of gold responses (lower is better).</p>
<h2>Figures</h2>{''.join(imgs)}
<h2>Stages</h2><table><tr><th>stage</th><th>seconds</th><th>status</th></tr>{stages}</table>
<h2>Configuration</h2><pre>{cfg}</pre>
</body></html>
"""
