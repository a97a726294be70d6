"""What the record-backed studies (``pkt study pilot``, ``pkt study steps-saved``, ``pkt study laten-dose``)
share: their command line (run / ``--dry-run`` / ``--report``) and config file, writing their records during a run
and reading them back (for the report, and to restore finished stages on another machine), the result of a finished
stage directory whose weights may have been pruned, how a model is asked the held-out or test questions and what
its evaluation records, and how their reports and plans write numbers, tables and figures (the same bytes wherever
they are re-derived). Each study keeps its own stages, records and report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from pkt.errors import PktError


def read_config(cls, path: str | Path):
    """(the validated ``cls`` settings of a study's YAML file, the file's text); a bad one is a one-line PktError
    naming the file and the setting."""
    from pkt.config import read_yaml, validate

    return validate(cls, read_yaml(path), str(path)), Path(path).read_text(encoding="utf-8")


def distinct(v: list | None) -> list | None:
    """A list setting's validator: no value twice (a seed or a grid value twice would run a stage twice)."""
    if v is not None and len(set(v)) != len(v):
        raise ValueError(f"values repeat in {v}")
    return v


def read_record(path: Path, kind: str) -> dict:
    """A JSON object record of a ``kind`` study (a one-line error naming the file otherwise)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PktError(f"{path}: not a {kind} record ({e})") from None
    if not isinstance(data, dict):
        raise PktError(f"{path}: not a {kind} record (expected a JSON object)")
    return data


def records_root(records: str | Path, meta: str, kind: str, who: str = "the study") -> Path:
    """The records directory of a ``kind`` study, which its ``meta`` record marks (a one-line error otherwise)."""
    root = Path(records)
    if not (root / meta).is_file():
        raise PktError(f"{root}: no {meta} (not a {kind} records directory, or {who} has not started)")
    return root


def read_records(directory: Path, kind: str) -> dict[str, dict]:
    """Every record in ``directory`` by file stem, in name order (none while it does not exist)."""
    return {p.stem: read_record(p, kind) for p in sorted(directory.glob("*.json"))}


def seeded_records(directory: Path, kind: str, what: str, name: str) -> dict[tuple[str, int], dict]:
    """The ``what`` records in ``directory`` (one training's result each) by (record[name], seed)."""
    found = {}
    for p in sorted(directory.glob("*.json")):
        rec = read_record(p, kind)
        if not isinstance(rec.get("result"), dict) or name not in rec or "seed" not in rec:
            raise PktError(f"{p}: not a {kind} {what} record (needs {name}, seed and result)")
        found[(rec[name], int(rec["seed"]))] = rec
    return found


def finished(path: Path) -> dict | None:
    """The result in a finished stage's stage.json, also after its weights were pruned."""
    try:
        data = json.loads((path / "stage.json").read_text(encoding="utf-8"))
        return data["result"] if isinstance(data, dict) and isinstance(data.get("result"), dict) else None
    except (OSError, ValueError):
        return None


# ---- a run's records: written as its pieces finish, and read back on another machine --------------------------
class RecordWriter:
    """Writes a run's records into ``root`` (``writer(rel, record)``: atomically, as each piece finishes) and at the
    end deletes the records in its subdirectories that this run did not write: another grid's or settings', which
    the report must not read as this study's."""

    def __init__(self, root: Path):
        from pkt.io import check_output_dir

        check_output_dir(root, "records")
        self.root, self.written = root, set()

    def __call__(self, rel: str, record: dict) -> None:
        from pkt.io import write_json

        write_json(self.root / rel, record)
        self.written.add(self.root / rel)

    def drop_others(self, *subdirs: str) -> None:
        for sub in subdirs:
            for old in (self.root / sub).glob("*.json"):
                if old not in self.written:
                    old.unlink()


def restorable(records: Path, holds: dict[str, tuple[tuple[str, str], ...]], student: str | None = None,
               parts: tuple[tuple[str, str], ...] = ()) -> dict[str, dict]:
    """Stage results held by a study's committed records, by stage directory name (its key's hash). ``holds``: per
    records subdirectory, the (stage field, result field) pairs of its records: ``record[result]`` is the result of
    the stage that ``record[stage]`` names. ``student``: the untuned student's record, whose each (part, stage field)
    of ``parts`` is a result held as ``record[part]``, its stage field left out of it. A run on another machine
    takes these instead of recomputing them; a record whose stage key differs (other settings or code) matches no
    stage, and an unreadable one is left out (its stage recomputed, never trusted)."""
    found: dict[str, dict] = {}
    for sub, pairs in holds.items():
        for f in (records / sub).glob("*.json"):
            rec = read_json(f)
            for stage, result in pairs if isinstance(rec, dict) else ():
                if isinstance(rec.get(stage), str) and isinstance(rec.get(result), dict):
                    found[rec[stage]] = rec[result]
    rec = read_json(records / student) if student else None
    for part, stage in parts if isinstance(rec, dict) else ():
        held = rec.get(part)
        if isinstance(held, dict) and isinstance(held.get(stage), str):
            found[held[stage]] = {k: v for k, v in held.items() if k != stage}
    return found


def read_json(path: Path):
    """A record's JSON, or None where it is missing or unreadable (its stage is then recomputed, never trusted)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def restored(cache, found: dict[str, dict], name: str, key: dict, records: Path, log) -> dict | None:
    """The result of stage (``name``, ``key``) held by a committed record (``found``: the study's restorable
    results) when the stage is not cached here: it finished on another machine with the same settings, code and
    data (the key's hash is in the stage directory's name)."""
    path = cache.path(name, key)
    if cache.is_cached(name, key) or path.name not in found:
        return None
    if not cache.dry:
        log(f"[restored] {name} from its record in {records}")
    return found[path.name]


def eval_config(e, which: str, style: str, max_length: int, progress: bool):
    """The :class:`pkt.evaluate.harness.EvalConfig` of a study's evaluation settings ``e`` (the pilot's
    ``EvalSettings``) on the held-out set (every row given) or the test subset (``e.test_size`` of it)."""
    from pkt.evaluate.harness import EvalConfig

    return EvalConfig(limit=e.test_size if which == "test" else None, seed=e.test_seed, style=style,
                      max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, decoding=e.decoding,
                      protocol=e.protocol, shots=e.shots, allow_weak_sandbox=e.allow_weak_sandbox,
                      max_prompt_tokens=max(max_length, 1024), progress=progress)


def eval_key(kind: str, label: str, which: str, ecfg, task: str, heldout: dict, model: dict, dtype: str,
             common: dict, **extra) -> tuple[str, dict]:
    """The stage (name, key) of an evaluation of ``model`` (what identifies it) by ``ecfg`` (:func:`eval_config`;
    its progress bars are no part of the result) on the held-out questions (``heldout``: the held-out set's record;
    the data they are kept apart from) or the test subset (the test data)."""
    from pkt.experiment.fingerprint import data_identity

    settings = ecfg.model_dump(mode="json")
    settings.pop("progress")
    rows = ({"heldout": {k: heldout[k] for k in ("source", "ids")},
             "data": data_identity(task, ("extract", "align", "train", "test"))}
            if which == "heldout" else {"data": data_identity(task, ("test",))})
    return f"{which}-{label}", {"kind": kind, "set": which, "task": task, "model": model, "dtype": dtype,
                                "eval": settings, "rows": rows, **extra, **common}


def describe_test_subset(e, task: str) -> dict:
    """What a study's meta record says of its test subset (``e``: its evaluation settings, the pilot's
    ``EvalSettings``)."""
    from pkt.experiment.evaluation import TEST_SIZES

    return {"size": e.test_size, "seed": e.test_seed, "protocol": f"{e.shots}-shot {e.protocol} protocol",
            "description": f"{min(e.test_size, TEST_SIZES[task])} of the {TEST_SIZES[task]} {task} test questions, "
                           f"seed {e.test_seed}; greedy, {e.max_new_tokens} new tokens"}


def generation_result(task: str, metric: str, model, tok, ecfg, rows, d: Path) -> dict:
    """Greedy answers of ``model`` to the task's questions (``rows``: the held-out rows; None: the test subset of
    ``ecfg``), their predictions written to ``d/predictions.jsonl``; the score and the per-question scores that
    the reports pair question by question."""
    from pkt.evaluate.harness import run_task
    from pkt.io import write_jsonl

    records, metrics = run_task(task, model, tok, ecfg, rows=rows)
    write_jsonl(d / "predictions.jsonl", records)
    return {"metric": metric, "score": metrics[metric], "n": len(records), "ids": [r["id"] for r in records],
            "per_example": [float(r["correct"]) for r in records], "at_cap": metrics.get("hit_max_new_tokens")}


def main(argv: list[str] | None, prog: str | None, *, doc: str, example: str, load_config: Callable,
         study: Callable, render_plan: Callable, report, what: str,
         report_options: Callable[[object], dict] = lambda cfg: {}) -> int:
    """``CONFIG --out DIR`` runs or resumes ``study(cfg, out, text, log=, dry=)``; ``--dry-run`` prints its plan;
    ``--report`` rebuilds the report (``report``: the study's report module, with ``write_report`` and ``PLOT``)
    from the records alone, with ``report_options(cfg)`` (what else the config tells the report) as keyword
    arguments. ``what`` says what goes to ``--out``."""
    from pkt.io import check_output_dir

    ap = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    ap.add_argument("config", type=Path, help=f"the study's YAML settings ({example})")
    ap.add_argument("--out", type=Path, help=f"work directory: {what} (resumed if it exists)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--report", action="store_true",
                      help=f"write {report.REPORT} and {report.PLOT} from the records alone")
    mode.add_argument("--dry-run", action="store_true", help="print the plan and its cost; run nothing")
    args = ap.parse_args(argv)
    cfg, text = load_config(args.config)
    if args.report:
        path = report.write_report(cfg.records, **report_options(cfg))
        print(f"wrote {path} and {path.with_name(report.PLOT)}")
        return 0
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.dry_run:
        print(render_plan(study(cfg, args.out, text, log=log, dry=True)))
        return 0
    if args.out is None:
        raise PktError(f"--out DIR is required to run the study ({what} go there)")
    check_output_dir(args.out, "--out")
    study(cfg, args.out, text, log=log).run()
    return 0


# ---- the reports: numbers, figures and the files they are written to ------------------------------------------
def pct(x: float | None) -> str:
    """A share as a percentage with one decimal ("–" when not measured yet)."""
    return "–" if x is None else f"{100 * x:.1f}%"


def pts(x: float) -> str:
    """A difference of shares in percentage points, signed, with a true minus sign."""
    return f"{100 * x:+.1f}".replace("-", "−")


def p_value(p: float) -> str:
    """A p-value with three decimals, or in scientific notation below 0.001."""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def pyplot():
    """matplotlib's pyplot drawing to files only (the Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """``fig`` written to ``path`` as a PNG, atomically, and closed. No library version goes into its metadata, so
    the same records give the same bytes whatever matplotlib re-derives them."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def write_report(records: str | Path, report: str, plot_file: str, load: Callable, derive: Callable,
                 render: Callable, plot: Callable) -> Path:
    """A study's report ``report`` (``render(rec, out)``) and figure ``plot_file`` (``plot(rec, out, path)``) in the
    records directory, from its records alone (``rec = load(records)``, ``out = derive(rec)``); the report's path."""
    from pkt.io import write_text

    root = Path(records)
    rec = load(root)
    out = derive(rec)
    write_text(root / report, render(rec, out))
    plot(rec, out, root / plot_file)
    return root / report


# ---- the plans (--dry-run) -------------------------------------------------------------------------------------
def plan_table(rows: list[tuple[str, bool, float, str]], width: int) -> list[str]:
    """A plan's rows (stage, cached, estimated seconds, work) as a table under its header; the stage column is
    ``width`` wide, or as wide as the longest stage name."""
    from pkt.experiment.plan import human

    w = max([width] + [len(r[0]) for r in rows])
    lines = [f"{'stage':<{w}} {'status':<7} {'estimate':>9}  work"]
    lines += [f"{name:<{w}} {'cached' if cached else 'run':<7} {human(0 if cached else s):>9}  {work}"
              for name, cached, s, work in rows]
    return lines
