"""``pkt run [CONFIG.yaml]``: the whole study (methods × tasks × seeds), resumable, with a report."""

from __future__ import annotations

from pathlib import Path

import typer


def default_config() -> Path:
    """configs/default.yaml of the source tree (pkt is installed editable), else ./configs/default.yaml."""
    here = Path(__file__).resolve().parents[3] / "configs" / "default.yaml"
    return here if here.is_file() else Path("configs/default.yaml")


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        config: Path = typer.Argument(None, help="Experiment YAML (default: configs/default.yaml)."),
        out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: runs/<name>)."),
        dry_run: bool = typer.Option(False, help="Check the config and models, print the plan (stages, estimated "
                                                 "time, disk), run nothing."),
        executor: str = typer.Option("sequential", help="sequential: every stage in this process; ray: stages "
                                                        "as Ray tasks with the config's resources (pkt[ray])."),
        address: str = typer.Option(None, help="With --executor ray: the Ray cluster to use (default: "
                                               "RAY_ADDRESS, else a local instance)."),
        records: Path = typer.Option(None, "--records", help="Also export each stage's small result record "
                                     "here as it finishes (the config's `records:`); `pkt report DIR` rebuilds "
                                     "the results from them."),
    ) -> None:
        """Run the study: build every method's student, evaluate, analyse, and write results + report.html.

        Stages are cached under OUT/stages by a hash of everything that determines them (settings, pkt's
        code, library versions, model and data files): re-running after an interruption resumes where it
        stopped; a change recomputes only the stages it affects. Before any stage, the models, tokenizers,
        dimensions, code sandbox and free disk are checked (seconds); one runner per OUT at a time.
        """
        from pkt.config import load_config
        from pkt.errors import PktError
        from pkt.experiment.config import ExperimentConfig
        from pkt.experiment.runner import Study

        if executor not in ("sequential", "ray"):
            raise PktError(f"--executor {executor!r}: choose sequential or ray")
        if address and executor != "ray":
            raise PktError("--address needs --executor ray")

        path = config or default_config()
        cfg = load_config(ExperimentConfig, path)
        if records is not None:
            cfg = cfg.model_copy(update={"records": str(records)})
        out_dir = out or Path("runs") / cfg.name
        study = Study(cfg, out_dir, Path(path).read_text(encoding="utf-8"), log=lambda s: typer.echo(s, err=True))
        if dry_run:
            est = study.preflight(plan=True)
            typer.echo(f"{path}: OK -> {out_dir}")
            typer.echo(est.render())
            return
        if executor == "ray" and not dry_run:
            from pkt.experiment.executors import RayExecutor

            with RayExecutor(address) as ex:
                result = study.run(executor=ex)
        else:
            result = study.run()
        typer.echo((out_dir / "results.md").read_text(encoding="utf-8"))
        typer.echo(f"report: {out_dir / 'report.html'} ({result['manifest']['seconds']:.0f} s)")
