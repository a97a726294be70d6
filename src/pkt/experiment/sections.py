"""The report's sections beyond its main table: LaTen's injected delta and its step x rate grid, fine-tuning at
equal steps, and the analysis stage's neural-incompatibility tables; and the PNG writer the report's figures
share.
"""

from __future__ import annotations

import io
from pathlib import Path

from pkt.experiment.rows import LORA
from pkt.experiment.stats import mean_std
from pkt.tracking import ARM_LABEL


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


def laten_grid(records: list[dict]) -> dict:
    """LaTen's scored (step, rate) grid per task: {task: {"vanilla": [loss per seed], (step, rate): [loss per
    seed]}}, from the build records of studies run with ``budget.laten_grid`` (or ``laten_choice: select``)."""
    out: dict = {}
    for r in records:
        inj = r.get("injection") or {}
        if r["method"] != "laten" or not inj.get("selection"):
            continue
        t = out.setdefault(r["task"], {"vanilla": []})
        if inj.get("vanilla_align_loss") is not None:
            t["vanilla"].append(inj["vanilla_align_loss"])
        for g in inj["selection"]:
            t.setdefault((g["step"], g["rate"]), []).append(g["align_loss"])
    return out


def laten_grid_table(records: list[dict]) -> str:
    """Align loss of the LaTen-injected student at every step × rate, mean ± std (min–max) over seeds, next to
    the vanilla student's on the same examples."""
    grid = laten_grid(records)
    if not grid:
        return ""
    lines = ["| task | step | rate | align loss (mean ± std over seeds) | min – max | vs vanilla student |",
             "|---|---:|---:|---|---|---|"]
    for task, cells in grid.items():
        van = cells.get("vanilla") or []
        if van:
            m, sd = mean_std(van)
            lines.append(f"| {task} | 0 | – | {m:.4f} ± {sd:.4f} | {min(van):.4f} – {max(van):.4f} | (vanilla) |")
        for (step, rate), losses in sorted((k, v) for k, v in cells.items() if k != "vanilla"):
            m, sd = mean_std(losses)
            vs = f"{m - mean_std(van)[0]:+.4f}" if van else "–"
            lines.append(f"| {task} | {step} | {rate:g} | {m:.4f} ± {sd:.4f} | {min(losses):.4f} – {max(losses):.4f} "
                         f"| {vs} |")
    return "\n".join(lines) + "\n"


def plot_laten_grid(records: list[dict], path: Path) -> Path | None:
    """Align loss minus the vanilla student's, per step, one line per rate (mean over seeds, band min–max)."""
    grid = laten_grid(records)
    if not grid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(grid), figsize=(4.8 * len(grid), 3.6), squeeze=False)
    for ax, (task, cells) in zip(axes[0], grid.items()):
        base = mean_std(cells["vanilla"])[0] if cells.get("vanilla") else 0.0
        rates = sorted({k[1] for k in cells if k != "vanilla"})
        for rate in rates:
            pts = sorted((k[0], v) for k, v in cells.items() if k != "vanilla" and k[1] == rate)
            steps = [p[0] for p in pts]
            ax.plot(steps, [mean_std(v)[0] - base for _, v in pts], marker="o", label=f"rate {rate:g}")
            ax.fill_between(steps, [min(v) - base for _, v in pts], [max(v) - base for _, v in pts], alpha=0.15)
        ax.axhline(0, color="#888", lw=0.8)
        ax.set_title(f"LaTen {task}: align loss − vanilla" if cells.get("vanilla") else f"LaTen {task}: align loss")
        ax.set_xlabel("hypernetwork step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 1.5 tick
        ax.legend(fontsize=7)
    return save_png(fig, path)


def equal_steps_table(curves: dict, a: str = LORA, b: str = "laten-lora") -> str:
    """Training loss of arms ``a`` and ``b`` at equal steps (mean ± std over seeds; the same batches in one seed),
    and per seed the first step at which each arm's loss is at or below ``a``'s final loss.

    Both arms are shown against the same target: a step's loss depends on its batch as much as on the arm (an easy
    batch early on can already be under the final loss), so ``b``'s step says something only beside ``a``'s."""
    runs: dict = {}
    for label, pts in curves.items():
        m = ARM_LABEL.match(label)
        if m and m["method"] in (a, b):
            runs.setdefault(m["task"], {}).setdefault(m["method"], {})[int(m["seed"])] = dict(pts)
    lines = []
    for task, by in runs.items():
        if a not in by or b not in by:
            continue
        seeds = sorted(set(by[a]) & set(by[b]))
        steps = sorted(set.intersection(*(set(by[x][s]) for x in (a, b) for s in seeds))) if seeds else []
        if not steps:
            continue
        if not lines:
            lines = [f"| task | step | {a} loss | {b} loss | {b} − {a} |", "|---|---:|---|---|---|"]
        for st in steps:
            la, lb = ([by[x][s][st] for s in seeds] for x in (a, b))
            (ma, sa), (mb, sb) = mean_std(la), mean_std(lb)
            d = mean_std([y - x for x, y in zip(la, lb)])
            lines.append(f"| {task} | {st} | {ma:.4f} ± {sa:.4f} | {mb:.4f} ± {sb:.4f} | {d[0]:+.4f} ± {d[1]:.4f} |")
        reach = []
        for s in seeds:
            target = by[a][s][steps[-1]]
            hits = [(x, next((st for st in steps if by[x][s][st] <= target), None)) for x in (a, b)]
            reach.append(f"seed {s}: " + ", ".join(f"{x} step {h}" if h else f"{x} not within {steps[-1]}"
                                                   for x, h in hits))
        lines.append(f"| {task} | | first step at or below {a}'s final loss | {'; '.join(reach)} | |")
    return "\n".join(lines) + "\n" if lines else ""


def _ms(stat: dict | None, fmt: str = "+.3f") -> str:
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt.lstrip('+')}}" if stat else "–"


