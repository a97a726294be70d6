"""Committable per-stage result records of a study, and its report rebuilt from them alone.

Why: a long study (hours on a CPU) must survive a change of machine. Its weights cannot travel, its results
can. Each finished stage's record (name, key, seconds, settings, result, and the per-step loss of a training
loop; never weights) is a small JSON file ``DEST/stages/<stage name>.json``; ``DEST/study.json`` holds the
configuration, versions, code identity and the study's stages in the order they run. Committed to git as the
stages finish, they are all that ``pkt report DEST`` needs to rebuild results.{md,csv,json}, the figures and
report.html: no run directory, no weights, no model.

Records name no machine: a path into the run directory becomes ``stages/<stage dir>/...`` and any other absolute
path ``<local>/<its last part>``, so the same study exported on two machines gives the same records. A record
belongs to the study when its key (the stage directory's name, hash included) is the one study.json lists for
that stage: an older configuration's record is ignored, and :func:`export_run` removes it.

``pkt run`` writes its own report through the same path (:func:`rebuild`: :func:`load`, then
:func:`pkt.experiment.report.write_report`), reading its stage directories instead of exported records, so its
results.md is the one ``pkt report`` makes from the records.

A record carries its stage as a typed value (``of``: kind, method, task, seed; :class:`~pkt.stage.Stage`).
Records written before it did are read from their stage name (:meth:`Stage.from_name`), and records of studies
run before this module existed (pkt at bf03009 and earlier) too: an evaluation's method, task and seed then come
from its stage name (``eval-{method}-{task}-s{seed}``; a method may contain '-', a task does not), and an
analysis without plot inputs brings its PNGs along (``DEST/figures/``), which the report uses as they are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pkt import methods
from pkt.errors import PktError
from pkt.stage import ANALYSIS, EVAL, Stage
from pkt.io import write_json
from pkt.tracking import arm_label

FORMAT = 1
STUDY = "study.json"
FIGURES = "figures"
# what study.json keeps of the run's manifest (the plan's estimate is left out: it holds this machine's free disk)
STUDY_KEYS = ("name", "teacher", "student", "seeds", "tasks", "methods", "versions", "code", "started",
              "finished", "seconds", "config", "config_yaml", "stages")
# the per-step logs of the training loops (fine-tuning / KD: run/train_log.jsonl; LaTen: train/log.jsonl)
LOOP_LOGS = ("train_log.jsonl", "log.jsonl")
EVAL_NEEDS = ("metric", "score", "per_example")
# in a stage directory restored from its committed record (restore): that record, exported as it is
RESTORED = "record.json"

# a path starts at the start of a string or after a separator, never inside a word or a URL
_START = r"(?<![^\s'\"=:(\[{,])"
# stage directories are named <stage>-<16 hex digits> (pkt.experiment.cache.stable_hash); a stage's own paths
# name the temporary directory it ran in (.<dir>.tmp<pid>: pkt.io.atomic_dir), which is renamed into place
_STAGE_PATH = re.compile(_START + r"(?:[^\s'\"=]*/)?stages/\.?([^\s'\"/]+-[0-9a-f]{16})(?:\.tmp\d+)?(?![^\s'\"/])")
_ABS_PATH = re.compile(_START + r"/[^\s'\"/]+(?:/[^\s'\"/]+)+/?")


# ---- records without machine paths -------------------------------------------------------------------------
def _portable_str(s: str) -> str:
    if "/" not in s:
        return s
    s = _STAGE_PATH.sub(r"stages/\1", s)
    return _ABS_PATH.sub(lambda m: "<local>/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], s)


def portable(obj):
    """``obj`` with every path into a run directory made ``stages/...`` and every other absolute path
    ``<local>/NAME`` (dict keys included): what differs between machines, and only that, is gone."""
    if isinstance(obj, str):
        return _portable_str(obj)
    if isinstance(obj, dict):
        return {_portable_str(k) if isinstance(k, str) else k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    return obj


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PktError(f"{path}: missing ({what})") from None
    except OSError as e:
        raise PktError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise PktError(f"{path}: malformed {what}: not JSON ({e})") from None


# ---- export -------------------------------------------------------------------------------------------------
def stage_record(stage_dir: str | Path) -> dict:
    """The committable record of a finished stage directory (its ``stage.json``, made portable, plus the
    per-step loss of any training loop in it). A stage whose weights were pruned still has its record."""
    stage_dir = Path(stage_dir)
    if (stage_dir / RESTORED).is_file():  # its loop logs did not travel: the committed record is the record
        return _read_json(stage_dir / RESTORED, "restored stage record")
    f = stage_dir / "stage.json"
    data = _read_json(f, "stage record")
    if not isinstance(data, dict) or not isinstance(data.get("stage"), str) or "result" not in data:
        raise PktError(f"{f}: malformed stage record: needs 'stage' and 'result'")
    rec = {"format": FORMAT, "stage": data["stage"], **({"of": data["of"]} if "of" in data else {}),
           "key": stage_dir.name, "seconds": data.get("seconds"),
           **{k: data[k] for k in ("peak_rss_bytes", "machine") if k in data},
           "inputs": portable(data.get("key")), "result": portable(data["result"])}
    logs = {}
    for name in LOOP_LOGS:
        for log in stage_dir.rglob(name):
            try:
                rows = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines() if x.strip()]
            except (OSError, ValueError):
                continue  # not a loop's log; the record stays without its curve
            logs[log.relative_to(stage_dir).as_posix()] = [[int(r["step"]), float(r["loss"])] for r in rows
                                                           if isinstance(r, dict) and "step" in r and "loss" in r]
    if logs:
        rec["loss_logs"] = dict(sorted(logs.items()))
    return rec


def _old_figures(result) -> list[str]:
    """The PNGs of an analysis result without plot inputs (pkt ≤ bf03009), which travel as they are."""
    if isinstance(result, dict) and not result.get("plots") and isinstance(result.get("figures"), list):
        return [Path(str(n)).name for n in result["figures"]]
    return []


def export_stage(stage_dir: str | Path, dest: str | Path) -> Path:
    """Write ``dest/stages/<stage name>.json`` (atomically) from a finished stage directory; an old analysis
    stage's PNGs go to ``dest/figures/`` (palette-compressed). Returns the record's path."""
    stage_dir, dest = Path(stage_dir), Path(dest)
    rec = stage_record(stage_dir)
    if not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*", rec["stage"]):
        raise PktError(f"{stage_dir / 'stage.json'}: stage name {rec['stage']!r} cannot name a file")
    path = dest / "stages" / f"{rec['stage']}.json"
    write_json(path, rec)
    for name in _old_figures(rec["result"]):
        src = stage_dir / name
        if src.is_file():
            _copy_png(src, dest / FIGURES / name)
    return path


def _copy_png(src: Path, dst: Path) -> None:
    from pkt.analyse.plots import compact_png

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}.png")
    shutil.copyfile(src, tmp)
    compact_png(tmp)
    os.replace(tmp, dst)


def restore(dest: str | Path, planned: list[dict], stages_root: str | Path,
            keep_outputs=lambda name: False) -> list[str]:
    """Recreate in a run directory (``stages_root``) each planned stage (``{stage, key}``) that has no directory
    there but a committed record in ``dest`` with the same key: ``stage.json`` from the record, which is also
    kept as it is (:data:`RESTORED`). This is how a study resumes on another machine: its finished evaluations
    are found cached. A stage's outputs (weights, files) did not travel, so unless ``keep_outputs(name)`` says
    that its record is all anyone reads of it (an evaluation), it is marked pruned: a later stage that needs its
    files rebuilds it (:mod:`pkt.experiment.cache`). Returns the names of the restored stages."""
    from pkt.experiment.cache import PRUNED
    from pkt.io import atomic_dir

    dest, stages_root = Path(dest), Path(stages_root)
    done = []
    for s in planned:
        name, key = s["stage"], s["key"]
        f = dest / "stages" / f"{name}.json"
        if (stages_root / key).exists() or not f.is_file():
            continue
        rec = _read_json(f, "stage record")
        if not isinstance(rec, dict) or rec.get("key") != key or "result" not in rec:
            continue  # another configuration's (or another code's) record of this stage
        with atomic_dir(stages_root / key) as tmp:
            write_json(tmp / RESTORED, rec)
            write_json(tmp / "stage.json", {"stage": name, **({"of": rec["of"]} if "of" in rec else {}),
                                            "key": rec.get("inputs"), "result": rec["result"],
                                            "seconds": float(rec.get("seconds") or 0.0), "restored": True,
                                            **{k: rec[k] for k in ("peak_rss_bytes", "machine") if k in rec}})
            if not keep_outputs(name):
                write_json(tmp / PRUNED, {"note": f"restored from {f.name}: its outputs are not here", "files": []})
        done.append(name)
    return done


def study_record(manifest: dict) -> dict:
    """study.json: the run manifest's configuration, versions, code identity and stage list, made portable."""
    return {"format": FORMAT, **portable({k: manifest[k] for k in STUDY_KEYS if k in manifest})}


