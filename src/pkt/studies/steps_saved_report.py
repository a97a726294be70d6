"""The steps-saved report (``steps-saved.md``, ``steps-saved.png``), derived from its committed records alone.

:mod:`pkt.studies.steps_saved` writes ``steps-saved.json`` (the settings and the held-out set) and one record per arm
and seed, ``curves/<arm>-s<seed>.json``: the held-out loss at every measured step, per held-out example ([summed
NLL, tokens]), the training loss per step and the examples every step trained on. This module reads nothing else,
so the report is re-derived from a commit byte for byte (no timestamps, paths or timings in the output, a seeded
bootstrap, PNG metadata without the library version).

What it states, over the seeds whose every arm is recorded:

* per measured step k, each arm's mean held-out loss (the mean over examples of each example's mean token NLL, so
  that an example is one unit of the bootstrap) with a 95% interval, and each arm minus lora with its interval
  and p-value. Intervals: :func:`pkt.experiment.stats.paired_difference`'s two-way bootstrap: the held-out
  examples, shared by every arm and seed, are resampled once for all of them, and the seeds independently;
* the steps each arm takes to reach LoRA's final held-out loss (lora's mean at the last measured step): the first
  measured step whose mean loss is at or below it, linearly interpolated between that step and the one before
  (the loss is known only at the measured steps; between them it is taken as a straight line), or "not reached";
  0 when the arm starts at or below it. Its interval comes from the same bootstrap draws
  (:func:`pkt.experiment.stats.two_way_counts`): in each replicate the target and every arm's crossing are
  recomputed from the resampled curves; a replicate whose curve never reaches the target counts as infinitely
  many steps. "Saved" is lora's steps minus the arm's, per replicate, with its bootstrap p;
* each control beside its arm where both are arms (``seeking-random``, ``seeking-shuffled``: the same spectrum,
  other blocks; ``laten-random-lora``: LaTen's random-teacher null injected before the same fine-tuning): the arm
  minus its control in held-out loss at the last measured step and in steps to LoRA's final loss, from the same
  bootstrap replicates. This is the comparison that says whether the teacher's part matters, which the two rows
  against lora only suggest;
* Holm's adjusted p beside every raw one, over one family: every comparison the report states (each step's
  difference with lora, each arm's steps saved, each arm against its control).

A record whose batches differ from lora's of the same seed is refused: the comparison is paired by construction.

**Joined studies.** A study whose config names others in ``compare_with`` (records directories of steps-saved
studies with the same lora: the same settings but for the arms, their lrs and the seeds, the same held-out
examples) is reported with their arms beside its own, over the seeds every study ran. The lora curves of a seed
must be equal bit for bit across the studies (the same code path on the same batches; only the time taken may
differ): that is what makes the arms of separate runs paired, and a study whose lora differs is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pkt.errors import PktError
from pkt.studies import staged
from pkt.studies.staged import p_value, read_record
from pkt.experiment.stats import N_BOOT, bootstrap_p, holm, paired_difference, two_way_counts

META, CURVES = "steps-saved.json", "curves"
REPORT, PLOT = "steps-saved.md", "steps-saved.png"
CURVE_PREFIX = "curve-"
LEVEL = 0.95


def curve_name(arm: str, seed: int, task: str) -> str:
    """The stage name of one arm's curve (its directory is ``<name>-<key hash>``)."""
    return f"{CURVE_PREFIX}{arm}-{task}-s{seed}"


def curve_file(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}.json"


def load(records: str | Path, compare_with: Sequence[str | Path] = ()) -> dict:
    """{"meta", "curves": {(arm, seed): record}} of a records directory, joined with the studies of
    ``compare_with`` (:func:`join`)."""
    root = staged.records_root(records, META, "steps-saved")
    curves = staged.seeded_records(root / CURVES, "steps-saved", "curve", "arm")
    rec = {"meta": read_record(root / META, "steps-saved"), "curves": curves}
    return join(rec, [load(d) for d in compare_with]) if compare_with else rec


# the settings two joined studies may differ in: which arms and seeds they ran, at which lr, where they wrote
_OWN = ("name", "records", "seeds", "arms", "arm_lrs", "compare_with", "progress")


