"""Write the study's results: results.{json,csv,md}, a bar plot, and a self-contained HTML page.

Input records are one per (method, task, seed): the task's headline metric with its per-example scores
(0/1 correctness, or pass@1 estimates) and the answer loss. Output rows aggregate over seeds: mean ± std,
the difference to the vanilla student and to LoRA with a 95% paired-bootstrap interval (questions resampled once
for all seeds, and seeds: :mod:`pkt.experiment.stats`) and its p-value, Holm-adjusted over every comparison the
report states, and the answer loss.
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

# rows and sections are computed in their own modules; their public names stay importable from here
from pkt.experiment.rows import ALPHA, BASELINE_FP32, adjust, aggregate, comparisons  # noqa: F401
from pkt.experiment.sections import (analysis_tables, equal_steps_table, injection_table,  # noqa: F401
                                     laten_grid_table, plot_laten_grid, save_png)
from pkt.experiment.stats import holm
from pkt.io import write_json, write_text

FIGURES = "figures"  # the analysis figures of a report, under its output directory

def _fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.4f}"


def _p_cell(p: float | None, q: float | None) -> str:
    """A comparison's p-value and its Holm-adjusted one: "0.004* (0.120)"; * marks p ≤ ALPHA."""
    if p is None:
        return "–"
    star = lambda x: "*" if x <= ALPHA else ""  # noqa: E731
    return f"{_p(p)}{star(p)}" + ("" if q is None else f" ({_p(q)}{star(q)})")


def stats_note(family: int) -> str:
    """How the intervals and p-values of a report are made, under its table."""
    return ("Intervals: 95% paired bootstrap that resamples the questions once for all seeds (every seed is scored on "
            "the same questions) and the seeds. p: the bootstrap's two-sided p-value; in parentheses, Holm-adjusted "
            f"over the {family} comparison{'s' * (family != 1)} this report states (both Δ columns and the paired comparisons); "
            f"* marks p ≤ {ALPHA:g}.\n")


def _delta_cell(r: dict) -> str:
    if r["delta"] is None:
        return "–"
    cell = f"{r['delta']:+.3f} [{r['delta_low']:+.3f}, {r['delta_high']:+.3f}]"
    return cell + (f" (vs {BASELINE_FP32})" if r.get("delta_vs") == BASELINE_FP32 else "")


def _lora_cell(r: dict) -> str:
    if r.get("delta_lora") is None:
        return "–"
    return f"{r['delta_lora']:+.3f} [{r['delta_lora_low']:+.3f}, {r['delta_lora_high']:+.3f}]"


def lr_note(manifest: dict) -> str:
    """A line naming the methods that fine-tuned at their own lr (the config's ``method_lrs``), or nothing."""
    cfg = manifest.get("config") or {}
    own = cfg.get("method_lrs") or {}
    if not own:
        return ""
    base = (cfg.get("budget") or {}).get("lr")
    each = ", ".join(f"{m} {lr:g}" for m, lr in own.items())
    return (f"\nLearning rates: {each} (each its own, `method_lrs`); every other fine-tuned method at the budget's "
            f"{base:g} (or its task's, `per_task`).\n")


def progress_note(progress: dict | None) -> str:
    """The mark on a study still running (committed records are exported stage by stage): its rows hold only the
    seeds finished so far, and a std over fewer seeds than planned is not the study's."""
    if not progress or progress["recorded"] >= progress["planned"]:
        return ""
    return (f"**Unfinished study: records of {progress['recorded']} of {progress['planned']} stages.** Each row is "
            "over the seeds finished so far (column `seeds`).")


def stage_time_note(progress: dict | None) -> str:
    """The compute the records account for. In report.html only: results.md is a function of the results, and
    two runs with the same results (say, on two executors) take different times."""
    if not progress:
        return ""
    return (f"Stage time: {_duration(progress['seconds'])} over {progress['recorded']} stages (the sum of each "
            "stage's own time).")