def write_study(dest: str | Path, manifest: dict) -> None:
    write_json(Path(dest) / STUDY, study_record(manifest))


def export_run(run_dir: str | Path, dest: str | Path) -> list[Path]:
    """Every finished stage of a ``pkt run`` directory (those its manifest.json lists) and study.json into
    ``dest``. A record in ``dest/stages`` that is not one of this study's stages (an older configuration's) is
    removed, so that the directory holds one study."""
    run_dir, dest = Path(run_dir), Path(dest)
    manifest = _read_json(run_dir / "manifest.json", "run manifest (the run has not finished)")
    study = study_record(manifest)
    wanted = {s["stage"]: s["key"] for s in _stage_list(study, run_dir / "manifest.json")}
    written = []
    for name, key in wanted.items():
        d = run_dir / "stages" / key
        if (d / "stage.json").is_file():
            written.append(export_stage(d, dest))
    for f in sorted((dest / "stages").glob("*.json")) if (dest / "stages").is_dir() else []:
        try:
            key = json.loads(f.read_text(encoding="utf-8")).get("key")
        except (OSError, ValueError, AttributeError):
            key = None
        if wanted.get(f.stem) != key:
            f.unlink()
    write_json(dest / STUDY, study)
    return written


# ---- load ---------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """A study as its report needs it."""

    manifest: dict  # study.json (for a run directory: study_record of its manifest.json)
    records: list[dict] = field(default_factory=list)  # Study._walk's records, portable
    analysis: dict | None = None  # the analysis stage's result
    curves: dict = field(default_factory=dict)  # label -> [(step, loss)], as pkt.tracking.study_curves
    figures: list[Path] = field(default_factory=list)  # PNGs used as they are (an analysis without plot inputs)
    # {"recorded": stages with a record, "planned": stages the study lists, "seconds": their own stage times}
    progress: dict | None = None


