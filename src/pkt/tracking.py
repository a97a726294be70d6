"""Training logs in the trackers users already have, through accelerate's tracker classes.

Every training loop of pkt (LoRA fine-tuning for the PostPKT arms and KD, the LaTen hypernetwork) keeps its
own per-step log (``train_log.jsonl`` / ``log.jsonl``); :class:`TrainingLog` forwards the same records to
the tracker chosen with ``report_to`` (``--report-to`` on the command line):

* ``tensorboard`` (default): event files under ``<run dir>/logs/<run name>/``, offline, readable with
  ``tensorboard --logdir <run dir>/logs`` or the tensorboard package's ``EventAccumulator``;
* ``trackio``, ``wandb``, ``mlflow``: optional extras (``pip install 'pkt[wandb]'`` ...); wandb and trackio
  follow their own environment (``WANDB_MODE=offline`` ...); mlflow writes under ``<run dir>/mlruns``
  unless ``MLFLOW_TRACKING_URI`` says otherwise;
* ``none``: the loop's own log only.

accelerate's tracker classes are used directly rather than through an ``Accelerator``: the LaTen loop has
none, and one tracker run per loop is all that is needed. Only the main process of a data-parallel run
logs (the others hold the same numbers).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from pkt.errors import PktError

REPORT_TO = ("tensorboard", "trackio", "wandb", "mlflow", "none")
LOG_SUBDIR = "logs"
_EXTRA = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}


def _available(name: str) -> bool:
    from accelerate.utils import imports

    check = {"tensorboard": "is_tensorboard_available", "trackio": "is_trackio_available",
             "wandb": "is_wandb_available", "mlflow": "is_mlflow_available"}[name]
    return bool(getattr(imports, check)())


def check_report_to(name: str, setting: str = "report_to") -> str:
    """``name`` if it is a known tracker whose package is installed, else a one-line :class:`PktError`."""
    if name not in REPORT_TO:
        raise PktError(f"{setting} {name!r}: expected one of {', '.join(REPORT_TO)}")
    if name != "none" and not _available(name):
        raise PktError(f"{setting} {name!r}: the {_EXTRA[name]} package is not installed "
                       f"(pip install 'pkt[{_EXTRA[name]}]'), or use --report-to none")
    return name


def _scalar_config(config: dict) -> dict:
    """Hyperparameters as the trackers accept them (bool/int/float/str; lists and None as text)."""
    out = {}
    for k, v in config.items():
        out[k] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a loop's log record, without the step counter (it is the x axis)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TrainingLog:
    """One tracker run for one training loop; a no-op for ``none`` and on non-main processes."""

    def __init__(self, report_to: str, run_dir: str | Path, run_name: str, config: dict | None = None,
                 main_process: bool = True):
        self.report_to = check_report_to(report_to)
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.tracker = None
        if report_to == "none" or not main_process:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        from pkt.dist import dist_state

        # accelerate's trackers log through its logger, which needs the process state: a loop that is the
        # first thing a fresh process runs (`pkt laten train`, a Ray worker) has none yet
        dist_state()
        cls = LOGGER_TYPE_TO_CLASS[report_to]
        if report_to == "tensorboard":
            tracker = cls(run_name, self.run_dir / LOG_SUBDIR)
        elif report_to == "wandb":
            tracker = cls(run_name, dir=str(self.run_dir))
        elif report_to == "mlflow":
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                import mlflow

                mlflow.set_tracking_uri((self.run_dir / "mlruns").resolve().as_uri())
            tracker = cls(experiment_name=run_name, run_name=run_name)
        else:  # trackio
            tracker = cls(run_name)
        # The tracker's own main-process guard builds accelerate's PartialState; pkt decides who is main
        # (pkt.dist.dist_state), so the guard is switched off for this, already chosen, process.
        tracker.main_process_only = False
        tracker.start()
        if config:
            tracker.store_init_configuration(_scalar_config(config))
        self.tracker = tracker

    @property
    def log_dir(self) -> Path | None:
        """Where TensorBoard event files go (None for the other trackers)."""
        return self.run_dir / LOG_SUBDIR / self.run_name if self.report_to == "tensorboard" else None

    def log(self, record: dict, step: int | None = None) -> None:
        if self.tracker is None:
            return
        self.tracker.log(scalars(record), step=record.get("step") if step is None else step)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_tensorboard(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files in ``log_dir``: tag → [(step, value)] in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_loss_curve(log_file: str | Path) -> list[tuple[int, float]]:
    """(step, loss) of a loop's own JSONL log (``train_log.jsonl`` of fine-tuning, ``log.jsonl`` of LaTen)."""
    import json

    rows = [json.loads(line) for line in Path(log_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(int(r["step"]), float(r["loss"])) for r in rows if "step" in r and "loss" in r]


ARM_LABEL = re.compile(r"^(?P<method>.+) \((?P<task>[^,()]+), seed (?P<seed>-?\d+)\)$")


def arm_label(record: dict) -> str:
    """A study arm's curve label, ``method (task, seed N)``, which ARM_LABEL reads back."""
    return f"{record['method']} ({record['task']}, seed {record['seed']})"


def seed_bands(curves: dict[str, list[tuple[int, float]]]) -> dict | None:
    """Curves labelled ``method (task, seed N)`` grouped as task -> method -> [(step, mean, min, max, seeds)]
    over the seeds that logged that step; None when a label does not follow that pattern."""
    grouped: dict = {}
    for label, pts in curves.items():
        m = ARM_LABEL.match(label)
        if not m:
            return None
        by_step = grouped.setdefault(m["task"], {}).setdefault(m["method"], {})
        for step, loss in pts:
            by_step.setdefault(int(step), []).append(float(loss))
    return {task: {method: [(s, sum(v) / len(v), min(v), max(v), len(v)) for s, v in sorted(steps.items())]
                   for method, steps in methods.items()}
            for task, methods in grouped.items()}


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path,
                     title: str = "training loss per step") -> Path | None:
    """One PNG of the trained arms' loss curves (label -> [(step, loss)]); None when there is none.

    Labels ``method (task, seed N)`` (a study's) are drawn one panel per task, one line per method: the mean
    over seeds with a min-max band, so a three-seed study of ten arms stays readable. Other labels get a
    line each."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    bands = seed_bands(curves)
    if bands is None:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for label, pts in curves.items():
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o" if len(pts) < 30 else None, ms=3,
                    label=label)
        axes = [ax]
        ax.set_title(title)
    else:
        fig, axes = plt.subplots(1, len(bands), figsize=(8.5 * len(bands), 4.2), squeeze=False)
        axes = list(axes[0])
        for ax, (task, methods) in zip(axes, sorted(bands.items())):
            for method, rows in sorted(methods.items()):
                steps = [r[0] for r in rows]
                seeds = max(r[4] for r in rows)
                line, = ax.plot(steps, [r[1] for r in rows], marker="o" if len(rows) < 30 else None, ms=3,
                                label=f"{method} ({seeds} seed{'s' if seeds > 1 else ''})")
                if seeds > 1:
                    ax.fill_between(steps, [r[2] for r in rows], [r[3] for r in rows], color=line.get_color(),
                                    alpha=0.15, linewidth=0)
            # each arm's loop logs its own objective: LaTen's align loss, GKD's divergence, SeqKD's loss on
            # the teacher's text; only arms with the same objective and data compare in level
            ax.set_title(f"{title}: {task} (mean over seeds, band min-max)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 1.5 tick
        ax.set_ylabel("loss (each loop's own objective)" if bands is not None else "loss")
        if bands is None:
            ax.legend(fontsize=7)
        else:  # outside the axes: ten arms' labels would cover their own curves
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def study_curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Loss curve of every trained arm of a study: records with a ``model_dir`` next to its loop's log
    (``train_log.jsonl`` of fine-tuning / KD, ``train/log.jsonl`` of LaTen), labelled method (task, seed)."""
    curves = {}
    for r in records:
        if not r.get("model_dir"):
            continue
        parent = Path(str(r["model_dir"])).parent
        for log in (parent / "train_log.jsonl", parent / "train" / "log.jsonl"):
            if log.is_file():
                curves[arm_label(r)] = read_loss_curve(log)
                break
    return curves


def study_loss_curves(records: list[dict], out: str | Path) -> Path | None:
    """``out/loss_curves.png`` with :func:`study_curves` (None when no arm was trained)."""
    return plot_loss_curves(study_curves(records), Path(out) / "loss_curves.png")