def method_costs(stages: list[dict], tasks: list[str]) -> list[dict]:
    """What each method cost on the machine that ran the study, from its recorded stages (records.Loaded.progress:
    each stage's own wall time and, where recorded, its peak resident memory): per method (or shared stage) and
    task, its builds and its evaluations, in the order the study first ran them. In report.html only, as every
    timing."""
    import statistics

    from pkt.stage import BUILD, EVAL, Stage

    groups: dict[tuple, dict] = {}
    for s in stages:
        try:
            st = Stage.from_name(s["stage"], tasks)
        except ValueError:
            continue
        what = {BUILD: "build", EVAL: "evaluation"}.get(st.kind, st.kind)
        g = groups.setdefault((st.method or st.kind, st.task, what), {"seconds": [], "peaks": []})
        g["seconds"].append(float(s.get("seconds") or 0.0))
        if s.get("peak_rss_bytes"):
            g["peaks"].append(int(s["peak_rss_bytes"]))
    return [{"method": m, "task": t, "stage": w, "n": len(g["seconds"]), "median_s": statistics.median(g["seconds"]),
             "min_s": min(g["seconds"]), "max_s": max(g["seconds"]),
             "peak_gib": max(g["peaks"]) / 2**30 if g["peaks"] else None} for (m, t, w), g in groups.items()]


def cost_html(progress: dict | None, tasks: list[str]) -> str:
    """The per-method cost table of report.html (:func:`method_costs`), or nothing without stage records."""
    stages = (progress or {}).get("stages") or []
    rows = method_costs(stages, tasks)
    if not rows:
        return ""
    machines = sorted({f"{m.get('cpu', '?')} ({m.get('arch', '?')}, {m.get('cpu_capability', '?')}"
                       f"{', AMX bf16' if m.get('amx_bf16') else ''}), torch {m.get('torch', '?')}"
                       for m in (s.get("machine") for s in stages) if isinstance(m, dict)})
    where = f" Machine: {'; '.join(machines)}." if machines else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            r["method"], r["task"] or "–", r["stage"], r["n"], _span(r["median_s"]),
            f"{_span(r['min_s'])} – {_span(r['max_s'])}" if r["n"] > 1 else "–",
            "–" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}")) + "</tr>" for r in rows)
    return ("<h2>Cost per method</h2><table id=\"costs\"><tr><th>method</th><th>task</th><th>stage</th><th>n</th>"
            "<th>wall time (median)</th><th>range</th><th>peak resident memory (GiB, max)</th></tr>"
            f"{body}</table><p>Each stage's own wall time and peak resident memory on the machine that ran it (a "
            "stage restored from records keeps the time it took where it ran); builds include their training, "
            f"evaluations their generation and scoring.{html.escape(where)}</p>")


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 3600 else \
        f"{seconds / 3600:.2f} h"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def markdown_table(rows: list[dict]) -> str:
    vs_lora = any(r.get("delta_lora") is not None for r in rows)
    cap = any(r.get("at_cap") is not None for r in rows)
    first = any("first_answer" in r for r in rows)
    head = "| method | task | metric | seeds | n | score (mean ± std) | Δ vs student [95% CI] | p (Holm) |"
    head += (" Δ vs lora [95% CI] | p (Holm) |" * vs_lora + " at cap |" * cap + " first answer |" * first
             + " answer loss | eval dtype |")
    lines = [head, "|---|---|---|---:|---:|---|---|---|" + "---|---|" * vs_lora + "---:|" * cap + "---:|" * first
             + "---|---|"]
    for r in rows:
        delta = _delta_cell(r)
        loss = "–" if r["answer_loss_mean"] is None else f"{r['answer_loss_mean']:.3f} ± {r['answer_loss_std']:.3f}"
        at_cap = "–" if r.get("at_cap") is None else f"{r['at_cap']:.1%}"
        lines.append(f"| {r['method']} | {r['task']} | {r['metric']} | {len(r['seeds'])} | {r['n_examples']} | "
                     f"{_fmt(r['mean'])} ± {_fmt(r['std'])} | {delta} | {_p_cell(r['delta_p'], r.get('delta_p_holm'))} |"
                     + f" {_lora_cell(r)} | {_p_cell(r['delta_lora_p'], r.get('delta_lora_p_holm'))} |" * vs_lora
                     + f" {at_cap} |" * cap + f" {_fmt(r.get('first_answer'))} |" * first
                     + f" {loss} | {r.get('dtype') or '–'} |")
    return "\n".join(lines) + "\n"