@dataclass
class _Stage:
    record: dict
    source: Path  # the file it was read from, for errors
    figures: Path  # where an old analysis record's PNGs are


def _stage_list(study: dict, src: Path) -> list[dict]:
    stages = study.get("stages")
    if not isinstance(stages, list) or not all(isinstance(s, dict) and isinstance(s.get("stage"), str)
                                               and isinstance(s.get("key"), str) for s in stages):
        raise PktError(f"{src}: malformed study record: 'stages' must list {{stage, key}} entries")
    return stages


def _check_study(study, src: Path) -> dict:
    if not isinstance(study, dict):
        raise PktError(f"{src}: malformed study record: not a JSON object")
    missing = [k for k in ("name", "tasks", "stages") if k not in study]
    if missing:
        raise PktError(f"{src}: malformed study record: missing {', '.join(missing)}")
    _stage_list(study, src)
    return study


def load(src: str | Path) -> Loaded:
    """A study from a records directory (``study.json`` + ``stages/*.json``) or a ``pkt run`` output directory
    (``manifest.json`` + ``stages/*/stage.json``). Malformed input: one line naming the file."""
    src = Path(src)
    if not src.is_dir():
        raise PktError(f"{src}: not a directory (expected a records directory or a pkt run output directory)")
    stages: dict[str, _Stage] = {}
    if (src / STUDY).is_file():
        study = _check_study(_read_json(src / STUDY, "study record"), src / STUDY)
        for f in sorted((src / "stages").glob("*.json")) if (src / "stages").is_dir() else []:
            rec = _read_json(f, "stage record")
            if (not isinstance(rec, dict) or not isinstance(rec.get("stage"), str)
                    or not isinstance(rec.get("key"), str) or "result" not in rec):
                raise PktError(f"{f}: malformed stage record: needs 'stage', 'key' and 'result'")
            stages[rec["key"]] = _Stage(rec, f, src / FIGURES)
    elif (src / "manifest.json").is_file():
        study = _check_study(study_record(_read_json(src / "manifest.json", "run manifest")), src / "manifest.json")
        for s in study["stages"]:
            d = src / "stages" / s["key"]
            if (d / "stage.json").is_file() and s["key"] not in stages:
                stages[s["key"]] = _Stage(stage_record(d), d / "stage.json", d)
    elif (src / "stages").is_dir():
        raise PktError(f"{src}: no manifest.json: the run has not finished (pkt report reads a finished run "
                       "directory, or the records directory of a running one)")
    else:
        raise PktError(f"{src}: neither a records directory ({STUDY}) nor a pkt run output directory (manifest.json)")
    return assemble(study, stages)