def _md_table(intro: str, header: list[str], align: str, rows: list[list]) -> list[str]:
    """A markdown table under its introducing sentence (``align``: its separator line); nothing without rows."""
    if not rows:
        return []
    return [intro, "", "| " + " | ".join(header) + " |", align, *("| " + " | ".join(map(str, r)) + " |" for r in rows),
            ""]


def analysis_tables(summary: dict | None) -> str:
    """The analysis stage's numbers (its figures' summaries) as tables: the parametric similarity of the Seeking
    and PiSSA inits and of the LaTen delta to the student's weights (mean ± std over layers), the teacher × student
    representation similarity per module and measure, and the next-token behaviour of the two models."""
    if not summary:
        return ""
    params = summary.get("params") or {}
    out = _md_table(
        "Parametric similarity of each LoRA init's update BA to the student's weight W (per layer, mean ± std over "
        "layers; W − BA is the frozen remainder):",
        ["init", "module", "layers", "cos(BA, W)", "cos(BA, W − BA)", "‖BA‖ / ‖W‖"], "|---|---|---:|---|---|---|",
        [[init, mod, st["cos_BA_original"]["n"], _ms(st["cos_BA_original"]), _ms(st["cos_BA_remaining"]),
          _ms(st["norm_ratio"], ".3f")] for init, mods in params.items() for mod, st in sorted(mods.items())])
    out += _md_table(
        "LaTen's delta Δ against the student's weight (on the located rows × columns, and over the whole matrix):",
        ["module", "layers", "cos(Δ, W located)", "cos(Δ, W)", "‖Δ‖ / ‖W located‖"], "|---|---:|---|---|---|",
        [[mod, st["cos_delta_located"]["n"], _ms(st["cos_delta_located"], "+.4f"), _ms(st["cos_delta_full"], "+.4f"),
          _ms(st["norm_ratio"], ".4f")] for mod, st in sorted((summary.get("laten_delta") or {}).items())])
    rep_rows = []
    for mod, measures in (summary.get("representations") or {}).items():
        for name, st in measures.items():
            dg = st.get("diagonal") or {}
            within = dg.get("best_within_2_of_proportional")
            rep_rows.append([mod, name, _ms(st.get("all"), ".3f"), _ms(st.get("teacher_ge_student"), ".3f"),
                             f"{dg.get('proportional_mean', float('nan')):.3f}",
                             f"{dg.get('best_mean', float('nan')):.3f}", "–" if within is None else f"{within:.0%}"])
    out += _md_table(
        "Teacher × student representation similarity of each module's output (mean ± std over layer pairs; "
        "'teacher ≥ student' keeps the pairs whose teacher layer index is at least the student's; the diagonal "
        "pairs each student layer with the teacher layer at the same relative depth, or with its best-matching "
        "one):",
        ["module", "measure", "all pairs", "teacher ≥ student", "same relative depth", "best teacher layer",
         "best within 2 layers of the same depth"], "|---|---|---|---|---:|---:|---:|", rep_rows)
    beh = summary.get("behaviour") or {}
    if beh:
        out += [f"Next-token behaviour on {beh['n_examples']} examples ({beh['n_tokens']} answer tokens): KL(teacher ‖ "
                f"student) mean {beh['kl_mean']:.3f}, median {beh['kl_median']:.3f}, 90th percentile "
                f"{beh['kl_p90']:.3f}; top-1 agreement {beh['top1_agreement']:.1%}; top-1 accuracy teacher "
                f"{beh['teacher_top1_accuracy']:.1%}, student {beh['student_top1_accuracy']:.1%}.", ""]
    return "\n".join(out)


def save_png(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return path