def comparisons_table(records: list[dict], pairs: list[tuple[str, str]] | None = None,
                      comps: list[dict] | None = None) -> str:
    """:func:`comparisons` as a markdown table; ``comps``: already computed (and Holm-adjusted by :func:`adjust`),
    else computed here and adjusted among themselves."""
    if comps is None:
        comps = comparisons(records, pairs)
        for c, q in zip(comps, holm([c["p"] for c in comps])):
            c["p_holm"] = q
    if not comps:
        return ""
    lines = ["| a − b | task | seeds | Δ score [95% CI] | p (Holm) | significant (raw / Holm) | "
             "Δ answer loss (mean ± std) |", "|---|---|---:|---|---|---|---|"]
    for c in comps:
        loss = f"{c['loss'][0]:+.3f} ± {c['loss'][1]:.3f}" if c["loss"] else "–"
        verdict = f"{'yes' if c['p'] <= ALPHA else 'no'} / {'yes' if c['p_holm'] <= ALPHA else 'no'}"
        lines.append(f"| {c['a']} − {c['b']} | {c['task']} | {len(c['seeds'])} | {c['delta']:+.3f} [{c['low']:+.3f}, "
                     f"{c['high']:+.3f}] | {_p_cell(c['p'], c['p_holm'])} | {verdict} | {loss} |")
    return "\n".join(lines) + "\n"