def load_records(dest: str | Path) -> tuple[list[dict], dict, dict | None]:
    """(records as Study._walk builds them, the study manifest, the analysis result) of a records directory."""
    loaded = load(dest)
    return loaded.records, loaded.manifest, loaded.analysis


def assemble(study: dict, stages: dict[str, _Stage]) -> Loaded:
    """The report's inputs from the study's stage list (in run order) and its stage records by key."""
    tasks = [str(t) for t in study.get("tasks") or []]
    out = Loaded(manifest=study)
    seen: dict[str, None] = {}  # in run order
    for s in study["stages"]:
        st = stages.get(s["key"])
        if st is None or s["key"] in seen:
            continue  # not finished (yet), or listed twice (a build another build reuses)
        seen[s["key"]] = None
        stage = _typed(st, tasks)
        if stage.kind == EVAL:
            out.records.append(_eval_row(st, stage, stages))
        elif stage.kind == ANALYSIS:
            out.analysis = st.record["result"] if isinstance(st.record["result"], dict) else None
            out.figures = [st.figures / n for n in _old_figures(st.record["result"])]
    out.records = _vanilla_for_every_seed(out.records, study)
    out.curves = _curves(out.records, stages)
    seconds = sum(float(stages[k].record.get("seconds") or 0) for k in seen)
    # each recorded stage's own time and peak memory where it ran (the manifest lists a cached stage at 0 s)
    timed = [{"stage": stages[k].record["stage"], "seconds": float(stages[k].record.get("seconds") or 0.0),
              **{f: stages[k].record[f] for f in ("peak_rss_bytes", "machine") if stages[k].record.get(f)}}
             for k in seen]
    out.progress = {"recorded": len(seen), "planned": len({s["key"] for s in study["stages"]}),
                    "seconds": round(seconds, 1), "stages": timed}
    return out


def _vanilla_for_every_seed(records: list[dict], study: dict) -> list[dict]:
    """With a fixed evaluation subset (``budget.eval_seed``), a vanilla model is evaluated once, as the first
    seed's stage, and stands for every seed (pkt.experiment.evaluation.evaluate_once): its row is repeated for
    the other seeds."""
    cfg = study.get("config")
    seeds = list(study.get("seeds") or [])
    if not isinstance(cfg, dict) or len(seeds) < 2:
        return records

    def eval_seed(task):
        # ExperimentConfig.budget_for, read from the recorded config as it is: validating it again would read
        # its data files, which the records do not carry
        per_task = (cfg.get("per_task") or {}).get(task) or {}
        return per_task["eval_seed"] if "eval_seed" in per_task else (cfg.get("budget") or {}).get("eval_seed")

    have = {(r["method"], r["task"], r["seed"]) for r in records}
    extra = [{**r, "seed": s} for r in records
             if methods.is_vanilla(r["method"]) and r["seed"] == seeds[0]
             and eval_seed(r["task"]) is not None
             for s in seeds[1:] if (r["method"], r["task"], s) not in have]
    if not extra:
        return records
    # in the walk's order (task, seed, method; a companion evaluation, e.g. the float32 student, right after its
    # method), where the walk appended each seed's copy
    tasks = list(study.get("tasks") or [])
    order = [m for meth in study.get("methods") or [] for m in (meth, *(x.name for x in methods.companions(meth)))]

    def rank(r):
        return (tasks.index(r["task"]) if r["task"] in tasks else len(tasks),
                seeds.index(r["seed"]) if r["seed"] in seeds else len(seeds),
                order.index(r["method"]) if r["method"] in order else len(order))

    return sorted(records + extra, key=rank)