def join(rec: dict, others: list[dict]) -> dict:
    """``rec`` with the arms of ``others`` (loaded steps-saved records) added, for a report of them all: each must
    have ``rec``'s settings but for :data:`_OWN`, its held-out examples, and, for lora and any other arm both ran,
    at every seed both ran, a curve equal to ``rec``'s but for the time it took."""
    meta = {**rec["meta"], "settings": dict(rec["meta"]["settings"])}
    s = meta["settings"]
    arms, lrs, curves, names = list(s["arms"]), dict(s.get("arm_lrs") or {}), dict(rec["curves"]), []
    for o in others:
        so, name = o["meta"]["settings"], o["meta"]["settings"]["name"]
        diff = sorted(k for k in set(s) | set(so) if k not in _OWN and s.get(k) != so.get(k))
        if diff:
            raise PktError(f"compare_with: {name} is not {s['name']}'s study with other arms: its {diff[0]} differs")
        if o["meta"]["heldout"]["ids"] != meta["heldout"]["ids"]:
            raise PktError(f"compare_with: {name} measures other held-out examples than {s['name']}")
        for (a, seed), r in o["curves"].items():
            if (a, seed) in curves:  # lora, and any other arm both ran: the same curve, or not the same study
                mine, theirs = ({k: v for k, v in c["result"].items() if k != "train_seconds"}
                                for c in (curves[(a, seed)], r))
                if mine != theirs:
                    raise PktError(f"compare_with: {name}'s {a} curve of seed {seed} is not {s['name']}'s: the "
                                   "studies' arms are not paired")
        new = [a for a in so["arms"] if a not in arms]
        arms += new
        lrs.update({a: x for a, x in (so.get("arm_lrs") or {}).items() if a in new})
        curves.update({k: v for k, v in o["curves"].items() if k[0] in new})
        names.append(name)
    s["arms"], s["arm_lrs"] = arms, lrs
    s["seeds"] = [x for x in s["seeds"] if all(x in o["meta"]["settings"]["seeds"] for o in others)]
    meta["joined"] = {n: o["meta"]["settings"]["arms"] for n, o in zip(names, others)}
    return {"meta": meta, "curves": curves}


def control_pairs(arms: list[str]) -> list[tuple[str, str]]:
    """(arm, control) for each arm that is a null of another arm (pkt run's method names it in ``controls``:
    seeking-random and seeking-shuffled of seeking, laten-random-lora of laten-lora), where both are among
    ``arms``."""
    from pkt.methods import REGISTRY

    return [(REGISTRY[c].controls, c) for c in arms if c in REGISTRY and REGISTRY[c].controls in arms]