def plot_scores(rows: list[dict], path: Path) -> Path | None:
    """Each arm's score per task; None while no evaluation has a record (a study that has just started)."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    arms = max(sum(r["task"] == t for r in rows) for t in tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.5, 0.5 * arms + 1.5) * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = [r for r in rows if r["task"] == task]
        ax.bar([r["method"] for r in sub], [r["mean"] for r in sub], yerr=[r["std"] for r in sub], capsize=3,
               color=["#888" if r["method"] in ("student", "teacher") else "#3b7dd8" for r in sub])
        ax.set_title(f"{task} ({sub[0]['metric']})")
        # anchored at the label's end so that long arm names stay under their own bar
        plt.setp(ax.get_xticklabels(), rotation=40, ha="right", rotation_mode="anchor")
    return save_png(fig, path)


def write_report(out: Path, records: list[dict], manifest: dict, figures: list[Path] = (), *,
                 analysis: dict | None = None, curves: dict | None = None,
                 progress: dict | None = None) -> dict:
    """Results and report of ``records`` into ``out``. ``figures``: PNGs included as they are (copied into
    ``out/figures``); ``analysis``: the analysis stage's result, whose ``plots`` are drawn; ``curves``: the
    training loss per arm (label -> [(step, loss)]) for loss_curves.png; ``progress``: the stages recorded,
    planned and their summed stage times (records.Loaded.progress), which head the results."""
    from pkt.analyse import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    comps = comparisons(records)
    family = adjust(rows, comps)
    write_json(out / "results.json", {"rows": rows, "comparisons": comps, "records": records})
    buf = io.StringIO()
    cols = ["method", "task", "metric", "n_examples", "mean", "std", "delta", "delta_low", "delta_high", "delta_p",
            "delta_p_holm", "delta_lora", "delta_lora_low", "delta_lora_high", "delta_lora_p", "delta_lora_p_holm",
            "at_cap", "answer_loss_mean", "answer_loss_std", "dtype"]
    if any("first_answer" in r for r in rows):
        cols.insert(cols.index("at_cap") + 1, "first_answer")
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(out / "results.csv", buf.getvalue())
    table = markdown_table(rows) + (f"\n{stats_note(family)}" if family else "") + lr_note(manifest)
    inj = injection_table(records)
    inj = f"\n## Injected delta (LaTen)\n\n{inj}" if inj else ""
    grid = laten_grid_table(records)
    grid = f"\n## LaTen across steps, rates and seeds (align loss)\n\n{grid}" if grid else ""
    pairs = comparisons_table(records, comps=comps)
    pairs = f"\n## Paired comparisons between arms\n\n{pairs}" if pairs else ""
    steps = equal_steps_table(curves or {})
    steps = f"\n## Fine-tuning at equal steps (training loss)\n\n{steps}" if steps else ""
    incompat = analysis_tables((analysis or {}).get("summary"))
    incompat = f"\n## Neural incompatibility (the analysis stage)\n\n{incompat}" if incompat else ""
    status = progress_note(progress)
    status = f"{status}\n\n" if status else ""
    write_text(out / "results.md",
               f"# Results: {manifest.get('name', 'pkt run')}\n\n{status}{table}{pairs}{inj}{grid}{steps}{incompat}")
    figs = [plot_scores(rows, out / "scores.png"), plot_laten_grid(records, out / "laten_grid.png")]
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
    tasks = [str(t) for t in manifest.get("tasks") or []]
    write_text(out / "report.html", render_html(manifest, rows, figs, f"{status}{stage_time_note(progress)}",
                                                family=family, costs=cost_html(progress, tasks)))
    return {"rows": rows, "files": ["results.json", "results.csv", "results.md", "report.html",
                                    *(f.relative_to(out).as_posix() for f in figs)]}


def render_html(manifest: dict, rows: list[dict], figures: list[Path], status: str = "", family: int = 0,
                costs: str = "") -> str:
    first = any("first_answer" in r for r in rows)
    head = ["method", "task", "metric", "seeds", "n", "score", "Δ vs student [95% CI]", "p (Holm)",
            "Δ vs lora [95% CI]", "p (Holm)",
            "at cap", *["first answer"] * first, "answer loss", "eval dtype"]
    body = []
    for r in rows:
        delta = _delta_cell(r)
        loss = "–" if r["answer_loss_mean"] is None else f"{r['answer_loss_mean']:.3f} ± {r['answer_loss_std']:.3f}"
        cells = [r["method"], r["task"], r["metric"], len(r["seeds"]), r["n_examples"],
                 f"{r['mean']:.3f} ± {r['std']:.3f}", delta, _p_cell(r.get("delta_p"), r.get("delta_p_holm")),
                 _lora_cell(r), _p_cell(r.get("delta_lora_p"), r.get("delta_lora_p_holm")),
                 "–" if r.get("at_cap") is None else f"{r['at_cap']:.1%}", *[_fmt(r.get("first_answer"))] * first,
                 loss, r.get("dtype") or "–"]
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
    lrs = lr_note(manifest).strip()
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
{f"<p><b>{html.escape(status.strip().replace('**', ''))}</b></p>" if status else ""}
<h2>Results</h2>
<table id="results"><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{''.join(body)}</table>
<p>Scores are means ± std over seeds; Δ is the paired difference to the vanilla student (or to LoRA);
answer loss is the mean teacher-forced NLL of gold responses (lower is better). {html.escape(stats_note(family)) if family else ""}{html.escape(" " + lrs) if lrs else ""}</p>
<h2>Figures</h2>{''.join(imgs)}
{costs}
<h2>Stages</h2><table><tr><th>stage</th><th>seconds</th><th>status</th></tr>{stages}</table>
<h2>Configuration</h2><pre>{cfg}</pre>
</body></html>
"""