def _typed(st: _Stage, tasks: list[str]) -> Stage:
    """The stage a record is of: its ``of``, or, in a record written before records carried it, its name read
    back against the study's tasks."""
    rec = st.record
    try:
        return Stage.from_dict(rec["of"]) if "of" in rec else Stage.from_name(rec["stage"], tasks)
    except (ValueError, TypeError) as e:
        raise PktError(f"{st.source}: malformed stage record: {e}") from None


def _eval_row(st: _Stage, stage: Stage, stages: dict[str, _Stage]) -> dict:
    res = st.record["result"]
    if not isinstance(res, dict) or any(k not in res for k in EVAL_NEEDS):
        raise PktError(f"{st.source}: malformed evaluation record: the result needs {', '.join(EVAL_NEEDS)}")
    ident = res.get("evaluated_as")
    if isinstance(ident, dict) and all(ident.get(k) is not None for k in ("method", "task", "seed")):
        method, task, seed = ident["method"], ident["task"], ident["seed"]
    else:  # a record from before evaluations named themselves
        method, task, seed = stage.method, stage.task, stage.seed
    model = ((st.record.get("inputs") or {}).get("settings") or {}).get("model")
    row = {"method": method, "task": task, "seed": seed, "model_dir": model, **res}
    keys = methods.REGISTRY[method].injection if method in methods.REGISTRY else ()
    if keys:
        row["injection"] = _injection(model, stages, keys)
    return row


def _stage_of(model, stages: dict[str, _Stage]) -> tuple[_Stage, PurePosixPath] | None:
    """The stage that built ``model`` (a portable ``stages/<dir>/...`` path) and the path inside it."""
    parts = PurePosixPath(str(model or "")).parts
    if len(parts) < 3 or parts[0] != "stages" or parts[1] not in stages:
        return None
    return stages[parts[1]], PurePosixPath(*parts[2:])


def _injection(model, stages: dict[str, _Stage], keys: tuple[str, ...]) -> dict | None:
    """``keys`` of the result of the build stage that wrote ``model`` (as the runner reads them)."""
    found = _stage_of(model, stages)
    res = found[0].record["result"] if found else None
    return {k: res.get(k) for k in keys} if isinstance(res, dict) else None


def _curves(records: list[dict], stages: dict[str, _Stage]) -> dict:
    # as pkt.tracking.study_curves: the loop log next to the model (train_log.jsonl, or LaTen's train/log.jsonl)
    curves = {}
    for r in records:
        found = _stage_of(r.get("model_dir"), stages)
        if not found:
            continue
        logs = found[0].record.get("loss_logs") or {}
        parent = found[1].parent
        for cand in (parent / "train_log.jsonl", parent / "train" / "log.jsonl"):
            if cand.as_posix() in logs:
                curves[arm_label(r)] = [(int(s), float(v)) for s, v in logs[cand.as_posix()]]
                break
    return curves


# ---- the report -------------------------------------------------------------------------------------------
def rebuild(src: str | Path, out: str | Path | None = None) -> dict:
    """results.{md,csv,json}, the figures and report.html of the study in ``src`` (records or run directory),
    written to ``out`` (default ``src``): ``pkt report`` and the end of ``pkt run``."""
    from pkt.experiment.report import write_report

    loaded = load(src)
    return write_report(Path(out or src), loaded.records, loaded.manifest, loaded.figures, analysis=loaded.analysis,
                        curves=loaded.curves, progress=loaded.progress)