def crossings(curves: np.ndarray, at: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Where each row of ``curves`` (losses at the steps ``at``) first reaches ``target`` (one per row), linearly
    interpolated between measured steps; ``inf`` where it never does."""
    below = curves <= target[:, None]
    first = np.where(below.any(axis=1), below.argmax(axis=1), -1)
    j = np.clip(first, 1, len(at) - 1)
    rows = np.arange(len(curves))
    prev, cur = curves[rows, j - 1], curves[rows, j]
    with np.errstate(divide="ignore", invalid="ignore"):  # rows that start below or never reach are not used
        step = at[j - 1] + (prev - target) / (prev - cur) * (at[j] - at[j - 1])
    return np.where(first == 0, float(at[0]), np.where(first > 0, step, np.inf))


def _interval(x: np.ndarray) -> tuple[float, float]:
    # sample quantiles (no interpolation between draws), so that an infinite draw stays infinite
    lo, hi = np.quantile(x, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2], method="inverted_cdf")
    return float(lo), float(hi)


def _check(rec: dict, arms: list[str], seeds: list[int], at: list[int], n: int) -> list[int]:
    """The seeds whose every arm is recorded, after checking that their records measure the same examples at the
    same steps and that every arm of a seed trained on lora's batches."""
    complete = []
    for seed in seeds:
        got = [rec["curves"].get((a, seed)) for a in arms]
        for a, r in zip(arms, got):
            if r is None:
                continue
            res = r["result"]
            if [h["step"] for h in res["heldout"]] != at or any(len(h["per_example"]) != n for h in res["heldout"]):
                raise PktError(f"{CURVES}/{curve_file(a, seed)}: its held-out steps or examples are not the "
                               f"settings' ({at}, {n} examples): a stale record")
        if all(got):
            ref = got[arms.index("lora")]["result"]["batches"]
            for a, r in zip(arms, got):
                if r["result"]["batches"] != ref:
                    raise PktError(f"{CURVES}/{curve_file(a, seed)}: trained on other batches than lora's of seed "
                                   f"{seed}; the arms are not paired")
            complete.append(seed)
    return complete


def derive(rec: dict) -> dict:
    """Every number the report states, from the records ``rec`` (:func:`load`)."""
    s = rec["meta"]["settings"]
    arms, seeds, at = list(s["arms"]), list(s["seeds"]), list(s["heldout_at"])
    n = len(rec["meta"]["heldout"]["ids"])
    complete = _check(rec, arms, seeds, at, n)
    out = {"arms": arms, "at": at, "seeds": complete,
           "recorded": sum((a, seed) in rec["curves"] for a in arms for seed in seeds),
           "expected": len(arms) * len(seeds)}
    if not complete:
        return out
    ex = [[[h["per_example"] for h in rec["curves"][(a, seed)]["result"]["heldout"]] for seed in complete]
          for a in arms]
    pairs = np.asarray(ex, dtype=float)  # (arm, seed, step, example, [nll sum, tokens])
    scored = (pairs[..., 1] > 0).all(axis=(0, 1, 2))  # an answer cut away entirely is left out everywhere
    loss = pairs[..., scored, 0] / pairs[..., scored, 1]  # (arm, seed, step, example): mean NLL per token
    lo = arms.index("lora")
    table = []
    for k, step in enumerate(at):
        row = {"step": step, "arms": {}, "delta": {}}
        for i, a in enumerate(arms):
            d = paired_difference(loss[i, :, k].tolist(), np.zeros_like(loss[i, :, k]).tolist())
            row["arms"][a] = (d.mean, d.low, d.high)
            if a != "lora":
                d = paired_difference(loss[i, :, k].tolist(), loss[lo, :, k].tolist())
                row["delta"][a] = (d.mean, d.low, d.high, d.p)
        table.append(row)
    steps = np.asarray(at, dtype=float)
    mean = loss.mean(axis=3).mean(axis=1)  # (arm, step)
    target = mean[lo, -1]
    point = {a: float(crossings(mean[i][None], steps, np.array([target]))[0]) for i, a in enumerate(arms)}
    seed_w, ex_w = two_way_counts(len(complete), loss.shape[-1], N_BOOT, seed=0)
    per_seed = np.einsum("bn,askn->bask", ex_w, loss) / loss.shape[-1]
    boot = np.einsum("bs,bask->bak", seed_w, per_seed) / len(complete)  # (replicate, arm, step)
    boot_target = boot[:, lo, -1]
    reach = {a: crossings(boot[:, i], steps, boot_target) for i, a in enumerate(arms)}
    summary = {}
    for a in arms:
        saved = reach["lora"] - reach[a]
        summary[a] = {"steps": point[a], "steps_ci": _interval(reach[a]), "saved": point["lora"] - point[a],
                      "saved_ci": _interval(saved), "reached": float(np.isfinite(reach[a]).mean())}
        if a != "lora":
            summary[a]["p"] = bootstrap_p(saved)
    controls = []
    for a, c in control_pairs(arms):  # the arm minus its control: in loss at the last step, and in steps
        i, j = arms.index(a), arms.index(c)
        d = paired_difference(loss[i, :, -1].tolist(), loss[j, :, -1].tolist())
        # a replicate where neither reaches the target: no step saved either way
        more = np.where(np.isinf(reach[a]) & np.isinf(reach[c]), 0.0, reach[c] - reach[a])
        controls.append({"arm": a, "control": c, "loss": (d.mean, d.low, d.high, d.p),
                         "saved": point[c] - point[a], "saved_ci": _interval(more), "p": bootstrap_p(more)})
    # one family for every comparison the report states (each step's difference with lora, the steps saved, the
    # arms against their controls): Holm's adjusted p beside each raw one
    deltas = [(row["delta"], a) for row in table for a in row["delta"]] + [(x, "loss") for x in controls]
    saves = [summary[a] for a in arms if a != "lora"] + controls
    adjusted = holm([d[a][3] for d, a in deltas] + [x["p"] for x in saves])
    for (d, a), q in zip(deltas, adjusted):
        d[a] = (*d[a], q)  # (mean, low, high, p, Holm)
    for x, q in zip(saves, adjusted[len(deltas):]):
        x["holm"] = q
    train = {a: [float(np.mean([rec["curves"][(a, seed)]["result"]["train_loss"][t] for seed in complete]))
                 for t in range(len(rec["curves"][(a, complete[0])]["result"]["train_loss"]))] for a in arms}
    out.update(table=table, target=float(target), summary=summary, controls=controls, train=train,
               examples=int(scored.sum()), mean=mean.tolist(), family=len(adjusted))
    return out


def _loss(x: tuple) -> str:
    return f"{x[0]:.4f} [{x[1]:.4f}, {x[2]:.4f}]"


def _signed(v: float) -> str:
    # a difference below the table's 4 decimals is still shown with its sign and size
    return (f"{v:+.4f}" if v == 0 or abs(v) >= 5e-5 else f"{v:+.1e}").replace("-", "−")


def _steps(v: float) -> str:
    if v == np.inf:
        return "not reached"
    if v == -np.inf:
        return "−∞"
    return f"{v:.2f}".replace("-", "−")


def _joined(meta: dict) -> list[str]:
    """The note on the studies joined into this report (none: nothing)."""
    joined = meta.get("joined")
    if not joined:
        return []
    return ["Joined with " + "; ".join(f"{n} (its {', '.join(a)})" for n, a in joined.items())
            + "'s records (`compare_with`): their lora curves equal this study's bit for bit at every seed both "
            "ran (checked), so their arms are paired with these; seeds are those every study ran.", ""]


def _controls(out: dict) -> list[str]:
    """The section on each arm against its controls."""
    last = out["at"][-1]
    what = []
    if any(x["arm"] == "seeking" for x in out["controls"]):
        what.append("Seeking's: the same spectrum from other blocks, whether the teacher's blocks do more than a "
                    "large init of their size")
    if any(x["arm"] == "laten-lora" for x in out["controls"]):
        what.append("laten-lora's: the same fine-tuning of the student LaTen's random-teacher null injected, whether "
                    "the teacher's vectors do more than the hypernetwork's own training on the student's loss")
    lines = ["## Against its controls", "",
             f"The arm minus its control (the same seed, batches and lr; {'; '.join(what)}).", "",
             f"| arm − control | held-out loss at step {last} [95% CI] | p | Holm | steps saved over the control "
             "[95% CI] | p | Holm |", "|---|---|---:|---:|---|---:|---:|"]
    for x in out["controls"]:
        m, lo, hi, p, q = x["loss"]
        lines.append(f"| {x['arm']} − {x['control']} | {_signed(m)} [{_signed(lo)}, {_signed(hi)}] | {p_value(p)} | "
                     f"{p_value(q)} | {_steps(x['saved'])} [{_steps(x['saved_ci'][0])}, {_steps(x['saved_ci'][1])}] "
                     f"| {p_value(x['p'])} | {p_value(x['holm'])} |")
    return lines + ["", "Steps saved over the control: the control's steps to lora's final held-out loss minus the "
                    "arm's (positive: the arm gets there sooner), per bootstrap replicate.", ""]


def render(rec: dict, out: dict) -> str:
    meta = rec["meta"]
    s, h, b = meta["settings"], meta["heldout"], meta["settings"]["budget"]
    arms, at = out["arms"], out["at"]
    lat = ""
    if "laten-lora" in arms:
        # a point other than the paper's is named in full (records of the paper's point keep their sentence)
        step = (f"{b['laten_steps']} steps of a cycle over "
                f"{'the extract split' if b.get('laten_schedule') == 'extract' else 'the steps trained'}"
                if b["laten_choice"] == "fixed" else f"{b['laten_choice']} step")
        rate = f"rate {b['laten_rate']:g}" + (f" (applied at {b['laten_apply_rate']:g})" if b.get("laten_apply_rate")
                                               else "")
        lam = "" if b.get("laten_penalty", 1000.0) == 1000.0 else f", λ {b['laten_penalty']:g}"
        lat = (f" laten-lora fine-tunes LaTen's injected student (`pkt run`'s laten build: {step}, {rate}{lam}, "
               f"{b['laten_batch']} examples per hypernetwork step) with the same LoRA.")
    own = s.get("arm_lrs") or {}  # records made before arms could have their own lr have none
    lr = f"lr {b['lr']:g}" + (f" ({', '.join(f'{a}: {x:g}' for a, x in own.items())})" if own else "")
    lines = [f"# Steps saved: {s['name']}", "",
             f"Arms {', '.join(arms)}: LoRA fine-tuning of `{s['student']}` on the first {meta['n_train']} examples "
             f"of the PKT {s['task']} train split, {b['epochs']:g} epoch{'s' * (b['epochs'] != 1)} at batch "
             f"{b['batch_size']} ({meta['steps']} optimizer steps), {lr}, rank {b['rank']}, α "
             f"{b['alpha']:g}, {s['dtype']}; seeds {', '.join(map(str, s['seeds']))}.{lat} Every arm of a seed "
             "uses that seed for its LoRA init, data order and dropout, and trains on the same examples in the same "
             "steps (checked on the records' batches).", "",
             f"Held-out set: {h['description']}; none is trained on by any arm. Held-out loss: the teacher-forced "
             f"NLL of the gold answers, the mean over examples of each example's mean token NLL, measured in eval "
             f"mode (no dropout) at optimizer steps {', '.join(map(str, at))} (0: before any update).", "",
             *_joined(meta),
             f"Recorded: {out['recorded']} of {out['expected']} curves; complete seeds: "
             f"{', '.join(map(str, out['seeds'])) or 'none yet'}.", ""]
    if not out["seeds"]:
        return "\n".join(lines)
    others = [a for a in arms if a != "lora"]
    lines += ["## Held-out loss by optimizer step", "",
              "| step | " + " | ".join(f"{a} [95% CI]" for a in arms)
              + "".join(f" | {a} − lora [95% CI] | p | Holm" for a in others) + " |",
              "|---:|" + "---|" * len(arms) + "---|---:|---:|" * len(others)]
    for row in out["table"]:
        cells = [_loss(row["arms"][a]) for a in arms]
        for a in others:
            m, lo, hi, p, q = row["delta"][a]
            cells += [f"{_signed(m)} [{_signed(lo)}, {_signed(hi)}]", p_value(p), p_value(q)]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    lines += ["", "## Steps to reach LoRA's final held-out loss", "",
              f"Target: lora's mean held-out loss at step {at[-1]}, {out['target']:.4f}.", "",
              "| arm | steps [95% CI] | steps saved vs lora [95% CI] | p | Holm | replicates reaching it |",
              "|---|---|---|---:|---:|---:|"]
    for a in arms:
        x = out["summary"][a]
        saved = "– | – | –" if a == "lora" else (f"{_steps(x['saved'])} [{_steps(x['saved_ci'][0])}, "
                                                 f"{_steps(x['saved_ci'][1])}] | {p_value(x['p'])} | "
                                                 f"{p_value(x['holm'])}")
        lines.append(f"| {a} | {_steps(x['steps'])} [{_steps(x['steps_ci'][0])}, {_steps(x['steps_ci'][1])}] | "
                     f"{saved} | {100 * x['reached']:.1f}% |")
    lines += ["", "Steps: the first measured step whose mean held-out loss is at or below the target, linearly "
              "interpolated between it and the measured step before (between measured steps the curve is taken as "
              "a straight line, so the resolution is the spacing of the measured steps); 0 when the arm starts at "
              "or below it. Intervals: two-way bootstrap, the held-out examples resampled once for every arm and "
              f"seed and the seeds independently ({N_BOOT:,} draws, seed 0, `pkt.experiment.stats`); in each "
              "replicate the target and the crossings are recomputed; a replicate that never reaches the target "
              "counts as infinitely many steps. p: the bootstrap's two-sided p of the difference (of the steps "
              f"saved: of lora's steps minus the arm's); Holm: Holm's adjusted p over the {out['family']} comparisons the "
              "report states (with lora: every step's difference and every arm's steps saved"
              + ("; against a control: both below" if out["controls"] else "")
              + "), the family-wise verdict at 5% is Holm ≤ 0.05.", ""]
    if out["controls"]:
        lines += _controls(out)
    lines += ["## Training loss by step (mean over seeds)", "",
              "Each step's loss on its own minibatch, the same minibatch for every arm: the noisy measure the "
              "held-out loss replaces.", "",
              "| step | " + " | ".join(arms) + " |", "|---:|" + "---:|" * len(arms)]
    for t in range(len(out["train"][arms[0]])):
        lines.append(f"| {t + 1} | " + " | ".join(f"{out['train'][a][t]:.4f}" for a in arms) + " |")
    lines += ["", f"![held-out loss by step]({PLOT})", ""]
    return "\n".join(lines)


def plot(rec: dict, out: dict, path: Path) -> None:
    """Each arm's mean held-out loss by step with its 95% band, and the target (lora's final loss)."""
    plt = staged.pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if out["seeds"]:
        for a in out["arms"]:
            vals = [row["arms"][a] for row in out["table"]]
            ax.plot(out["at"], [v[0] for v in vals], marker="o", label=a)
            ax.fill_between(out["at"], [v[1] for v in vals], [v[2] for v in vals], alpha=0.2)
        ax.axhline(out["target"], color="grey", linestyle="--", linewidth=1, label="lora's final held-out loss")
    ax.set_xticks(out["at"], [str(k) for k in out["at"]])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out answer loss (mean NLL per token)")
    ax.set_title(f"{rec['meta']['settings']['name']}: held-out loss by step (95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    staged.save_png(fig, path)


def write_report(records: str | Path, compare_with: Sequence[str | Path] = ()) -> Path:
    """steps-saved.md and steps-saved.png in the records directory, from its records (joined with those of
    ``compare_with``); returns the .md's path."""
    return staged.write_report(records, REPORT, PLOT, lambda r: load(r, compare_with), derive, render, plot)
